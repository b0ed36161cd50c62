"""Per-collection rule settings: the defaults in code (rules.RulesConfig), overridden by a small
JSON document stored with the collection, e.g. ``{"geometry": {"max_slices": 500}}``.

Settings are addressed as dotted paths (``geometry.max_slices``,
``geometry.tolerances.orientation``, ``burned_in.enabled``) and typed by the dataclass fields
they land on, so a wrong name or value is refused when it is set, not when a series is judged."""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import fields, is_dataclass, replace
from functools import cache
from typing import Any, Literal, Union

from .errors import CurationError
from .rules import RulesConfig

Overrides = dict[str, Any]
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", ""}


class RuleSettingError(CurationError):
    """A rule setting that does not exist or cannot take the value given."""


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _settable(hint: Any) -> bool:
    """Whether values of this type can be written as text (a callable or tuples cannot)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return all(_settable(a) for a in typing.get_args(hint))
    if origin is frozenset:
        return typing.get_args(hint) == (str,)
    return hint in (bool, int, float, str, type(None)) or origin is Literal


def _coerce(path: str, hint: Any, value: Any) -> Any:
    """value (text from a command line, or JSON) as the field's type; RuleSettingError if not."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if type(None) in args and (value is None or str(value).strip().lower() in _NONE):
            return None
        for arg in (a for a in args if a is not type(None)):
            return _coerce(path, arg, value)
    if origin is frozenset:
        many = isinstance(value, list | tuple | frozenset | set)
        items = value if many else str(value).split(",")
        return frozenset(str(i).strip() for i in items if str(i).strip())
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise RuleSettingError(f"{path} is one of {', '.join(map(str, allowed))}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise RuleSettingError(f"{path} is true or false, not {value!r}")
    if hint in (int, float):
        try:
            number = hint(value)
        except (TypeError, ValueError):
            raise RuleSettingError(f"{path} is a number ({hint.__name__})") from None
        if number < 0:
            raise RuleSettingError(f"{path} cannot be negative")
        return number
    if hint is str:
        return str(value)
    raise RuleSettingError(f"{path} cannot be set")


def _field(cls: type, path: str, name: str) -> Any:
    hint = _hints(cls).get(name)
    if hint is None:
        known = ", ".join(f.name for f in fields(cls))
        raise RuleSettingError(f"{path}: no such setting (known here: {known})")
    return hint


def _apply(obj: Any, parts: list[str], value: Any, path: str) -> Any:
    hint = _field(type(obj), path, parts[0])
    current = getattr(obj, parts[0])
    if is_dataclass(current):
        if len(parts) == 1:
            if not isinstance(value, Mapping):
                raise RuleSettingError(f"{path} is a group of settings; name one of them")
            for key, inner in value.items():
                current = _apply(current, [key], inner, f"{path}.{key}")
            return replace(obj, **{parts[0]: current})
        return replace(obj, **{parts[0]: _apply(current, parts[1:], value, path)})
    if len(parts) > 1:
        raise RuleSettingError(f"{path}: {parts[0]} has no settings under it")
    if not _settable(hint):
        raise RuleSettingError(f"{path} cannot be set from a collection's settings")
    return replace(obj, **{parts[0]: _coerce(path, hint, value)})


def config_from(overrides: Mapping[str, Any] | None) -> RulesConfig:
    """The collection's RulesConfig: the defaults with its stored overrides applied."""
    config = RulesConfig()
    for rule, settings in (overrides or {}).items():
        config = _apply(config, [rule], settings, rule)
    return config


def set_value(overrides: Mapping[str, Any], path: str, raw: str | None) -> Overrides:
    """New overrides with one dotted setting set (raw text), or removed when raw is None.
    The result is checked by building the config from it."""
    parts = [p for p in path.strip().split(".") if p]
    if len(parts) < 2:
        raise RuleSettingError(f"{path}: name a rule and a setting, e.g. geometry.max_slices")
    updated: Overrides = json.loads(json.dumps(overrides or {}))
    node = updated
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RuleSettingError(f"{path}: {part} has no settings under it")
    if raw is None:
        node.pop(parts[-1], None)
    else:
        probe = _apply(RulesConfig(), parts, raw, path)  # type-checks the value
        node[parts[-1]] = _jsonable(_lookup(probe, parts))
    config_from(updated)
    return _pruned(updated)


def _lookup(obj: Any, parts: list[str]) -> Any:
    for part in parts:
        obj = getattr(obj, part)
    return obj


def _jsonable(value: Any) -> Any:
    return sorted(value) if isinstance(value, frozenset) else value


def _pruned(node: Overrides) -> Overrides:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            value = _pruned(value)
            if not value:
                continue
        out[key] = value
    return out


def describe(config: RulesConfig) -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every setting that can be set, in order."""
    yield from _walk(config, "")


def _walk(obj: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    for f in fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}{f.name}"
        if is_dataclass(value):
            yield from _walk(value, path + ".")
        elif _settable(_hints(type(obj))[f.name]):
            yield path, _jsonable(value)
