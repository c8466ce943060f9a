"""Config dataclasses from `--config FILE` (YAML or JSON, local or in object storage) and flags.

The file first, explicit flags over it; `weakclip.config.from_dict` turns the merged mapping into
the dataclass, and anything it does not know or refuses is a usage error.
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
from weakclip.config import from_dict

MAX_CONFIG_BYTES = 1024 * 1024
NULL: Any = object()  # an override that sets its field to None (a plain None is "not given")

_C = TypeVar("_C")


def build_config(
    config_type: type[_C],
    args: argparse.Namespace,
    overrides: Mapping[str, Any] | None = None,
    *,
    base: Mapping[str, Any] | None = None,
) -> _C:
    """The config dataclass `config_type` (nested mappings fill nested dataclasses) of `base`
    (e.g. a demo's settings), then `--config FILE`, then `overrides`: field (dotted for a nested
    config's, `"crf.iterations"`) → flag value, None for "not given", `NULL` to set None.

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
        _set_dotted(values, key.split("."), None if value is NULL else value)
    try:
        return from_dict(values, config_type)
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
    """A config file (local or in object storage) as a mapping: `.json` files parsed as JSON,
    anything else as YAML (safe loader: no Python tags)."""
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


def _has_field(config_type: type, path: list[str]) -> bool:
    current: Any = config_type
    for part in path:
        if current is None or not dataclasses.is_dataclass(current):
            return False
        names = {f.name for f in dataclasses.fields(current)}
        if part not in names:
            return False
        hint = typing.get_type_hints(current)[part]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        members = typing.get_args(hint) if union else (hint,)
        current = next((m for m in members if dataclasses.is_dataclass(m)), None)
    return True


def _set_dotted(values: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        if not isinstance(values.get(part), dict):
            values[part] = {}
        values = values[part]
    values[path[-1]] = value
