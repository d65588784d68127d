"""Checks of the integer arguments the runtime's public methods take."""

from __future__ import annotations

import operator


def integer(value, name: str, *, what: str = "an int") -> int:
    """`value` as a Python int: any integer (a length or seed read through numpy too), but
    not a bool and not a float."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be {what}, got {value!r}.") from None


def count(value, name: str, *, least: int) -> int:
    """`value` as an int >= least."""
    value = integer(value, name)
    if value < least:
        raise ValueError(f"{name} must be >= {least}, got {value}.")
    return value
