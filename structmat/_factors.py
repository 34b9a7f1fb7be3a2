"""Checks and defaults shared by the families: sizes, ranks and balanced factorizations."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

__all__ = ["balanced_factors", "check_factors", "check_ranks", "check_int", "check_train"]


def check_int(owner: str, what: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {what} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}: {what} must be >= {minimum}, got {value}")
    return int(value)


def balanced_factors(n: int, parts: int) -> tuple[int, ...]:
    """``parts`` factors of ``n``, as equal as the divisors allow, in ascending order.

    >>> balanced_factors(1024, 2), balanced_factors(12, 2), balanced_factors(64, 3), balanced_factors(7, 2)
    ((32, 32), (3, 4), (4, 4, 4), (1, 7))
    """
    if parts == 1:
        return (n,)
    target = n ** (1.0 / parts)
    best = max(d for d in range(1, int(target + 1e-9) + 1) if n % d == 0)
    return tuple(sorted((best, *balanced_factors(n // best, parts - 1))))


def check_factors(
    owner: str, what: str, size: int, factors: Sequence[int] | None, parts: int | None
) -> tuple[int, ...]:
    """Validate a row-major split of ``size`` (or make a balanced one of ``parts`` factors)."""
    if factors is None:
        return balanced_factors(size, parts or 2)
    if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence):
        raise TypeError(f"{owner}: {what} must be a sequence of ints, got {type(factors).__name__}")
    out = tuple(check_int(owner, f"{what}[{k}]", f) for k, f in enumerate(factors))
    if math.prod(out) != size:
        raise ValueError(f"{owner}: {what}={list(out)} multiply to {math.prod(out)}, not {size}")
    return out


def check_ranks(owner: str, ranks: int | Sequence[int], count: int) -> tuple[int, ...]:
    """``ranks`` as ``count`` bond ranks (an int is used for every bond)."""
    if isinstance(ranks, numbers.Integral) and not isinstance(ranks, bool):
        return (check_int(owner, "ranks", ranks),) * count
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence):
        raise TypeError(f"{owner}: ranks must be an int or a sequence of ints, got {type(ranks).__name__}")
    out = tuple(check_int(owner, f"ranks[{k}]", r) for k, r in enumerate(ranks))
    if len(out) != count:
        raise ValueError(f"{owner}: ranks={list(out)} must hold {count} bond rank(s), got {len(out)}")
    return out


def check_train(
    where: str,
    m: object,
    n: object,
    ranks: int | Sequence[int],
    in_factors: Sequence[int] | None,
    out_factors: Sequence[int] | None,
) -> tuple[int, int, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Validate a train of N >= 2 cores (BTT, TT): ``(m, n, in_factors, out_factors, bond ranks)``."""
    m = check_int(where, "m", m)
    n = check_int(where, "n", n)
    parts = len(in_factors) if in_factors is not None else len(out_factors) if out_factors is not None else 2
    if parts < 2:
        raise ValueError(f"{where}: needs at least 2 cores, got factors for {parts}")
    fin = check_factors(where, "in_factors", n, in_factors, parts)
    fout = check_factors(where, "out_factors", m, out_factors, parts)
    if len(fin) != len(fout):
        raise ValueError(f"{where}: in_factors={list(fin)} and out_factors={list(fout)} must have the same length")
    return m, n, fin, fout, check_ranks(where, ranks, parts - 1)
