"""``moverd serve`` and ``moverd prefect setup``: being written."""
