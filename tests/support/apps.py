"""An App on a temporary state directory, as the embedded default runs it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from moverd.app import App
from moverd.config import Settings

S = TypeVar("S", bound=Settings)


def make_settings(tmp_path: Path, cls: type[S] = Settings, **overrides: Any) -> S:  # type: ignore[assignment]
    """Settings on ``tmp_path`` (``cls``: the daemon's, for tests of the daemon layer)."""
    pipeline = {"target_size": "1MiB", "chunk_size": "256KiB", "buffer_budget": "8MiB", **overrides.pop("pipeline", {})}
    return cls(state_dir=tmp_path / "state", pipeline=pipeline, **overrides)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    async with App(make_settings(tmp_path)) as a:
        yield a
