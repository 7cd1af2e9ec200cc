"""Telling observer hooks about a transfer: started, then finished or failed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..app import App
from ..errors import root_cause
from ..events import Transfer


class Observation:
    """What the body of :func:`observed` may say about its outcome besides raising."""

    def __init__(self) -> None:
        self.error: BaseException | None = None

    def fail(self, error: BaseException) -> None:
        """End as failed without raising, for a body that returns a result naming what failed
        (a verify reports every damaged datablock, it does not stop at the first)."""
        self.error = error


@contextlib.contextmanager
def observed(app: App, transfer: Transfer) -> Iterator[Observation]:
    """Notify ``transfer_started`` now, and ``transfer_finished``/``transfer_failed`` at the end.

    Errors leave as the first real error, not an exception group, so callers and users see
    "file X is missing", not "unhandled errors in a TaskGroup".
    """
    app.observers.transfer_started(transfer=transfer)
    outcome = Observation()
    try:
        yield outcome
    except BaseException as exc:
        cause = root_cause(exc)
        app.observers.transfer_failed(transfer=transfer, error=cause)
        if cause is exc:
            raise
        raise cause from None
    if outcome.error is not None:
        app.observers.transfer_failed(transfer=transfer, error=outcome.error)
    else:
        app.observers.transfer_finished(transfer=transfer)
