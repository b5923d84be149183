"""The typed-field machinery under `config.py`: one `ConfigError` per problem, naming the key.

`_build(cls, raw, prefix)` turns a YAML mapping into the dataclass `cls` (unknown keys with the
closest valid one, types checked, ints accepted for floats, non-finite numbers refused);
`_choice` / `_at_least` are the checks the sections' `check()` methods share.
"""
import dataclasses
import difflib
import math
import typing
from typing import List

import yaml


class ConfigError(ValueError):
    """A configuration problem, reported as one message naming the key."""


def _parse_override(item):
    key, sep, text = item.partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"override {item!r}: expected Section.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"override {item!r}: value is not a YAML scalar or list") from None
    return key.strip(), value


def _build(cls, raw, prefix):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = _build(hint, value, prefix=f"{key}.")
        else:
            values[key] = _coerce(f"{prefix}{key}", hint, value)
    return cls(**values)


def _coerce(key, hint, value):
    """Check `value` against the field's type; ints are accepted where floats are expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union and type(None) in args:
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _coerce(key, hint, value)
    if origin is typing.Union:  # the first type that takes the value
        for option in args:
            try:
                return _coerce(key, option, value)
            except ConfigError:
                pass
        names = " or ".join(a.__name__ for a in args)
        raise ConfigError(f"{key}: expected {names}, got {value!r} ({type(value).__name__})")
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value)]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return _finite(key, float(value))
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            return _finite(key, number)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")


def _finite(key, value):  # nan / inf would only show up a minute later as a NaN loss
    if math.isfinite(value):
        return value
    raise ConfigError(f"{key}: expected a finite number, got {value}")


def _choice(key, value, allowed):
    if value not in allowed:
        near = difflib.get_close_matches(str(value), list(allowed), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(f"{key}: expected one of {', '.join(allowed)}, got '{value}'{hint}")


def _at_least(key, value, low):
    if value < low:
        raise ConfigError(f"{key}: expected >= {low}, got {value}")
