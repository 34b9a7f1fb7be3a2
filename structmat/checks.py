"""Argument checks shared by structmat and the packages built on it: one wording for every error.

A bad type is a :class:`TypeError`, a value out of range a :class:`ValueError`; every message starts with ``where``
(the operator or function that was called, e.g. ``"Monarch(12, 20, nblocks=0)"``) and names the argument and the
value it got (only the shape of a tensor, never its entries).

Example:
    >>> from structmat.checks import check_int
    >>> check_int("Dense(3, 5).cost", "batch", 4)
    4
    >>> check_int("Dense(3, 5).cost", "batch", 0)
    Traceback (most recent call last):
        ...
    ValueError: Dense(3, 5).cost: batch must be >= 1, got 0
    >>> check_int("GPT.generate", "top_k", None, optional=True) is None
    True
"""

from __future__ import annotations

import numbers
from typing import Literal, overload

__all__ = ["check_int", "shown"]


def shown(value: object) -> str:
    """``value`` as error messages quote it: its type and repr, but only the shape of a tensor or array (never its
    values).

    Args:
        value: anything.

    Returns:
        ``"<type> <repr>"``, or ``"<type> of shape (...)"`` for an object with a tuple ``shape`` (tensors, arrays).

    Example:
        >>> import torch
        >>> shown(2.5), shown(torch.zeros(3, 5))
        ('float 2.5', 'Tensor of shape (3, 5)')
    """
    shape = getattr(value, "shape", None)
    if isinstance(shape, tuple):  # torch.Size is a tuple
        return f"{type(value).__name__} of shape {tuple(shape)}"
    return f"{type(value).__name__} {value!r}"


@overload
def check_int(
    where: str,
    what: str,
    value: object,
    minimum: int | None = ...,
    maximum: int | None = ...,
    *,
    optional: Literal[False] = ...,
) -> int: ...


@overload
def check_int(
    where: str, what: str, value: object, minimum: int | None = ..., maximum: int | None = ..., *, optional: bool
) -> int | None: ...


def check_int(
    where: str,
    what: str,
    value: object,
    minimum: int | None = 1,
    maximum: int | None = None,
    *,
    optional: bool = False,
) -> int | None:
    """``value`` as a plain ``int``, checked: any integer type but ``bool`` (numpy and torch integer scalars pass).

    Args:
        where: the operator or function being called, first in the message (e.g. ``"Monarch(12, 20, nblocks=0)"``).
        what: the argument's name (e.g. ``"nblocks"`` or ``"ranks[1]"``).
        value: the value to check.
        minimum: the smallest value allowed (None: no lower bound).
        maximum: the largest value allowed (None: no upper bound).
        optional: allow None (returned as is).

    Returns:
        ``int(value)``, or None when ``optional`` and ``value`` is None.

    Raises:
        TypeError: ``value`` is not an integer (a bool, float, string, tensor, ...): ``"{where}: {what} must be an
            int, got float 2.5"``.
        ValueError: ``value`` is out of range: ``"{where}: {what} must be >= 1, got 0"`` (or ``<= maximum``).
            With ``optional`` both errors say ``"must be None or an int >= 1, got ..."``.

    Example:
        >>> check_int("Monarch(12, 20, nblocks=4)", "nblocks", 4)
        4
        >>> check_int("attend", "q_offset", 3, minimum=0, maximum=2)
        Traceback (most recent call last):
            ...
        ValueError: attend: q_offset must be <= 2, got 3
    """
    if optional:
        if value is None:
            return None
        low = "" if minimum is None else f" >= {minimum}"
        high = "" if maximum is None else f"{' and' if low else ''} <= {maximum}"
        kind = f"None or an int{low}{high}"
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{where}: {what} must be {kind}, got {shown(value)}")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise ValueError(f"{where}: {what} must be {kind}, got {value!r}")
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: {what} must be an int, got {shown(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where}: {what} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{where}: {what} must be <= {maximum}, got {value}")
    return int(value)
