"""Checks of values from users and files: each raises one ValueError line that names the value
and the rule it breaks. Shared by every config of the package (layers, model, training, BitNet,
schedules) so that one rule is worded one way."""

from __future__ import annotations

import dataclasses
import math
from typing import Any


def positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: must be a positive integer" + (" or None" if allow_none else ""))


def non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r}: must be a non-negative integer")


def boolean(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: must be true or false" + (" or None" if allow_none else ""))


def number(name: str, value: Any, *, low: float, high: float | None = None,
           low_inclusive: bool = True, high_inclusive: bool = True) -> None:
    """A finite real number in the interval from ``low`` to ``high`` (None: unbounded)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: must be a finite number")
    ok = value >= low if low_inclusive else value > low
    if high is not None:
        ok = ok and (value <= high if high_inclusive else value < high)
    if not ok:
        lo = "[" if low_inclusive else "("
        hi = "" if high is None else (f"{high}]" if high_inclusive else f"{high})")
        raise ValueError(f"{name}={value!r}: must be in {lo}{low}, {hi or 'inf)'}")


def non_negative_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{name}={value!r}: must be a finite non-negative number")


def positive_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name}={value!r}: must be a finite positive number")


def known_fields(what: str, cls: type, fields: dict[Any, Any]) -> None:
    """Unknown or missing (required) fields of a dataclass to build from a file."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in fields if k not in known), key=repr)
    if unknown:
        raise ValueError(f"{what} has unknown fields {unknown}")
    missing = [name for name, f in known.items() if name not in fields
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{what} lacks the required fields {missing}")
