"""The base of every configuration object: frozen, strict pydantic models, one-line errors.

:class:`Section` is a frozen pydantic v2 model that refuses unknown keys. The field types below
are strict where YAML could smuggle in the wrong kind of value (``'8'`` for an integer, ``yes``
for a string) and accept lists where a tuple is meant. :func:`validate` builds a section from
a mapping and turns pydantic's :class:`~pydantic.ValidationError` into ONE
:class:`~pipeline.core.errors.ConfigError` line naming the place and the key::

    configs/x.yaml: segment.block: expected an integer, got 'a'
    site.yaml: cluster: unknown key(s) worker; allowed: kind, workers, ...

:func:`load_yaml` reads a profile. Used by :mod:`pipeline.core.settings` (run profiles),
:mod:`pipeline.compute.cluster` (:class:`~pipeline.compute.cluster.ClusterSpec`) and
:mod:`pipeline.compute.slurm` (site options). Imports pydantic, PyYAML and the standard library.
"""

from __future__ import annotations

import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Strict, ValidationError

from pipeline.core.errors import ConfigError

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # ints are accepted (and become floats), strings are not
Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]


def _length(n: int) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if isinstance(value, list | tuple) and len(value) != n:
            raise ValueError(f"expected {n} values, got {len(value)}")
        return value

    return check


Pair = Annotated[tuple[Int, Int], BeforeValidator(_length(2))]
Triple = Annotated[tuple[Int, Int, Int], BeforeValidator(_length(3))]
FloatTriple = Annotated[tuple[Float, Float, Float], BeforeValidator(_length(3))]

S = TypeVar("S", bound="Section")


class Section(BaseModel):
    """A frozen, strict configuration section; direct construction errors are ConfigError too.

    ``SECTION`` names the section in errors when the object is built in code
    (``ClusterSpec(workers=0)`` -> ``cluster.workers: must be >= 1, got 0``); ``FLAT`` lists
    fields whose keys are written one level up in the file (left out of error paths).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=False)
    SECTION: ClassVar[str] = ""
    FLAT: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise config_error(exc, type(self), self.SECTION or type(self).__name__, top=False) from None

    # Only a direct call comes through here: nested sections are validated by pydantic-core as
    # usual (so their errors keep their full key path), as for pydantic's own __init__.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file and the line."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file does not exist; check the path")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}: is not valid YAML{where}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: must hold a mapping of sections at the top level")
    return data


def parse_section(data: Any, cls: type[S], where: str) -> S:
    """``cls`` from the mapping ``data``; errors read ``WHERE.key: problem``."""
    return validate(cls, data, where)


def validate(cls: type[S], data: Any, where: str, *, top: bool = False) -> S:
    """``cls`` from ``data`` (a mapping; None means empty), errors naming ``where``.

    Args:
        cls: the section class.
        data: the mapping read from YAML (or flow parameters).
        where: the place to name: ``"FILE: section"`` (keys follow after ``.``) or, with
            ``top=True``, the file itself (keys follow after ``": "``).
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    try:
        return cls.model_validate(dict(data))
    except ValidationError as exc:
        raise config_error(exc, cls, where, top=top) from None


# ------------------------------------------------------------------------------ error lines


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The Section classes an annotation can hold (``X``, ``X | None``, ``Annotated[X, ...]``)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def _walk(model: type[BaseModel], loc: Sequence[int | str]) -> tuple[list[str], type[BaseModel] | None]:
    """Dotted key path of an error location (union member tags dropped) and the innermost model."""
    parts: list[str] = []
    current: type[BaseModel] | None = model
    owner: type[BaseModel] | None = model
    for item in loc:
        if isinstance(item, int):
            if parts:
                parts[-1] += f"[{item}]"
            continue
        if current is not None and item in current.model_fields:
            if item not in getattr(current, "FLAT", frozenset()):
                parts.append(item)
            owner = current
            inner = _models_in(current.model_fields[item].annotation)
            current = inner[0] if len(inner) == 1 else None
            if current is not None:
                owner = current
        elif current is not None:  # a key the model does not have (extra_forbidden)
            parts.append(item)
            current = None
        # else: a union member tag or a mapping key below a plain field: not part of the path
    return parts, owner


def _message(err: Mapping[str, Any]) -> str:
    kind = str(err["type"])
    value = err.get("input")
    ctx = err.get("ctx") or {}
    got = f", got {value!r}"
    simple = {
        "int_type": "expected an integer", "int_parsing": "expected an integer",
        "int_from_float": "expected an integer",
        "bool_type": "expected true/false", "bool_parsing": "expected true/false",
        "float_type": "expected a number", "float_parsing": "expected a number",
        "string_type": "expected a string", "path_type": "expected a path",
        "tuple_type": "expected a list", "list_type": "expected a list", "set_type": "expected a list",
        "dict_type": "expected a mapping of keys", "mapping_type": "expected a mapping of keys",
        "model_type": "expected a mapping of keys", "model_attributes_type": "expected a mapping of keys",
    }
    if kind in simple:
        return simple[kind] + got
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", ""))) or [str(ctx.get("expected", "?"))]
        return f"{value!r} is unknown; use one of {', '.join(choices)}"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", err.get("msg", "")))
    bounds = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
              "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}
    if kind in bounds:
        op, key = bounds[kind]
        limit = ctx.get(key)
        if isinstance(limit, float) and limit.is_integer():
            limit = int(limit)
        return f"must be {op} {limit}, got {value!r}"
    if kind in ("too_long", "too_short"):
        return f"expected {ctx.get('max_length', ctx.get('min_length'))} values, got {ctx.get('actual_length')}"
    return f"{err.get('msg', 'invalid value')}{got}"


def _pick(errors: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The most telling error of the first key that failed: for a union, the member that
    accepted the kind of value given (a wrong list length rather than 'expected an integer')."""
    first = tuple(errors[0]["loc"][:1])
    same = [e for e in errors if tuple(e["loc"][:1]) == first]
    telling = [e for e in same if not str(e["type"]).endswith("_type") and e["type"] != "extra_forbidden"]
    return telling[0] if telling else same[0]


def config_error(exc: ValidationError, model: type[BaseModel], where: str, *, top: bool = False) -> ConfigError:
    """One :class:`ConfigError` line for a pydantic ValidationError of ``model`` (see module doc)."""
    errors = exc.errors(include_url=False)
    sep = ": " if top else "."
    extra = [e for e in errors if e["type"] == "extra_forbidden"]
    if extra:
        parent = tuple(extra[0]["loc"][:-1])
        keys = [str(e["loc"][-1]) for e in extra if tuple(e["loc"][:-1]) == parent]
        parts, owner = _walk(model, parent)
        allowed = [k for k in (owner.model_fields if owner else {}) if k not in getattr(owner, "FLAT", ())]
        if owner is not None:
            for flat in getattr(owner, "FLAT", ()):
                allowed += [k for k in _models_in(owner.model_fields[flat].annotation)[0].model_fields
                            if k not in allowed]
        place = f"{where}{sep}{'.'.join(parts)}" if parts else where
        return ConfigError(f"{place}: unknown key(s) {', '.join(sorted(keys))}; allowed: {', '.join(allowed)}")
    err = _pick(errors)
    loc = list(err["loc"])
    if err["type"] == "missing" and loc and isinstance(loc[-1], str):
        parts, _ = _walk(model, loc[:-1])
        place = f"{where}{sep}{'.'.join(parts)}" if parts else where
        return ConfigError(f"{place}: missing required key {loc[-1]!r}")
    parts, _ = _walk(model, loc)
    place = f"{where}{sep}{'.'.join(parts)}" if parts else where
    return ConfigError(f"{place}: {' '.join(_message(err).split())}")


def path_or_none(value: Path | None) -> Path | None:
    """``value`` made absolute (``~`` expanded), or None."""
    return value.expanduser().absolute() if value is not None else None
