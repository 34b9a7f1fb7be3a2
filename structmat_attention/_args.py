"""Argument checks shared by the modules of structmat_attention (private); integers go through the public
:func:`structmat.checks.check_int`, as in structmat."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from structmat.checks import check_int

__all__: list[str] = []


def _autocasting(x: torch.Tensor) -> bool:
    """Whether autocast is on for ``x``'s device (then dtypes may differ: autocast casts them)."""
    kind = x.device.type
    return torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)


def _bool_arg(where: str, what: str, value: object) -> bool:
    """``value``, which must be a bool (TypeError naming ``where`` and ``what`` otherwise)."""
    if not isinstance(value, bool):
        raise TypeError(f"{where}: {what} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _int_list(where: str, what: str, values: object, allow_none: bool = False) -> list[Any]:
    """``values`` as a non-empty list of ints >= 1 (or None where ``allow_none``), one entry per level."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise TypeError(f"{where}: {what} must be a non-empty list, one entry per level, got {values!r}")
    return [check_int(where, f"{what}[{k}]", v, optional=allow_none) for k, v in enumerate(values)]


def _head_dim(where: str, d_model: int, n_heads: int) -> int:
    """``d_model // n_heads``, checked: both ints >= 1, ``n_heads`` dividing ``d_model``."""
    d_model = check_int(where, "d_model", d_model)
    n_heads = check_int(where, "n_heads", n_heads)
    if d_model % n_heads:
        raise ValueError(f"{where}: n_heads={n_heads} must divide d_model={d_model}")
    return d_model // n_heads
