"""moverd's configuration: a TOML file, overridden by ``MOVERD_*`` environment variables.

The file is ``--config PATH`` or ``$MOVERD_CONFIG``; with neither, moverd runs on its embedded
default (everything under the state directory: landing zone, LTS, retrieval area, local catalog).
Environment variables override single keys, nested with ``__``:
``MOVERD_PIPELINE__TARGET_SIZE=1GiB``, ``MOVERD_STORAGES__LTS__ROOT=/mnt/lts``.

Storage and catalog sections are validated by the plugin that provides their ``type``, so this
module only knows their shape, not their keys. The engine's :class:`Settings` holds only the
engine's sections and passes over the others: the layers above declare their own
(``moverd_daemon.settings.DaemonSettings`` adds ``[server]`` and ``[scheduler]``) and load the
file with their class, which refuses unknown keys everywhere.
"""

from __future__ import annotations

import os
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from .errors import ConfigError
from .registry import format_validation_error
from .storage import LOCAL_STORAGE_TYPE
from .units import ByteSize, Duration, format_size

ROLES = ("landing", "lts", "retrieval")
"""Storage names with a meaning: archive reads ``landing`` and writes ``lts``; retrieve jobs
write to ``retrieval``."""

MAX_URL_EXPIRY = timedelta(days=7)


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "moverd"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PipelineSettings(_Section):
    target_size: ByteSize = Field(20 * 1024**3, gt=0)
    """At most this many unpacked bytes per datablock (a bigger file gets one of its own)."""
    chunk_size: ByteSize = Field(1024**2, ge=64 * 1024, le=64 * 1024**2)
    """Size of the reusable buffers bytes travel in."""
    buffer_budget: ByteSize = Field(64 * 1024**2, ge=1024**2)
    """Memory for read-ahead across all files in flight."""
    prefetch_files: int = Field(32, ge=1, le=1024)
    """Files read ahead concurrently (hides S3 request latency for small files)."""
    prefetch_bytes: ByteSize = Field(32 * 1024**2, ge=64 * 1024)
    """Bytes of the files read at once (a file counts at most a quarter of it): enough to keep
    a nearby source busy; raise it for a distant one (bandwidth times latency)."""
    checksum: str = "md5"
    """Per-file checksum algorithm recorded in the catalog."""
    datablock_concurrency: int = Field(2, ge=1, le=64)
    """Datablocks of one dataset in flight at once: one streams from the source, the others
    commit, verify and register meanwhile."""

    @model_validator(mode="after")
    def _budget(self) -> PipelineSettings:
        if self.buffer_budget < self.chunk_size:
            raise ValueError(
                f"buffer_budget ({format_size(self.buffer_budget)}) must be at least "
                f"chunk_size ({format_size(self.chunk_size)})"
            )
        return self


class ArchiveSettings(_Section):
    landing_prefix: str = "{pid}"
    """Where a dataset's files are in the landing storage; ``{pid}`` is the dataset id."""
    delete_landing: bool = True
    """Delete landing-zone files once every datablock is committed, verified and registered."""


class RetrieveSettings(_Section):
    url_expiry: Duration = MAX_URL_EXPIRY.total_seconds()
    """How long download links stay valid (at most 7 days, SigV4's limit)."""
    retrieval_prefix: str = "{pid}"
    wait_timeout: Duration = 6 * 3600
    """How long a retrieve waits for another job already copying the same dataset."""

    @field_validator("url_expiry")
    @classmethod
    def _max_expiry(cls, v: float) -> float:
        if v <= 0 or v > MAX_URL_EXPIRY.total_seconds():
            raise ValueError("must be more than 0 and at most 7 days (604800 s)")
        return v


class Settings(BaseSettings):
    """The engine's sections. Top-level keys of other layers are passed over here (``ignore``);
    a layer's subclass sets ``extra="forbid"`` so that a typo anywhere is still an error."""

    model_config = SettingsConfigDict(
        env_prefix="MOVERD_", env_nested_delimiter="__", extra="ignore", case_sensitive=False
    )

    state_dir: Path = Field(default_factory=default_state_dir)
    log_level: str = "INFO"
    plugins: list[str] = Field(default_factory=list)
    """Extra plugin modules to load (importable names), e.g. a site's own observer or storage
    wrapper, without packaging them as ``moverd.plugins`` entry points. Engine-wide, so that the
    daemon, every command and a flow run on a plain Prefect worker see the same plugins."""
    pipeline: PipelineSettings = PipelineSettings()
    archive: ArchiveSettings = ArchiveSettings()
    retrieve: RetrieveSettings = RetrieveSettings()
    storages: dict[str, dict[str, Any]] = Field(default_factory=dict)
    catalog: dict[str, Any] = Field(default_factory=lambda: {"type": "local"})

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file (passed as init kwargs).
        return (env_settings, init_settings)

    @field_validator("state_dir")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser().absolute()

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        for role in ROLES:
            default = {"type": LOCAL_STORAGE_TYPE, "root": str(self.state_dir / role), "create": True}
            section = self.storages.get(role)
            if section is None:
                self.storages[role] = default
            elif isinstance(section, dict) and "type" not in section:
                # A partial section (``MOVERD_STORAGES__LTS__ROOT=/x``) overrides keys of the
                # embedded default; it does not replace it.
                self.storages[role] = {**default, **section}
        for name, section in self.storages.items():
            if not isinstance(section, dict) or not isinstance(section.get("type"), str):
                raise ValueError(f"storages.{name}: needs a 'type' (e.g. \"posix\" or \"s3\")")
        if not isinstance(self.catalog.get("type"), str):
            raise ValueError("catalog: needs a 'type' (e.g. \"local\" or \"scicat\")")
        return self

    def storage_options(self, name: str) -> tuple[str, dict[str, Any]]:
        section = dict(self.storages[name])
        return section.pop("type"), section

    def catalog_options(self) -> tuple[str, dict[str, Any]]:
        section = dict(self.catalog)
        return section.pop("type"), section


def config_path(explicit: str | Path | None) -> Path | None:
    """The config file to read: ``--config``, else ``$MOVERD_CONFIG``, else none."""
    chosen = explicit or os.environ.get("MOVERD_CONFIG") or None
    return Path(chosen).expanduser() if chosen else None


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {str(path)!r} is a directory") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None


S = TypeVar("S", bound=Settings)


def load_settings(path: str | Path | None = None, cls: type[S] = Settings) -> S:  # type: ignore[assignment]
    """Read and validate the configuration as ``cls`` (a layer's settings class, or the engine's);
    raise ConfigError listing every problem."""
    file = config_path(path)
    data = read_toml(file) if file else {}
    try:
        return cls(**data)
    except SettingsError as exc:  # an environment variable that does not parse
        raise ConfigError(f"environment: {exc}") from None
    except ValidationError as exc:
        where = f"in {file}: " if file else ""
        lines = format_validation_error("", exc, cls)
        raise ConfigError("\n".join(where + line for line in lines)) from None
