"""``moverd serve``: the long-running daemon.

One process runs the job API (FastAPI on uvicorn), the housekeeping scheduler (APScheduler) and
the jobs themselves, as Prefect flow runs. Each module has one job: :mod:`.settings` (the
``[server]`` and ``[scheduler]`` sections), :mod:`.auth`, :mod:`.metrics`, :mod:`.journal`,
:mod:`.dispatch` (embedded and scale-out job execution), :mod:`.api`, :mod:`.scheduler`,
:mod:`.notify` (systemd), :mod:`.prefect_server` (the local Prefect server of the embedded default)
and :mod:`.daemon` (the process: signals, startup, graceful shutdown).

Importing this package is cheap on purpose: the configuration imports :mod:`.settings`, and
nothing here may pull in FastAPI or Prefect before ``moverd serve`` decides how Prefect is set up.
"""
