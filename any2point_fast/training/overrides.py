"""Typed values of a run config: YAML and ``--set`` text turned into each field's type.

A recipe file and ``--set section.key=value`` both give loose values (``1e-3`` arrives as a
string from YAML 1.1, ``true`` as a string from a shell); :func:`coerce` converts one value to a
dataclass field's annotation, :func:`from_mapping` builds a whole section, :func:`apply_overrides`
applies ``--set`` assignments to the nested mapping before it is parsed.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal

from ..config import ConfigError


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """``value`` converted to the field type ``annotation`` (YAML and ``--set`` give strings for ``1e-3``)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be None")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation in (int, float):  # an int field takes no float (3.5 is not silently truncated)
        accepted, expected = ((int, str), "an integer") if annotation is int else ((int, float, str), "a number")
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise ConfigError(f"{where}: expected {expected}, got {value!r}")
        try:
            return annotation(value)
        except ValueError:
            raise ConfigError(f"{where}: expected {expected}, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is tuple or annotation is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if args and args[-1] is not Ellipsis:
            return tuple(coerce(v, a, where) for v, a in zip(value, args, strict=False))
        return tuple(value)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def from_mapping(cls: type, data: dict[str, Any], section: str) -> Any:
    """Build dataclass ``cls`` from ``data``, coercing each value; unknown keys are an error."""
    if not isinstance(data, dict):
        raise ConfigError(f"{section}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{section}: unknown keys {unknown}; known keys: {sorted(names)}")
    return cls(**{k: coerce(v, hints[k], f"{section}.{k}") for k, v in data.items()})


def jsonable(value: Any) -> Any:
    """``value`` with tuples turned into lists, recursively (what YAML and JSON write)."""
    if isinstance(value, tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value


def yaml_text(value: Any) -> str:
    """``value`` as it is written in YAML or ``--set`` (``null``, ``true``, ``[0.9, 0.999]``, ``{}``)."""
    return value if isinstance(value, str) else json.dumps(jsonable(value), separators=(",", ":"))


def parse_value(text: str) -> Any:
    """A ``--set`` value: YAML scalars/lists (``16``, ``1e-3``, ``true``, ``null``, ``[1, 2]``), else the text."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` assignments to a nested mapping (a copy), creating sub-mappings as needed."""
    data = json.loads(json.dumps(data))
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ConfigError(f"bad override {assignment!r}: expected section.key=value, e.g. train.lr=1e-3")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"bad override {assignment!r}: {part} is not a section")
            node = child
        node[parts[-1]] = parse_value(text)
    return data


__all__ = ["apply_overrides", "coerce", "from_mapping", "jsonable", "parse_value", "yaml_text"]
