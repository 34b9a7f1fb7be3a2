"""Default initialization shared by the leaves: the spectral µP standard deviation from a factor's fans."""

from __future__ import annotations

import math

import torch

__all__ = ["spectral_std", "check_float_dtype"]


def spectral_std(fan_in: int, fan_out: int) -> float:
    """``(1 / sqrt(fan_in)) * min(1, sqrt(fan_out / fan_in))``: keeps the output RMS near the input RMS.

    >>> spectral_std(4, 16), spectral_std(16, 4)
    (0.5, 0.125)
    """
    return (1.0 / math.sqrt(fan_in)) * min(1.0, math.sqrt(fan_out / fan_in))


def check_float_dtype(owner: str, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype to create parameters in (torch's default when None); it must be floating point or complex."""
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not (dtype.is_floating_point or dtype.is_complex):
        raise TypeError(f"{owner}: dtype must be a floating-point torch.dtype, got {dtype!r}")
    return dtype
