"""Config dataclasses ↔ plain nested dicts: the JSON-able form of checkpoints and `--config` files.

`to_dict` turns tuples into lists; `from_dict` loads any config dataclass (the model's and the
pipeline stages'): it type-checks every value, refuses fields it does not know and names an
offending field by its dotted path. Pure: reading files is the caller's (`pipelines.cli.config`).
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

    Fields missing from `data` keep their value in `base` (default: the dataclass defaults, a
    nested dataclass's `default_factory` value included), so a file may name only what it
    changes. Values are type-checked; lists become tuples for tuple fields, ints floats.

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
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown field(s) {', '.join(prefix + u for u in unknown)} in {where}; "
            f"known: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        current = getattr(base, name) if base is not None else _default(fields[name])
        kwargs[name] = _convert(value, hints[name], current, path=prefix + name)
    try:
        if base is not None:
            return dataclasses.replace(base, **kwargs)  # type: ignore[type-var]
        return cls(**kwargs)
    except ValueError as error:
        # Validation messages start with the field name: prefixing gives its dotted path.
        raise ValueError(f"{prefix}{error}") from None


def _default(f: dataclasses.Field[Any]) -> Any:
    """A field's default (its factory's value), the base a partial nested mapping fills in."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


_SCALARS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


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
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        base = current if dataclasses.is_dataclass(current) else None
        return _from_dict(value, hint, base, prefix=path + ".")  # type: ignore[arg-type]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{path} must be a list, got {type(value).__name__}")
        items = typing.get_args(hint)
        if len(items) == 2 and items[1] is Ellipsis:
            items = (items[0],) * len(value)
        elif len(items) != len(value):
            raise ValueError(f"{path} must hold {len(items)} values, got {len(value)}")
        return tuple(
            _convert(v, h, None, path=f"{path}[{i}]")
            for i, (v, h) in enumerate(zip(value, items, strict=True))
        )
    if hint not in _SCALARS:
        raise TypeError(f"{path}: unsupported field type {hint!r}")
    is_bool = isinstance(value, bool)
    ok = {
        bool: is_bool,
        int: isinstance(value, int) and not is_bool,
        float: isinstance(value, int | float) and not is_bool,
        str: isinstance(value, str),
    }[hint]
    if not ok:
        raise ValueError(f"{path} must be {_SCALARS[hint]}, got {value!r}")
    return float(value) if hint is float else value
