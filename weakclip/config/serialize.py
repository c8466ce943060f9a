"""Config dataclasses ↔ plain nested dicts: the JSON-able form of checkpoints and `--config` files.

`to_dict` turns tuples into lists; `from_dict` type-checks every value, refuses fields it does
not know and names an offending field by its dotted path.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from weakclip.config.components import WeakCLIPConfig


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-able nested dict of a config dataclass (tuples become lists)."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"expected a config dataclass instance, got {type(config).__name__}")
    return {f.name: _to_plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    return value


ConfigT = TypeVar("ConfigT")


def from_dict(
    data: Mapping[str, Any],
    cls: type[ConfigT] = WeakCLIPConfig,  # type: ignore[assignment]
    *,
    base: ConfigT | None = None,
) -> ConfigT:
    """Rebuilds a config dataclass from `to_dict` output or a (partial) `--config` file.

    Fields missing from `data` keep their value in `base` (default: the dataclass defaults), so
    a file may name only what it changes. Values are type-checked.

    Args:
        data: nested mapping of field names to values.
        cls: the dataclass to build.
        base: values for the fields `data` leaves out.

    Returns:
        A validated instance of `cls`.

    Raises:
        ValueError: an unknown field, a value of the wrong type, or a value that fails
            validation; the message names the field by its dotted path.
    """
    return _from_dict(data, cls, base, prefix="")


def _from_dict(data: Any, cls: type[ConfigT], base: ConfigT | None, *, prefix: str) -> ConfigT:
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown field(s) {', '.join(prefix + str(u) for u in unknown)} in {where}; "
            f"known: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        current = getattr(base, name) if base is not None else None
        kwargs[name] = _convert(value, hints[name], current, path=prefix + name)
    try:
        if base is not None:
            return dataclasses.replace(base, **kwargs)  # type: ignore[type-var]
        return cls(**kwargs)
    except ValueError as error:
        # Validation messages start with the field name: prefixing gives its dotted path.
        raise ValueError(f"{prefix}{error}") from None


def _convert(value: Any, hint: Any, current: Any, *, path: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            if len(options) == len(typing.get_args(hint)):
                raise ValueError(f"{path} must not be null")
            return None
        (hint,) = options
        origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        base = current if current is not None else None
        return _from_dict(value, hint, base, prefix=path + ".")  # type: ignore[arg-type]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{path} must be a list, got {type(value).__name__}")
        (item_hint, _ellipsis) = typing.get_args(hint)
        return tuple(_convert(v, item_hint, None, path=f"{path}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{path} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{path} must be a string, got {value!r}")
        return value
    raise TypeError(f"{path}: unsupported field type {hint!r}")
