"""Base class for the options of storages and catalogs, with secrets read from files.

Every ``SecretStr`` field ``x`` can also be given as ``x_file``: a path whose content (stripped)
is the secret. That is how the facility's deployment keeps secrets (``SCICAT_PASSWORD_FILE``),
and it keeps them out of the TOML file and out of ``config show``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, SecretStr, model_validator


def _is_secret(annotation: Any) -> bool:
    return annotation is SecretStr or SecretStr in get_args(annotation)


def read_secret_file(path: str | Path, what: str) -> SecretStr:
    """Read a secret file, with an error that names the key and the path."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{what}: secret file {str(p)!r} does not exist") from None
    except OSError as exc:
        raise ValueError(f"{what}: cannot read secret file {str(p)!r}: {exc.strerror}") from None
    value = text.strip()
    if not value:
        raise ValueError(f"{what}: secret file {str(p)!r} is empty")
    return SecretStr(value)


class Options(BaseModel):
    """Plugin options: unknown keys are errors, secrets may come from ``*_file`` keys."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _secret_files(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, field in cls.model_fields.items():
            key = f"{name}_file"
            if key in out and _is_secret(field.annotation):
                path = out.pop(key)
                if path in (None, ""):
                    continue
                if name in out and out[name] not in (None, ""):
                    raise ValueError(f"give either {name} or {key}, not both")
                out[name] = read_secret_file(path, key)
        return out
