"""The one part of moverd's build that pyproject.toml cannot state stably: the C extension.

``moverd/_md5mb.c`` is the multi-buffer md5 (see docs/architecture.md). It is optional: without a
C compiler the build goes on and moverd hashes with hashlib.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("moverd._md5mb", sources=["moverd/_md5mb.c"], extra_compile_args=["-O2"], optional=True),
    ]
)
