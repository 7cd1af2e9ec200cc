"""Telling observer hooks about a transfer: started, then finished or failed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..app import App
from ..errors import root_cause
from ..events import Transfer


@contextlib.contextmanager
def observed(app: App, transfer: Transfer) -> Iterator[Transfer]:
    """Notify ``transfer_started`` now, and ``transfer_finished``/``transfer_failed`` at the end.

    Errors leave as the first real error, not an exception group, so callers and users see
    "file X is missing", not "unhandled errors in a TaskGroup".
    """
    app.observers.transfer_started(transfer=transfer)
    try:
        yield transfer
    except BaseException as exc:
        cause = root_cause(exc)
        app.observers.transfer_failed(transfer=transfer, error=cause)
        if cause is exc:
            raise
        raise cause from None
    app.observers.transfer_finished(transfer=transfer)
