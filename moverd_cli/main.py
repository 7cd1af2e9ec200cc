"""``moverd``: archive, retrieve and verify datasets; inspect plugins and configuration.

Every command works with no configuration at all (the embedded default under the state
directory). Errors print one line and exit non-zero: 2 for a user error (bad input, missing
files, unknown dataset), 3 for broken configuration, 1 for system errors.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import anyio
import typer

from moverd.app import App
from moverd.config import load_settings
from moverd.errors import ConfigError, MoverdError, UserError
from moverd.events import Transfer
from moverd.units import format_size, plural
from moverd_daemon.settings import DaemonSettings

from .progress import show_progress

T = TypeVar("T")

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    name="moverd", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="moverd: move datasets into tar datablocks on long-term storage, verified, and back.",
    context_settings=HELP_OPTIONS,
)
config_app = typer.Typer(no_args_is_help=True, help="Check or show the configuration.", context_settings=HELP_OPTIONS)
app.add_typer(config_app, name="config")
job_app = typer.Typer(no_args_is_help=True, help="Carry out or inspect catalog jobs.", context_settings=HELP_OPTIONS)
app.add_typer(job_app, name="job")


class _Console:
    """The terminal console, made on first use: importing rich costs ~25 ms of every start, and
    a command run with ``--json`` (by scripts and job runners) never prints through it."""

    _console: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(soft_wrap=True)
        return getattr(self._console, name)


out = _Console()

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML configuration file (default: $MOVERD_CONFIG, else the embedded default).",
                 show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document for scripts, no progress bars.")]


class _State:
    json_errors = False
    """``--json`` was given: errors are a JSON document too (on stderr, like the lines)."""


def fail(exc: BaseException, code: int | None = None) -> None:
    if code is None:
        code = 3 if isinstance(exc, ConfigError) else 2 if isinstance(exc, UserError) else 1
    lines = str(exc).splitlines() or [type(exc).__name__]
    if _State.json_errors:
        kind = {1: "system_error", 2: "user_error", 3: "config_error", 130: "interrupted"}.get(code, "error")
        typer.echo(json.dumps({"error": {"message": "\n".join(lines), "kind": kind, "exit_code": code}}), err=True)
        raise typer.Exit(code)
    typer.echo(f"moverd: error: {lines[0]}", err=True)
    for line in lines[1:]:
        typer.echo(f"  {line}", err=True)
    raise typer.Exit(code)


def load_config(config: Path | None) -> DaemonSettings:
    """The configuration as every command reads it: the whole file, every layer's sections."""
    return load_settings(config, DaemonSettings)


def run(fn: Callable[[App], Awaitable[T]], config: Path | None) -> T:
    """Load the app, run ``fn`` on it, close it; map errors to one line and an exit code."""
    async def main() -> T:
        from moverd_daemon.installation import build_app

        async with build_app(load_config(config)) as application:
            return await fn(application)

    # Everything imported so far lives as long as the process: keep the garbage collector from
    # walking it again and again while a transfer allocates (a few percent of a big archive).
    # A command's objects mostly die young, by reference count: collecting the young generation
    # every 20,000 allocations rather than 700 leaves it ~70 collections fewer per GiB of 2 MiB
    # files (20-50 ms of the event loop's thread), and holds at most that many objects longer.
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    try:
        return anyio.run(main)
    except MoverdError as exc:
        fail(exc)
    except KeyboardInterrupt:
        if _State.json_errors:
            fail(MoverdError("interrupted"), 130)
        typer.echo("moverd: interrupted", err=True)
        raise typer.Exit(130) from None
    except OSError as exc:
        fail(MoverdError(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")))
    raise AssertionError("unreachable")


def path_like(text: str) -> bool:
    """Does ``text`` name a local path (rather than a dataset id)? Then a missing one is a
    missing folder, not an unknown dataset."""
    return text.startswith((".", "/", "~")) or (os.sep in text and Path(text).parent.is_dir())


def emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def _version(value: bool) -> None:
    if value:
        from moverd import __version__

        typer.echo(f"moverd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens.")] = False,
    config: ConfigOpt = None,
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print moverd's version and exit.")] = False,
) -> None:
    """moverd: move datasets into tar datablocks on long-term storage, verified, and back.

    -c/--config works before the command or after it (there it wins).
    """
    if config is not None:
        # Every command, and the daemon's job runs, read the file named here.
        os.environ["MOVERD_CONFIG"] = str(config)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@app.command()
def archive(
    source: Annotated[
        str, typer.Argument(help=(
            "What to archive: a folder, a storage location (<storage>:<prefix>, e.g. landing:raw/X, or "
            "s3://<bucket>/<prefix> of a configured S3 storage), or the id of a catalogued dataset."
        ))
    ],
    new: Annotated[bool, typer.Option(
        "--new", help="Archive the folder as a new dataset even if it was archived before, as it is now."
    )] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Archive a folder or storage location (as a dataset of the local catalog), or a catalogued
    dataset, to the LTS.

    The same folder again resumes its interrupted dataset, reusing the datablocks already
    committed; a folder archived already, with the same files, is reported and not archived twice.
    Files archived from a folder or location stay where they are.
    """
    from moverd.services.folders import dataset_for_folder, parse_location
    from moverd.services.lifecycle import archive_with_lifecycle

    folder = Path(source)
    is_folder = folder.is_dir()
    looks_like_path = path_like(source)
    started: list[str] = []  # the dataset being archived, for the resume hint

    async def go(a: App) -> dict[str, Any]:
        state = "catalogued"
        location = None if is_folder else parse_location(a, source)
        if is_folder or location is not None:
            found = await dataset_for_folder(a, folder if is_folder else source, new=new)
            pid, state = found.dataset.pid, found.state
            if state == "archived":
                return {"dataset": pid, "already_archived": True, "folder": found.dataset.source_folder}
        elif looks_like_path:
            raise UserError(f"folder {source!r} does not exist")
        else:
            pid = (await a.catalog.get_dataset(source)).pid
        started.append(pid)
        if state == "resumed" and not as_json:
            out.print(f"resuming dataset [bold]{pid}[/] of this folder (an earlier archive did not finish)")
        transfer = Transfer(kind="archive", dataset=pid)
        t0 = time.monotonic()
        async with show_progress(transfer, enabled=not as_json):
            result = await archive_with_lifecycle(a, pid, transfer=transfer)
        seconds = time.monotonic() - t0
        return {
            "dataset": pid, "bytes": result.size, "files": transfer.files_total, "seconds": round(seconds, 3),
            "datablocks": [
                {"archive_id": d.archive_id, "size": d.size, "packed_size": d.packed_size, "files": len(d.members)}
                for d in result.datablocks
            ],
            "written": result.written, "reused": result.reused, "resumed": state == "resumed",
            "already_archived": False,
        }

    try:
        res = run(go, config)
    except typer.Exit as exc:
        if started and exc.exit_code in (1, 130):
            # Interrupted, or a storage or catalog failed: what is committed is kept for a resume.
            typer.echo(f"moverd: resume with: moverd archive {shlex.quote(source)}", err=True)
        raise
    if as_json:
        emit_json(res)
        return
    if res["already_archived"]:
        out.print(
            f"already archived: {res['folder']} is dataset [bold]{res['dataset']}[/], with the same files; "
            "use --new to archive it again"
        )
        return
    rate = res["bytes"] / res["seconds"] if res["seconds"] else 0
    out.print(
        f"archived [bold]{res['dataset']}[/]: {plural(res['files'], 'file')}, {format_size(res['bytes'])} in "
        f"{plural(len(res['datablocks']), 'datablock')} ({res['written']} written, {res['reused']} reused), "
        f"{res['seconds']:.1f} s, {format_size(rate)}/s, verified"
    )
    out.print(f"retrieve with: moverd retrieve {res['dataset']} --to DIR")


@app.command()
def retrieve(
    dataset: Annotated[str, typer.Argument(help="Dataset id.")],
    to: Annotated[Path, typer.Option("--to", help="Folder to write the files into (created if missing).")],
    files: Annotated[list[str] | None, typer.Option("--file", "-f", help="Only this file (repeatable).")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace files already in the folder that differ from the dataset's.")] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Retrieve a dataset, or only some of its files, from the LTS into a folder, verified.

    Files already there with the archived checksum are skipped; any other file already there
    refuses the retrieval before anything is written, unless --overwrite.
    """
    from moverd.services import retrieve_dataset

    async def go(a: App) -> dict[str, Any]:
        dest = to.resolve()
        # The nearest existing ancestor decides: a file there cannot hold the folder.
        here = dest
        while not here.exists() and here != here.parent:
            here = here.parent
        if not here.is_dir():
            which = "is a file" if here == dest else f"cannot be created: {here} is a file"
            raise UserError(f"--to {to}: {which}, not a folder")
        empty = not dest.exists()
        if not empty:
            with os.scandir(dest) as entries:
                empty = next(entries, None) is None
        # overwrite=False makes the folder's writers publish without replacing: a file created
        # after the check below is still not overwritten.
        target = a.local_folder(dest, "target", create=True, fsync=False, overwrite=overwrite)
        transfer = Transfer(kind="retrieve", dataset=dataset)
        t0 = time.monotonic()
        async with show_progress(transfer, enabled=not as_json):
            result = await retrieve_dataset(a, dataset, target, files=files, transfer=transfer, overwrite=overwrite,
                                            check_existing=not empty)
        return {
            "dataset": dataset, "to": str(dest), "files": len(result.files), "bytes": result.size,
            "skipped": len(result.skipped), "removed_temp_files": result.removed_temp_files,
            "seconds": round(time.monotonic() - t0, 3),
        }

    res = run(go, config)
    if as_json:
        emit_json(res)
    else:
        skipped = f", {res['skipped']} already there and identical (skipped)" if res["skipped"] else ""
        swept = (f", {plural(res['removed_temp_files'], 'temporary file')} of an interrupted retrieve removed"
                 if res["removed_temp_files"] else "")
        out.print(
            f"retrieved [bold]{res['dataset']}[/]: {plural(res['files'], 'file')}, {format_size(res['bytes'])} "
            f"into {res['to']} in {res['seconds']:.1f} s, every file verified{skipped}{swept}"
        )


@app.command()
def verify(
    dataset: Annotated[str, typer.Argument(help="Dataset id.")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check every datablock of a dataset on the LTS: read back, or, where the LTS cannot be read
    without a restore (a tape-class S3 store), its reported checksum against the one recorded."""
    from moverd.services import verify_dataset

    async def go(a: App) -> Any:
        transfer = Transfer(kind="verify", dataset=dataset)
        async with show_progress(transfer, enabled=not as_json):
            return await verify_dataset(a, dataset, transfer)

    res = run(go, config)
    if as_json:
        emit_json({"dataset": res.pid, "ok": res.ok, "failed": res.failed, "verified_by": res.verified_by})
    else:
        for archive_id in res.ok:
            out.print(f"[green]ok[/]      {archive_id} ({res.verified_by[archive_id]})")
        for archive_id, why in res.failed.items():
            out.print(f"[red]CORRUPT[/] {archive_id}: {why}")
    if res.failed:
        raise typer.Exit(1)


@app.command()
def upload(
    path: Annotated[Path, typer.Argument(help="The dataset's folder (or one file).")],
    dataset: Annotated[str, typer.Option("--dataset", help="The dataset's id in the catalog.")],
    url: Annotated[str, typer.Option("--url", envvar="MOVERD_URL", help="The daemon's API root.")] = (
        "http://127.0.0.1:8080/archiver/api/v1"),
    token_file: Annotated[Path | None, typer.Option(
        "--token-file", help="A file with the Bearer token (default: $MOVERD_TOKEN).")] = None,
    part_size: Annotated[str, typer.Option("--part-size", help="Multipart part size (files under it: one PUT).")] = (
        "64MiB"),
    parallel: Annotated[int, typer.Option("--parallel", min=1, max=256, help="Parts in flight at once.")] = 8,
    finalize: Annotated[bool, typer.Option("--finalize/--no-finalize", help="Finalize the dataset at the end.")] = True,
    archive_job: Annotated[bool, typer.Option("--archive/--no-archive", help="Finalize creates the archive job.")] = (
        True),
    owner_user: Annotated[str, typer.Option("--owner-user", help="The archive job's owner.")] = "",
    owner_group: Annotated[str, typer.Option("--owner-group", help="The archive job's owner group.")] = "",
    contact_email: Annotated[str, typer.Option("--contact-email", help="The archive job's contact.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Upload a dataset's files into the landing zone through a moverd daemon's upload API, in
    parallel parts with SHA-256 checksums, and finalize it. Run it again after an interruption:
    it resumes, sending no part twice."""
    from moverd.errors import root_cause
    from moverd.units import parse_size

    from .upload import MAX_PART_SIZE, MIN_PART_SIZE, Uploader

    token = token_file.read_text().strip() if token_file else os.environ.get("MOVERD_TOKEN")
    try:
        size = parse_size(part_size)
    except ValueError as exc:
        fail(UserError(f"--part-size: {exc}"))
    if not MIN_PART_SIZE <= size <= MAX_PART_SIZE:
        fail(UserError("--part-size must be between 5 MiB and 5 GiB (S3's limits)"))
    owner = {"user": owner_user, "group": owner_group, "email": contact_email}

    async def go() -> Any:
        client = Uploader(url, token, part_size=size, parallel=parallel)
        transfer = Transfer(kind="upload", dataset=dataset)
        try:
            async with show_progress(transfer, enabled=not as_json):
                return await client.upload(path, dataset, transfer, finalize=finalize, archive=archive_job,
                                           owner=owner)
        except BaseExceptionGroup as group:
            raise root_cause(group) from None  # the first real error, one line, as the other commands show
        finally:
            await client.aclose()

    t0 = time.monotonic()
    try:
        res = anyio.run(go)
    except MoverdError as exc:
        fail(exc)
    except KeyboardInterrupt:
        fail(MoverdError("interrupted; run the same command again to resume"), 130)
    except OSError as exc:
        fail(MoverdError(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")))
    seconds = time.monotonic() - t0
    if as_json:
        emit_json({"dataset": res.dataset, "files": res.files, "bytes": res.bytes, "skipped_files": res.skipped_files,
                   "parts_sent": res.parts_sent, "parts_resumed": res.parts_resumed,
                   "urls_renewed": res.urls_renewed, "uploads_aborted": res.uploads_aborted,
                   "finalized": res.finalized, "part_size": res.part_size,
                   "seconds": round(seconds, 3)})
    else:
        resumed = f", {res.parts_resumed} part(s) and {res.skipped_files} file(s) already there" if (
            res.parts_resumed or res.skipped_files) else ""
        out.print(f"uploaded [bold]{res.dataset}[/]: {plural(res.files, 'file')}, {format_size(res.bytes)} in "
                  f"{seconds:.1f} s{resumed}{', finalized' if res.finalized else ''}")


def print_table(columns: list[str], rows: list[list[str]]) -> None:
    """A table on a terminal; tab-separated lines, never shortened, when piped (ids to copy)."""
    if not sys.stdout.isatty():
        for row in [columns, *rows]:
            typer.echo("\t".join(row))
        return
    from rich.table import Table

    table = Table(*columns)
    for row in rows:
        table.add_row(*row)
    out.print(table)


@app.command()
def datasets(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """List the datasets of the catalog (the embedded local catalog can)."""
    items = run(lambda a: a.catalog.list_datasets(), config)
    if as_json:
        emit_json([d.model_dump() for d in items])
        return
    print_table(["dataset", "files", "size", "archive status", "source"], [
        [d.pid, str(d.number_of_files), format_size(d.size or 0), str(d.lifecycle.get("archive_status", "")),
         d.source_folder or ""]
        for d in items
    ])


@app.command()
def plugins(as_json: JsonOpt = False) -> None:
    """List the loaded plugins with their versions and hooks, and what they register."""
    from moverd.plugins import describe_plugins, load_plugins
    from moverd.registry import Registry

    pm, report = load_plugins()
    reg = Registry.from_plugins(pm)
    infos = describe_plugins(pm)
    if as_json:
        emit_json({
            "plugins": [i.__dict__ for i in infos], "broken": report.broken,
            "storages": sorted(reg.storages), "catalogs": sorted(reg.catalogs), "checksums": sorted(reg.checksums),
        })
        return
    from rich.table import Table

    table = Table("plugin", "version", "hooks")
    for i in infos:
        table.add_row(i.name + (" (built-in)" if i.builtin else ""), i.version or "?", ", ".join(i.hooks))
    out.print(table)
    out.print(f"storage types: {', '.join(sorted(reg.storages))}")
    out.print(f"catalog types: {', '.join(sorted(reg.catalogs))}")
    out.print(f"checksums: {', '.join(sorted(reg.checksums))}")
    for name, why in report.broken.items():
        out.print(f"[yellow]not loaded[/] {name}: {why}")


@job_app.command("run")
def job_run(
    job_id: Annotated[str, typer.Argument(help="The catalog's job id.")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Carry out an archive or retrieve job in the foreground, as a Prefect flow run.

    Exits 0 only when the job ends finishedSuccessful (2 with dataset errors, 1 otherwise).
    """
    async def go(a: App) -> dict[str, Any]:
        from moverd_flows import job_flow

        transfers: list[Transfer] = []
        async with show_progress(transfers, enabled=not as_json):
            return await job_flow(job_id, config=str(config) if config else None,
                                  on_transfer=transfers.append, app=a)

    res = run(go, config)
    if as_json:
        emit_json(res)
    else:
        for d in res["datasets"]:
            mark = "[green]ok[/]" if d["outcome"] == "ok" else f"[red]{d['outcome']}[/]"
            out.print(f"{mark} {d['pid']} {d['message']}")
        for d in res["downloads"]:
            out.print(f"  {d['name']}: {d['url']}")
        out.print(f"job {job_id}: [bold]{res['status']}[/]")
    status = res["status"]
    raise typer.Exit(0 if status == "finishedSuccessful" else 2 if status == "finishedWithDatasetErrors" else 1)


@job_app.command("list")
def job_list(
    status: Annotated[str | None, typer.Option("--status", help="Only jobs with this status code.")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the catalog's jobs, oldest first (the embedded local catalog can)."""
    jobs = run(lambda a: a.catalog.list_jobs(status), config)
    if as_json:
        emit_json([j.model_dump(mode="json") for j in jobs])
        return
    print_table(["job", "type", "status", "datasets"], [
        [j.id, j.type.value, j.status, ", ".join(d.pid for d in j.datasets)] for j in jobs
    ])


@job_app.command("show")
def job_show(
    job_id: Annotated[str, typer.Argument(help="The catalog's job id.")],
    config: ConfigOpt = None,
) -> None:
    """Print a job as the catalog has it."""
    async def go(a: App) -> Any:
        return await a.catalog.get_job(job_id)

    emit_json(run(go, config).model_dump(mode="json"))


@config_app.command("check")
def config_check(
    config: ConfigOpt = None,
    connect: Annotated[bool, typer.Option(
        "--connect", help="Also log in to the catalog, list and write every storage, and reach Prefect.")] = False,
) -> None:
    """Validate the configuration; print every problem and exit non-zero if there is one.

    Exit 3 for a configuration problem; with --connect, 1 when a configured part cannot be reached.
    """
    from moverd.configcheck import check_config, connect_checks
    from moverd_daemon.installation import plugin_manager

    problems, where = check_config(config, DaemonSettings, plugin_manager)
    if problems:
        for p in problems:
            typer.echo(f"moverd: config error: {p}", err=True)
        raise typer.Exit(3)
    out.print(f"configuration OK ({where})")
    if not connect:
        return
    results = run(connect_checks, config)
    for what, error in results:
        if error is None:
            out.print(f"[green]ok[/]    {what}")
        else:
            out.print(f"[red]FAIL[/]  {what}: {error}")
    if any(error is not None for _, error in results):
        raise typer.Exit(1)


@config_app.command("show")
def config_show(
    config: ConfigOpt = None,
    as_toml: Annotated[bool, typer.Option("--toml", help="Print TOML (a starting point for a config file).")] = False,
) -> None:
    """Print the effective configuration (file + environment + defaults), secrets masked."""
    from moverd.configcheck import effective_config

    try:
        typer.echo(effective_config(config, DaemonSettings, as_toml=as_toml))
    except MoverdError as exc:
        fail(exc)


def main() -> None:
    _State.json_errors = "--json" in sys.argv[1:]
    try:
        app(prog_name="moverd")  # also under ``python -m moverd``
    except BrokenPipeError:
        sys.stderr.close()


# Commands that live in their own modules register themselves on ``app`` when imported.
from . import serve as _serve  # noqa: E402,F401
