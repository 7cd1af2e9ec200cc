"""Options of the ``posix`` storage type.

The defaults mirror the deployment moverd replaces (``LTS_READ_LIMIT=4``/``LTS_WRITE_LIMIT=4``) and
the waits are generous but bounded, because an LTS share that is full or an HSM that is slow to
recall should make a transfer wait rather than fail, yet never hang it forever.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator

from moverd import ByteSize, Duration, Options, PositiveDuration


class PosixOptions(Options):
    """Options of one POSIX directory (the LTS share, or a local landing/source folder)."""

    # ``create`` comes before ``root`` so that the root validator can see it.
    create: bool = Field(
        default=False,
        description="Create the root on first use; when false it must already exist.",
    )
    root: Path = Field(description="The directory every key is relative to; nothing outside is touched.")
    read_limit: int = Field(default=4, ge=1, description="Concurrent datablock reads (LTS_READ_LIMIT).")
    write_limit: int = Field(default=4, ge=1, description="Concurrent datablock writes (LTS_WRITE_LIMIT).")
    min_free: ByteSize = Field(default=0, description="Free bytes to keep after a datablock is written.")
    free_space_timeout: Duration = Field(default=3600.0, description="How long to wait for free space.")
    free_space_poll: PositiveDuration = Field(default=10.0, description="Free-space polling interval.")
    free_space_report: PositiveDuration = Field(
        default=60.0, description="While waiting for free space, log what it waits for this often."
    )
    offline_timeout: Duration = Field(default=3600.0, description="How long to wait for an HSM recall.")
    offline_poll: PositiveDuration = Field(default=5.0, description="HSM recall polling interval.")
    offline_poll_max: PositiveDuration = Field(
        default=60.0, description="With a recall_command: the polling interval doubles up to this."
    )
    recall_command: list[str] | None = Field(
        default=None,
        description="Command that asks the HSM to recall an offline file, '{path}' standing for its real "
        "path (e.g. [\"dmget\", \"{path}\"], or [\"dd\", \"if={path}\", \"of=/dev/null\", \"bs=1\", "
        "\"count=1\"] where the HSM recalls on a read). Set: a retrieval runs it for every offline "
        "datablock first and shows the recalls as restores; unset: moverd only waits for the recall.",
    )
    recall_timeout: PositiveDuration = Field(
        default=600.0, description="Longest the recall command may run before it is killed (a system error)."
    )
    fsync: bool = Field(
        default=True,
        description="fsync each file and its directory on commit (durability; only tests turn it off).",
    )
    overwrite: bool = Field(
        default=True,
        description="A commit replaces a file already at its key. When false, it fails instead "
        "(TargetExistsError, a user error) and leaves that file as it is, even one created while the "
        "writer ran: what ``moverd retrieve`` uses unless given --overwrite.",
    )
    direct_io: bool = Field(
        default=True,
        description="Write datablocks of 64 MiB and more around the page cache (O_DIRECT) where the "
        "file system takes it; turn it off if direct writes are slow on this share.",
    )

    @field_validator("root")
    @classmethod
    def _root_exists(cls, root: Path, info: ValidationInfo) -> Path:
        # Checked here rather than at first use so that ``moverd config check`` reports a missing
        # share (typically: not mounted) before any job runs.
        root = root.expanduser()
        if info.data.get("create", False):
            if root.exists() and not root.is_dir():
                raise ValueError(f"root '{root}' is not a directory")
            return root
        if not root.exists():
            raise ValueError(f"root '{root}' does not exist")
        if not root.is_dir():
            raise ValueError(f"root '{root}' is not a directory")
        return root
