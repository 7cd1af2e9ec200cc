"""moverd's benchmark: ``make bench`` (``python -m bench``).

Speed is judged by ratios measured side by side in one run (see ``docs/benchmarks.md``): moverd
against the best raw download of the same S3 objects, its peak memory at two dataset sizes, and
``moverd verify`` against ``md5sum`` over the same datablocks.
"""
