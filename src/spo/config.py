"""Typed configs: dataclasses loaded from YAML, with `key=value` overrides, validated on load."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml

from spo.errors import SPOError


def _coerce(name: str, value, annotation):
    """Convert a YAML/CLI value to the field's declared type, or raise SPOError naming the field."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0])
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise SPOError(f"config field {name!r} expects a list, got {value!r}")
        item = args[0] if args else str
        return origin(_coerce(name, v, item) for v in value)
    try:
        if annotation is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if annotation in (int, float, str):
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return annotation(value)
    except (TypeError, ValueError):
        raise SPOError(f"config field {name!r} expects {annotation.__name__}, got {value!r}") from None
    return value


def from_dict(cls, data: dict, where: str = "config", prefix: str = ""):
    """Build dataclass `cls` from a (nested) dict; nested dataclass fields take sub-dicts."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SPOError(f"unknown {where} field(s): {', '.join(prefix + u for u in unknown)}; "
                       f"known fields: {', '.join(sorted(prefix + n for n in names))}")
    values = {}
    for k, v in data.items():
        if dataclasses.is_dataclass(hints[k]):
            if not isinstance(v, dict):
                raise SPOError(f"config field {prefix + k!r} is a group; give its fields ({prefix + k}.NAME=...)")
            values[k] = from_dict(hints[k], v, where, prefix=f"{prefix}{k}.")
        else:
            values[k] = _coerce(prefix + k, v, hints[k])
    try:
        cfg = cls(**values)
    except TypeError as exc:
        raise SPOError(f"{where}: {exc}") from None
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def parse_overrides(pairs: list[str]) -> dict:
    """["a.b=1", "c=x"] -> {"a": {"b": 1}, "c": "x"}."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise SPOError(f"override {pair!r} is not of the form key=value")
        key, value = pair.split("=", 1)
        *groups, leaf = key.strip().split(".")
        node = out
        for g in groups:
            node = node.setdefault(g, {})
        node[leaf] = yaml.safe_load(value) if value.strip() else ""
    return out


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """Dataclass `cls` from a YAML file (optional) updated by `key=value` overrides."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SPOError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise SPOError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise SPOError(f"config file {path} must hold a mapping of field: value")
    data = merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data, where=str(path) if path else "config")


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_plain(cfg), sort_keys=False))


def to_plain(cfg) -> dict:
    """Dataclass -> dict of YAML-safe values (tuples become lists)."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(cfg))))


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v
