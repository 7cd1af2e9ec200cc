"""Test-session fixtures. Each real part lives in its own support module under tests/support."""

import os

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

pytest_plugins = [
    "tests.support.s3",
    "tests.support.apps",
    "tests.support.scicat.fixtures",
    "tests.support.facility",
    "tests.support.mounts",
    "tests.support.daemon",
    "tests.support.prefectpg",
]
