"""One validator for the configuration dataclasses (``ModelConfig``, ``TrainConfig``,
``SynthConfig``): every rule is a call here, every failure reads the same way::

    ConfigError: <Owner>.<field> = <value> is invalid: <rule>.

and types come from the dataclass's resolved annotations (:func:`typing.get_type_hints`),
never from the annotation's text. Values from YAML or the command line arrive as strings;
:func:`coerce` turns them into the field's type first (``"1e-4"`` → 1e-4, ``"null"`` → None).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Iterable
from typing import Any, NoReturn

from .errors import ConfigError

__all__ = ["FieldChecker", "coerce", "is_int", "is_number"]

_NULL_WORDS = ("none", "null", "~")
_TRUE_WORDS = ("true", "yes", "1", "on")
_FALSE_WORDS = ("false", "no", "0", "off")


def is_int(v: Any) -> bool:
    """An integer, not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class FieldChecker:
    """Checks the fields of one config object; each method raises :class:`ConfigError` in
    the one format above, naming the field, its value and the rule.

    Parameters
    ----------
    obj : the config object.
    owner : the name shown before the field (e.g. ``"TrainConfig"``).
    """

    def __init__(self, obj: Any, owner: str) -> None:
        self.obj = obj
        self.owner = owner

    def fail(self, name: str, rule: str) -> NoReturn:
        value = getattr(self.obj, name)
        raise ConfigError(f"{self.owner}.{name} = {value!r} is invalid: {rule}.")

    def integer(
        self, name: str, minimum: int | None = None, *, optional: bool = False, note: str = ""
    ) -> None:
        """An int (not a bool) >= ``minimum``; None allowed when ``optional``."""
        v = getattr(self.obj, name)
        if optional and v is None:
            return
        rule = "must be an integer" + ("" if minimum is None else f" >= {minimum}")
        if not is_int(v) or (minimum is not None and v < minimum):
            self.fail(
                name, rule + (" or null" if optional else "") + (f" ({note})" if note else "")
            )

    def number(
        self,
        name: str,
        lo: float = -math.inf,
        hi: float = math.inf,
        *,
        lo_open: bool = False,
        hi_open: bool = False,
        optional: bool = False,
        note: str = "",
    ) -> None:
        """A finite number in the interval; open ends excluded."""
        v = getattr(self.obj, name)
        if optional and v is None:
            return
        if is_number(v) and lo <= v <= hi and not ((lo_open and v == lo) or (hi_open and v == hi)):
            return
        if math.isinf(lo) and math.isinf(hi):
            rule = "must be a finite number"
        elif math.isinf(hi):
            rule = f"must be a number {'>' if lo_open else '>='} {lo:g}"
        else:
            left, right = "(" if lo_open else "[", ")" if hi_open else "]"
            rule = f"must be a number in {left}{lo:g}, {hi:g}{right}"
        self.fail(name, rule + (" or null" if optional else "") + (f" ({note})" if note else ""))

    def choice(self, name: str, allowed: Iterable[Any]) -> None:
        allowed = tuple(allowed)
        if getattr(self.obj, name) not in allowed:
            self.fail(name, f"must be one of {', '.join(map(str, allowed))}")

    def boolean(self, name: str, *, optional: bool = False) -> None:
        v = getattr(self.obj, name)
        if not (isinstance(v, bool) or (optional and v is None)):
            self.fail(name, "must be true or false" + (" or null" if optional else ""))

    def int_sequence(self, name: str, minimum: int = 1, *, non_empty: bool = False) -> None:
        """A tuple of ints >= ``minimum``."""
        v = getattr(self.obj, name)
        if not isinstance(v, tuple) or not all(is_int(k) and k >= minimum for k in v):
            self.fail(name, f"must be a list of integers >= {minimum}")
        if non_empty and not v:
            self.fail(name, "must hold at least one value")

    def rule(self, name: str, ok: bool, rule: str) -> None:
        """Any other rule: fail with ``rule`` unless ``ok``."""
        if not ok:
            self.fail(name, rule)


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _base_types(annotation: Any) -> tuple[Any, ...]:
    """``int | None`` → (int, NoneType); ``tuple[int, ...]`` → (tuple,)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for a in typing.get_args(annotation) for t in _base_types(a))
    return (origin or annotation,)


def _tuple_item_type(annotation: Any) -> Any:
    """``tuple[float, float]`` / ``tuple[int, ...]`` → float / int (None when mixed or unknown)."""
    for a in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(a) is tuple:
            items = {t for t in typing.get_args(a) if t is not Ellipsis}
            if len(items) == 1 and next(iter(items)) in (int, float, str):
                return next(iter(items))
    return None


def coerce(cls: type, name: str, value: Any) -> Any:
    """``value`` from YAML / the command line converted to field ``name``'s type when it is
    text (or an integral float for an int field); anything else is returned unchanged for the
    validator to judge."""
    kinds = _base_types(_field_types(cls)[name])
    if value is None:
        return None
    if isinstance(value, str) and type(None) in kinds and value.strip().lower() in _NULL_WORDS:
        return None
    try:
        if int in kinds and not isinstance(value, bool):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            return int(value) if isinstance(value, str) else value
        if float in kinds and not isinstance(value, bool):
            return float(value) if isinstance(value, (str, int)) else value
        if bool in kinds and isinstance(value, str):
            word = value.strip().lower()
            if word in _TRUE_WORDS:
                return True
            if word in _FALSE_WORDS:
                return False
            return value
        if str in kinds and isinstance(value, (int, float)):
            return str(value)
        if tuple in kinds and isinstance(value, (str, list, tuple)):
            if isinstance(value, str):
                parts = value.replace("(", "").replace(")", "").split(",")
                value = [p.strip() for p in parts if p.strip()]
            item = _tuple_item_type(_field_types(cls)[name])
            return tuple(item(v) if item is not None else v for v in value)
    except (TypeError, ValueError):
        return value  # the validator names the field and the rule
    return value
