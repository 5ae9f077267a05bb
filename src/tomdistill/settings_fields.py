"""What the schema dataclasses are made of: a field with its help text and allowed values, and the checks their
`__post_init__` rules use. Below every settings module (they import it) and below config_schema.py, which gathers
them into one registry."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from typing import Any, Callable, Iterable

from .errors import UserError


class ConfigSchemaError(ValueError, UserError):
    """A key or value the schema refuses; the message names the full key."""


def setting(help: str, choices: Iterable | None = None, *, default: Any = dataclasses.MISSING,
            default_factory: Callable[[], Any] | Any = dataclasses.MISSING) -> Any:
    """A schema field with its help text and allowed values. The defaults live in the YAML files, so a schema field
    has none, except in a class the code also builds without a config (e.g. `Augmentation()` where the group is
    absent, a loss built by Hydra from its option file): there `default`/`default_factory` keep that default."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return field(default=default, default_factory=default_factory, metadata=metadata)


def expect(ok: bool, key: str, value, expected: str) -> None:
    """Refuse `value` at `key` unless `ok`: one line naming the key, the value and what was expected."""
    if not ok:
        raise ConfigSchemaError(f"{key}={value!r}: expected {expected}")


def is_number(value) -> bool:
    """A finite int or float (a bool is neither here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_whole(value, minimum: int | None = None) -> bool:
    """An int (not a bool), at least `minimum`."""
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


def check_choices(settings, key: str) -> None:
    """Every field with allowed values (`setting(choices=...)`) holds one of them (a list field: each item);
    null passes where the field may be null."""
    for spec in dataclasses.fields(settings):
        choices = spec.metadata.get("choices")
        value = getattr(settings, spec.name)
        if choices is None or value is None:
            continue
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        expect(all(item in choices for item in items), f"{key}.{spec.name}", value,
               ("each item " if isinstance(value, (list, tuple)) else "") + f"one of {list(choices)}")
