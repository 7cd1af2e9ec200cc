"""What observer hooks are told about a transfer in progress."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class Transfer:
    """One archive, retrieve or verify of one dataset.

    ``bytes_total``/``bytes_done`` count payload bytes (the files' contents), which is what a
    person watching progress cares about; tar headers are not counted.
    """

    kind: Literal["archive", "retrieve", "verify", "upload"]
    dataset: str
    bytes_total: int = 0
    bytes_done: int = 0
    files_total: int = 0
    files_done: int = 0
    datablocks_total: int = 0
    datablocks_done: int = 0
    job_id: str | None = None
    restores: dict[str, int] = field(default_factory=dict)
    """Objects this transfer waits to be restored (a tape-class LTS's datablocks, or the files of
    a landing zone in a cold class), counted per state:
    ``requested``, ``in_progress``, ``available`` (:class:`moverd.RestoreState`). Empty when
    none needed a restore."""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started
