"""Triggering the recall of an offline (HSM) file: a configured command, bounded.

Waiting for ``st_blocks`` alone relies on something else having asked the HSM for the file. The
``recall_command`` asks: the site's own tool (``dmget {path}``, ``ghi_stage {path}``) or, where
the HSM recalls on access, a read of the first byte (``dd if={path} of=/dev/null bs=1 count=1``).
It runs as a process rather than a read in a worker thread so that a hanging recall can be
killed at ``recall_timeout``; the wait for the data is then the usual ``offline_timeout``.
"""

from __future__ import annotations

import subprocess

import anyio

from moverd import OfflineTimeoutError, StorageError

SHOWN_STDERR = 500
"""Characters of the command's error output quoted in the error."""


def recall_argv(template: list[str], path: str) -> list[str]:
    """The command for one file: ``{path}`` in any argument becomes the file's real path."""
    return [arg.replace("{path}", path) for arg in template]


async def run_recall(argv: list[str], *, bound: float, where: str, key: str) -> None:
    """Run the recall command; a failure or a command still running after ``bound`` seconds
    (then killed) is a system error naming the command and the file."""
    try:
        with anyio.fail_after(bound):
            done = await anyio.run_process(argv, check=False, stdin=subprocess.DEVNULL)
    except TimeoutError:
        raise OfflineTimeoutError(
            f"{where}: the recall command {argv[0]!r} for {key!r} did not finish within {bound:g} s "
            "(recall_timeout) and was killed"
        ) from None
    except OSError as exc:
        raise StorageError(f"{where}: the recall command {argv[0]!r} for {key!r} could not run: {exc}") from exc
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()[-SHOWN_STDERR:]
        raise StorageError(
            f"{where}: the recall command {argv[0]!r} for {key!r} failed (exit {done.returncode})"
            + (f": {err}" if err else "")
        )
