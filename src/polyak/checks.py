"""Checks of the numbers users pass (hyper-parameters, step counts), with one message shape for all of them.

``name: expected <what>, got <value>; <what to do>``. Numbers are taken as users hold them: Python numbers,
numpy scalars (``np.int64``, ``np.float32``, ...) and 0-d arrays or tensors, returned as plain ``int`` / ``float``
(so a saved state holds no numpy or tensor value). A bool is never a number here (``True`` would be 1), nor is
a string; a float is never an int, even when its value is whole (``np.float64(3.0)``, a float tensor); NaN and
inf are refused wherever a finite number is expected.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["check_flag", "check_int", "check_number", "plain"]


def plain(value: Any) -> Any:
    """``value`` as Python holds it: a numpy scalar or a 0-d array or tensor becomes its ``int``, ``float``,
    ``bool`` or ``complex``; anything else is returned as given."""
    if type(value) in (bool, int, float):
        return value
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", None) == 0:
        try:
            return item()
        except (RuntimeError, ValueError):  # e.g. a tensor on the meta device holds no value
            return value
    return value


def _refuse(error: type[Exception], name: str, expected: str, value: Any, hint: str) -> Exception:
    return error(f"{name}: expected {expected}, got {plain(value)!r}" + (f"; {hint}" if hint else ""))


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def check_flag(name: str, value: Any) -> bool:
    """``value`` if it is a bool; a named ``TypeError`` otherwise (a string such as "no" would read as True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return value


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> float:
    """``value`` as a float, after checking it is a finite real number (not a bool) within the given bounds.

    Takes Python and numpy numbers and 0-d arrays or tensors. Raises ``TypeError`` for something that is not a
    number, ``ValueError`` for NaN, inf or out of range.
    """
    expected = " ".join(filter(None, ("a finite number", _interval(low, high, low_open, high_open))))
    given = plain(value)
    if isinstance(given, bool) or not isinstance(given, numbers.Real):
        raise _refuse(TypeError, name, expected, value, hint)
    number = float(given)
    if not math.isfinite(number):
        raise _refuse(ValueError, name, expected, value, hint)
    if low is not None and (number <= low if low_open else number < low):
        raise _refuse(ValueError, name, expected, value, hint)
    if high is not None and (number >= high if high_open else number > high):
        raise _refuse(ValueError, name, expected, value, hint)
    return number


def check_int(name: str, value: Any, *, low: int = 0, hint: str = "") -> int:
    """``value`` as an int, after checking it is an integer (not a bool) and at least ``low``.

    Takes Python and numpy integers and 0-d integer arrays or tensors. Raises ``TypeError`` for a float (even
    a whole one), a bool or anything else, ``ValueError`` below ``low``.
    """
    expected = f"an int >= {low}"
    given = plain(value)
    if isinstance(given, bool) or not isinstance(given, numbers.Integral):
        raise _refuse(TypeError, name, expected, value, hint)
    if given < low:
        raise _refuse(ValueError, name, expected, value, hint)
    return int(given)
