"""Request-body validation as SciCat's global ValidationPipe does it, built from the SDK models.

scicat-sdk-py 5.3.3 gives the field names (aliases), required-ness and types of every DTO, but
pydantic drops unknown keys and is looser than the backend's class-validator. So each DTO is turned
into a :class:`Schema` (whitelist + one rule per field) and checked the backend's way:

* unknown keys: ``property X should not exist`` (``dataFileList.0.property X should not exist``
  inside validated nested objects);
* strict types: strings are strings, booleans are booleans, dates are ISO-8601 *strings*, numbers
  are numbers (never booleans), objects are objects;
* per-DTO overrides where the backend is stricter than the SDK (``@IsInt`` sizes, non-empty
  ``chkAlg``, non-empty ``dataFileList``/``datasetList``);
* finally the SDK model itself must accept the body, so nothing passes that the SDK rejects.

Messages follow class-validator's wording (``size must be an integer number``).
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Union, get_args, get_origin

import scicat_sdk_py
from annotated_types import MinLen
from pydantic import BaseModel, ValidationError

_MISSING = object()


@dataclass
class Rule:
    kind: str
    """string | boolean | number | integer | date | object | array | nested | any"""
    required: bool = False
    item: Rule | None = None
    """Element rule of an ``array``."""
    schema: Schema | None = None
    """Schema of a ``nested`` object (validated like @ValidateNested)."""
    not_empty: bool = False


@dataclass
class Schema:
    name: str
    rules: dict[str, Rule] = field(default_factory=dict)
    model: type[BaseModel] | None = None

    @property
    def whitelist(self) -> set[str]:
        return set(self.rules)


# --- building schemas from the SDK ------------------------------------------------------------


def _strip_optional(ann: Any) -> Any:
    if get_origin(ann) in (Union, types.UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
        return Union[tuple(args)]  # noqa: UP007 - rebuilt at runtime
    return ann


def _unannotate(ann: Any) -> Any:
    while get_origin(ann) is typing.Annotated:
        ann = get_args(ann)[0]
    return ann


def _rule_for(ann: Any, *, nested_ok: bool = True) -> Rule:
    ann = _unannotate(_strip_optional(ann))
    origin = get_origin(ann)
    if origin in (Union, types.UnionType):
        inner = {_unannotate(a) for a in get_args(ann) if a is not type(None)}
        if inner <= {int, float}:
            return Rule("number")
        return Rule("any")
    if ann is str:
        return Rule("string")
    if ann is bool:
        return Rule("boolean")
    if ann is int:
        return Rule("integer")
    if ann is float:
        return Rule("number")
    if ann is datetime:
        return Rule("date")
    if origin in (dict, typing.Dict) or ann in (dict, typing.Dict):  # noqa: UP006
        return Rule("object")
    if origin in (list, typing.List):  # noqa: UP006
        (arg,) = get_args(ann) or (Any,)
        return Rule("array", item=_rule_for(arg, nested_ok=nested_ok))
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        if nested_ok:
            return Rule("nested", schema=schema_from_sdk(ann))
        return Rule("object")
    return Rule("any")


_CACHE: dict[str, Schema] = {}


def schema_from_sdk(
    model: type[BaseModel],
    *,
    overrides: dict[str, Rule] | None = None,
    exclude: set[str] | None = None,
    not_nested: set[str] | None = None,
) -> Schema:
    """A Schema for ``model``: every alias is whitelisted, rules derive from the annotations."""
    key = f"{model.__name__}:{sorted((overrides or {}).items(), key=lambda kv: kv[0])!r}"
    key += f":{sorted(exclude or ())}:{sorted(not_nested or ())}"
    if key in _CACHE:
        return _CACHE[key]
    schema = Schema(model.__name__, model=model)
    for name, info in model.model_fields.items():
        wire = info.alias or name
        if exclude and wire in exclude:
            continue
        rule = _rule_for(info.annotation, nested_ok=not (not_nested and wire in not_nested))
        rule.required = info.is_required()
        if any(isinstance(m, MinLen) and m.min_length >= 1 for m in info.metadata):
            rule.not_empty = True
        schema.rules[wire] = rule
    for wire, rule in (overrides or {}).items():
        schema.rules[wire] = rule
    _CACHE[key] = schema
    return schema


# --- checking --------------------------------------------------------------------------------


def _is_iso_date(v: Any) -> bool:
    if not isinstance(v, str) or len(v) < 4:
        return False
    try:
        datetime.fromisoformat(v.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return False
    return True


_TYPE_MESSAGES = {
    "string": "{p} must be a string",
    "boolean": "{p} must be a boolean value",
    "number": "{p} must be a number conforming to the specified constraints",
    "integer": "{p} must be an integer number",
    "date": "{p} must be a valid ISO 8601 date string",
    "object": "{p} must be an object",
    "array": "{p} must be an array",
    "nested": "nested property {p} must be either object or array",
}


def _type_ok(kind: str, v: Any) -> bool:
    if kind == "string":
        return isinstance(v, str)
    if kind == "boolean":
        return isinstance(v, bool)
    if kind == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # not NaN
    if kind == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "date":
        return _is_iso_date(v)
    if kind in ("object", "nested"):
        return isinstance(v, dict)
    if kind == "array":
        return isinstance(v, list)
    return True


def _check_value(rule: Rule, value: Any, prop: str, prefix: str, out: list[str]) -> None:
    if not _type_ok(rule.kind, value):
        out.append(prefix + _TYPE_MESSAGES[rule.kind].format(p=prop))
        return
    if rule.not_empty and value in ("", [], {}):
        out.append(f"{prefix}{prop} should not be empty")
        return
    if rule.kind == "array" and rule.item is not None:
        for i, item in enumerate(value):
            if rule.item.kind == "nested" and rule.item.schema is not None:
                if not isinstance(item, dict):
                    out.append(f"{prefix}nested property {prop} must be either object or array")
                    continue
                check_schema(rule.item.schema, item, out, prefix=f"{prefix}{prop}.{i}.")
            elif not _type_ok(rule.item.kind, item):
                out.append(prefix + _TYPE_MESSAGES[rule.item.kind].format(p=f"each value in {prop}"))
                break
    elif rule.kind == "nested" and rule.schema is not None:
        check_schema(rule.schema, value, out, prefix=f"{prefix}{prop}.")


def check_schema(schema: Schema, body: dict[str, Any], out: list[str], prefix: str = "") -> None:
    for key in body:
        if key not in schema.rules:
            out.append(f"{prefix}property {key} should not exist")
    for prop, rule in schema.rules.items():
        value = body.get(prop, _MISSING)
        if value is _MISSING or value is None:
            if rule.required:
                kind = "nested" if rule.kind == "nested" else rule.kind
                out.append(prefix + _TYPE_MESSAGES.get(kind, "{p} should not be empty").format(p=prop))
            continue
        _check_value(rule, value, prop, prefix, out)


def validate(schema: Schema, body: Any) -> list[str]:
    """Error messages for ``body`` (empty list when valid), in class-validator's words."""
    if not isinstance(body, dict):
        return ["an instance of " + schema.name + " should be an object"]
    out: list[str] = []
    check_schema(schema, body, out)
    if not out and schema.model is not None:
        try:
            schema.model.model_validate(body)
        except ValidationError as exc:  # the SDK must agree: never accept what it rejects
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"])
                out.append(f"{loc}: {err['msg']}")
    return out


# --- the DTOs the fake server validates --------------------------------------------------------


def sdk_model(name: str) -> type[BaseModel]:
    """A model class of scicat-sdk-py (the package has no ``__all__``, hence the lookup)."""
    cls = getattr(scicat_sdk_py, name)
    assert isinstance(cls, type) and issubclass(cls, BaseModel), name
    return cls


_INT = Rule("integer", required=True)
_CHK_ALG = Rule("string", not_empty=True)


def credentials() -> Schema:
    return schema_from_sdk(sdk_model("CredentialsDto"))


def update_job_v3() -> Schema:
    return schema_from_sdk(sdk_model("UpdateJobDtoV3"))


def update_job_v4() -> Schema:
    return schema_from_sdk(sdk_model("UpdateJobDto"))


def create_job_v3() -> Schema:
    s = schema_from_sdk(sdk_model("CreateJobDtoV3"))
    s.rules["datasetList"].not_empty = True
    return s


def create_job_v4() -> Schema:
    return schema_from_sdk(sdk_model("CreateJobDto"))


def dataset_list_entry() -> Schema:
    return schema_from_sdk(sdk_model("DatasetListDto"))


def lifecycle() -> Schema:
    return schema_from_sdk(sdk_model("PartialUpdateDatasetLifecycleDto"))


def dataset_v3_patch(dataset_type: str) -> Schema:
    """PartialUpdateRaw/DerivedDatasetObsoleteDto; ``datasetlifecycle`` is not nested-validated."""
    model = sdk_model("PartialUpdateDerivedDatasetObsoleteDto") if dataset_type == "derived" else (
        sdk_model("PartialUpdateRawDatasetObsoleteDto")
    )
    return schema_from_sdk(model, not_nested={"datasetlifecycle"})


def create_dataset_datablock() -> Schema:
    return schema_from_sdk(
        sdk_model("CreateDatasetDatablockDto"),
        overrides={"size": _INT, "packedSize": _INT, "chkAlg": _CHK_ALG},
    )


def create_datablock() -> Schema:
    return schema_from_sdk(
        sdk_model("CreateDatablockDto"),
        overrides={"size": _INT, "packedSize": _INT, "chkAlg": _CHK_ALG},
    )


def data_file() -> Schema:
    return schema_from_sdk(sdk_model("DataFile"))


LIFECYCLE_FIELDS: tuple[str, ...] = tuple(
    (f.alias or n) for n, f in sdk_model("PartialUpdateDatasetLifecycleDto").model_fields.items()
)
