"""``moverd serve``, ``moverd prefect setup`` and ``moverd job create``.

``serve`` is the daemon (:mod:`moverd_daemon`). ``prefect setup`` prepares a shared Prefect server
for several daemons, as the seed's prefect-config step did. ``job create`` makes a job in the local
catalog, so that the daemon of the embedded default can be tried with nothing but ``curl``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import anyio
import typer

from moverd.app import App
from moverd.errors import ConfigError, MoverdError, UserError

from .main import ConfigOpt, JsonOpt, app, emit_json, fail, job_app, load_config, out, path_like, run

prefect_app = typer.Typer(no_args_is_help=True, help="Prepare a shared Prefect server for moverd daemons.")
app.add_typer(prefect_app, name="prefect")


@app.command()
def serve(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option("--host", help="Listen address (overrides server.host).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="API port (overrides server.port; 0: a free one).")] = None,
) -> None:
    """Run the daemon: job API, housekeeping and job execution, until SIGTERM.

    Without PREFECT_API_URL jobs run in this process, with a local Prefect server and its UI.

    With PREFECT_API_URL daemons share that server: jobs are deployment runs any daemon takes.
    """
    from pydantic import ValidationError

    from moverd.registry import format_validation_error
    from moverd_daemon.daemon import run_daemon
    from moverd_daemon.settings import ServerSettings

    try:
        settings = load_config(config)
        if host is not None or port is not None:
            data = settings.server.model_dump()
            data.update({k: v for k, v in {"host": host, "port": port}.items() if v is not None})
            try:
                settings.server = ServerSettings.model_validate(data)
            except ValidationError as exc:
                raise ConfigError("\n".join(format_validation_error("server", exc))) from None
    except MoverdError as exc:
        fail(exc)
    code = run_daemon(settings, config)
    raise typer.Exit(code)


def _parse_limits(items: list[str] | None) -> dict[str, int]:
    limits: dict[str, int] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip().isdigit() or int(value) < 1:
            raise UserError(f"--limit {item!r}: write NAME=N with N at least 1, e.g. --limit lts-write=2")
        limits[name.strip()] = int(value)
    return limits


@prefect_app.command("setup")
def prefect_setup(
    config: ConfigOpt = None,
    limit: Annotated[list[str] | None, typer.Option(
        "--limit", help="Global concurrency limit NAME=N (e.g. lts-write=2); default: the storages' own limits.",
    )] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create work pools, deployments, variables, global concurrency limits and the takeover
    automation on PREFECT_API_URL.

    Safe to run again: it updates what exists.
    """
    from moverd_daemon.prefect_server import configured_api_url

    try:
        overrides = _parse_limits(limit)
    except UserError as exc:
        fail(exc)
    if not configured_api_url():
        fail(ConfigError("moverd prefect setup needs a Prefect server: set PREFECT_API_URL "
                         "(e.g. http://prefect.example.org:4200/api)"))

    async def go() -> Any:
        from moverd_flows.deployments import configured_limits, setup
        from prefect.client.orchestration import get_client

        from moverd_daemon.installation import build_app
        from moverd_daemon.settings import daemon_settings

        async with build_app(load_config(config)) as a:
            limits = {**configured_limits(a), **overrides}
            async with get_client() as client:
                error = await client.api_healthcheck()
                if error is not None:
                    raise MoverdError(f"Prefect at {client.api_url} does not answer: {error}")
                settings = daemon_settings(a)
                return (await setup(client, settings, limits, takeover_after=settings.server.takeover_after),
                        str(client.api_url))

    try:
        report, url = anyio.run(go)
    except MoverdError as exc:
        fail(exc)
        raise AssertionError("unreachable") from None
    if as_json:
        emit_json({"prefect": url, "work_pools_created": report.work_pools_created,
                   "deployments": report.deployments, "limits": report.limits, "variables": report.variables,
                   "takeover_after": report.takeover_after})
        return
    out.print(f"Prefect server {url}")
    out.print(f"work pools: {', '.join(report.work_pools_created) or 'already there'}")
    out.print(f"deployments: {', '.join(report.deployments)}")
    out.print("global concurrency limits: " + (", ".join(f"{k}={v}" for k, v in report.limits.items()) or "none"))
    out.print(f"variables: {', '.join(sorted(report.variables))}")
    out.print(f"takeover: a job without a heartbeat for {report.takeover_after:g} s goes to another daemon "
              "(automation moverd-takeover)")
    out.print("set prefect.global_limits = true in the daemons' configuration to hold these limits")


@job_app.command("create")
def job_create(
    job_type: Annotated[str, typer.Argument(metavar="TYPE", help="archive or retrieve.")],
    targets: Annotated[list[str], typer.Argument(
        metavar="DATASET_OR_FOLDER...", help="Dataset ids, or (archive) folders to register as new datasets.")],
    files: Annotated[list[str] | None, typer.Option(
        "--file", "-f", help="Retrieve only this file (repeatable; with one dataset).")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a job in the local catalog and print its id (then POST it to a running daemon)."""
    from moverd.models import JobDataset, JobType
    from moverd.services.folders import register_folder

    if job_type not in ("archive", "retrieve"):
        fail(UserError(f"TYPE must be archive or retrieve, not {job_type!r}"))
    if files and len(targets) != 1:
        fail(UserError("--file needs exactly one dataset"))

    async def go(a: App) -> dict[str, Any]:
        datasets = []
        for target in targets:
            if job_type == "archive" and await anyio.Path(target).is_dir():
                ds, _ = await register_folder(a, Path(target))
                pid = ds.pid
            elif path_like(target) and not await anyio.Path(target).exists():
                raise UserError(f"folder {target!r} does not exist")
            else:
                pid = (await a.catalog.get_dataset(target)).pid
            datasets.append(JobDataset(pid=pid, files=list(files or [])))
        job = await a.catalog.create_job(JobType(job_type), datasets)
        return {"id": job.id, "type": job.type.value, "datasets": [d.pid for d in datasets]}

    res = run(go, config)
    if as_json:
        emit_json(res)
    else:
        typer.echo(res["id"])


@prefect_app.command("limits")
def prefect_limits(
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the global concurrency limits on PREFECT_API_URL: slots taken of each, and the bound in
    which a dead holder's slots come back. Free a stuck slot by hand with
    ``prefect global-concurrency-limit update NAME --active-slots 0`` (no writer may be running)."""
    try:
        settings = load_config(config)
    except MoverdError as exc:
        fail(exc)

    async def go() -> list[dict[str, Any]]:
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            error = await client.api_healthcheck()
            if error is not None:
                raise MoverdError(f"Prefect at {client.api_url} does not answer: {error}")
            limits = await client.read_global_concurrency_limits(limit=200)
        lease = settings.prefect.slot_lease
        return [
            {"name": gcl.name, "limit": gcl.limit, "active_slots": gcl.active_slots, "active": gcl.active,
             "slot_lease": lease}
            for gcl in sorted(limits, key=lambda g: g.name)
        ]

    try:
        rows = anyio.run(go)
    except MoverdError as exc:
        fail(exc)
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        out.print(f"{r['name']:<20} {r['active_slots']}/{r['limit']} slots taken{'' if r['active'] else ' (inactive)'}")
    if not rows:
        out.print("no global concurrency limits here (moverd prefect setup creates them)")
        return
    out.print(f"a holder that died gives its slots back within prefect.slot_lease ({rows[0]['slot_lease']:.0f} s) "
              "plus the server's lease sweep (15 s by default)")
