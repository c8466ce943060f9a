"""Config dataclasses from `--config FILE` (YAML or JSON, local or in object storage) and flags.

The file first, explicit flags over it; nested dataclass fields are filled from nested
mappings, and anything the dataclass does not know or refuses is a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import yaml

from pipelines.cli.options import UsageError, storage_options
from pipelines.io.storage import StorageOptions, read_bytes, redact, resolve

MAX_CONFIG_BYTES = 1024 * 1024

_C = TypeVar("_C")


def build_config(
    config_type: type[_C],
    args: argparse.Namespace,
    overrides: Mapping[str, Any] | None = None,
    *,
    base: Mapping[str, Any] | None = None,
) -> _C:
    """Build a config dataclass from `--config FILE` and the flags actually given.

    Args:
        config_type: the stage's (frozen) config dataclass; nested dataclass fields are filled
            from nested mappings.
        args: parsed arguments (`args.config` may be None).
        overrides: field → flag value; None values mean "flag not given" and are skipped.
            A dotted key (`"crf.iterations"`) sets a field of a nested config.
        base: field values under the file's (e.g. a demo's smaller settings); nested mappings
            merge field by field.

    Raises:
        UsageError: unreadable file, unknown keys, wrong value types, or a value the config
            dataclass refuses (its ValueError).
        TypeError: an override names a field the dataclass does not have (a bug in the job).
    """
    values: dict[str, Any] = _merged({}, base or {})
    config_path = getattr(args, "config", None)
    if config_path:
        values = _merged(values, load_config_file(config_path, storage_options(args)))
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if not _has_field(config_type, key.split(".")):
            raise TypeError(f"{config_type.__name__} has no field {key!r}")
        _set_dotted(values, key.split("."), value)
    try:
        return _from_mapping(config_type, values, "")
    except UsageError:
        raise
    except (TypeError, ValueError) as e:
        raise UsageError(f"config: {e}") from None


def _merged(values: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`values` with `over` on top; mappings under the same key merge recursively."""
    out = dict(values)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merged(dict(out[key]), value)
        else:
            out[key] = dict(value) if isinstance(value, Mapping) else value
    return out


def load_config_file(path: str, storage: StorageOptions | None = None) -> dict[str, Any]:
    """Read a YAML or JSON config file (local or in object storage) into a mapping.

    `.json` files are parsed as JSON, anything else as YAML (safe loader: no Python tags).
    """
    try:
        data = read_bytes(resolve(path, storage), max_bytes=MAX_CONFIG_BYTES)
    except (OSError, ValueError) as e:
        raise UsageError(f"--config {path}: {redact(str(e))}") from None
    try:
        text = data.decode("utf-8")
        parsed = json.loads(text) if path.lower().endswith(".json") else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"--config {path}: not valid YAML/JSON: {first}") from None
    if parsed is None:
        return {}
    if not isinstance(parsed, dict):
        raise UsageError(f"--config {path}: must hold a mapping of config fields")
    return parsed


def _from_mapping(config_type: type[_C], values: Mapping[str, Any], where: str) -> _C:
    if not dataclasses.is_dataclass(config_type):
        raise TypeError(f"{config_type!r} is not a dataclass")
    fields = {f.name: f for f in dataclasses.fields(config_type) if f.init}
    unknown = sorted(str(k) for k in values if k not in fields)
    if unknown:
        raise UsageError(
            f"unknown config key(s) {', '.join(where + k for k in unknown)} for "
            f"{config_type.__name__}; known: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(config_type)
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        hint = hints[name]
        nested = _dataclass_in(hint)
        if nested is not None and isinstance(value, Mapping):
            base = _default_as_dict(fields[name])
            value = _from_mapping(nested, {**base, **value}, f"{where}{name}.")
        else:
            value = _coerce(value, hint, f"{where}{name}")
        kwargs[name] = value
    return config_type(**kwargs)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Lists → tuples for tuple fields; refuse plainly wrong scalar types."""
    options = _union_members(hint)
    if value is None:
        if type(None) in options or hint is Any:
            return None
        raise UsageError(f"config field {name} must not be null")
    for option in options:
        origin = typing.get_origin(option) or option
        if origin is tuple and isinstance(value, list | tuple):
            return tuple(value)
        if origin is list and isinstance(value, list | tuple):
            return list(value)
    simple = [o for o in options if o in (int, float, str, bool)]
    if simple and len(simple) == len([o for o in options if o is not type(None)]):
        ok = any(
            (o is bool and isinstance(value, bool))
            or (o is int and isinstance(value, int) and not isinstance(value, bool))
            or (o is float and isinstance(value, int | float) and not isinstance(value, bool))
            or (o is str and isinstance(value, str))
            for o in simple
        )
        if not ok:
            wanted = " or ".join(o.__name__ for o in simple)
            raise UsageError(f"config field {name} must be {wanted}, got {value!r}")
        if float in simple and int not in simple and isinstance(value, int):
            return float(value)
    return value


def _union_members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _dataclass_in(hint: Any) -> type | None:
    for option in _union_members(hint):
        if isinstance(option, type) and dataclasses.is_dataclass(option):
            return option
    return None


def _default_as_dict(f: dataclasses.Field[Any]) -> dict[str, Any]:
    if f.default is not dataclasses.MISSING and dataclasses.is_dataclass(f.default):
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        return {}
    if not dataclasses.is_dataclass(default) or isinstance(default, type):
        return {}
    return {g.name: getattr(default, g.name) for g in dataclasses.fields(default) if g.init}


def _has_field(config_type: type, path: list[str]) -> bool:
    current: Any = config_type
    for part in path:
        if current is None or not dataclasses.is_dataclass(current):
            return False
        names = {f.name for f in dataclasses.fields(current)}
        if part not in names:
            return False
        current = _dataclass_in(typing.get_type_hints(current)[part])
    return True


def _set_dotted(values: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        child = values.get(part)
        if not isinstance(child, dict):
            child = {}
            values[part] = child
        values = child
    values[path[-1]] = value
