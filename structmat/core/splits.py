"""Defaults and checks shared by the families: factor splits, bond ranks, balanced factorizations and the rank they
allow. Integer checks are :mod:`structmat.checks`."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch

from ..checks import check_int
from .network import Factor, Network

__all__ = [
    "Spec",
    "balanced_factors",
    "check_factors",
    "check_ranks",
    "check_train",
    "default_splits",
    "spec_rank_bound",
    "warn_default_rank",
]


def prime_count(n: int) -> int:
    """The number of prime factors of ``n`` counted with multiplicity (0 for 1)."""
    count, d = 0, 2
    while d * d <= n:
        while n % d == 0:
            n //= d
            count += 1
        d += 1
    return count + (n > 1)


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small) | {n // d for d in small})


def _splits(n: int, parts: int, least: int) -> Iterator[tuple[int, ...]]:
    """Every ascending tuple of ``parts`` factors ``>= least`` (and ``>= 2``) whose product is ``n``."""
    if parts == 1:
        if n >= least:
            yield (n,)
        return
    for d in _divisors(n):
        if d < max(least, 2):
            continue
        if d**parts > n:
            break
        for rest in _splits(n // d, parts - 1, d):
            yield (d, *rest)


def balanced_factors(n: int, parts: int) -> tuple[int, ...]:
    """``parts`` factors of ``n`` in ascending order, as equal as the divisors allow.

    A factor of 1 appears only when ``n`` has fewer than ``parts`` prime factors (a prime, for two parts). Among the
    splits with the fewest 1s, the one whose largest factor is smallest wins (then the second largest, ...).

    >>> balanced_factors(1024, 2), balanced_factors(12, 2), balanced_factors(64, 3), balanced_factors(62, 2)
    ((32, 32), (3, 4), (4, 4, 4), (2, 31))
    >>> balanced_factors(404, 3), balanced_factors(36, 3), balanced_factors(7, 2), balanced_factors(62, 3)
    ((2, 2, 101), (3, 3, 4), (1, 7), (1, 2, 31))
    """
    useful = min(parts, prime_count(n))
    if useful == 0:
        return (1,) * parts
    best = min(_splits(n, useful, 2), key=lambda split: split[::-1])
    return (1,) * (parts - useful) + best


def _check_split_type(owner: str, what: str, factors: object) -> None:
    if factors is not None and (isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence)):
        raise TypeError(
            f"{owner}: {what} must be a sequence of ints (one per core), got {type(factors).__name__} {factors!r}"
        )


def check_factors(
    owner: str, what: str, size: int, factors: Sequence[int] | None, parts: int | None
) -> tuple[int, ...]:
    """Validate a row-major split of ``size`` (or make a balanced one of ``parts`` factors)."""
    if factors is None:
        return balanced_factors(size, parts or 2)
    _check_split_type(owner, what, factors)
    out = tuple(check_int(owner, f"{what}[{k}]", f) for k, f in enumerate(factors))
    if math.prod(out) != size:
        raise ValueError(f"{owner}: {what}={list(out)} multiply to {math.prod(out)}, not {size}")
    return out


def check_ranks(owner: str, ranks: int | Sequence[int], count: int) -> tuple[int, ...]:
    """``ranks`` as ``count`` bond ranks (an int is used for every bond)."""
    if isinstance(ranks, numbers.Integral) and not isinstance(ranks, bool):
        return (check_int(owner, "ranks", ranks),) * count
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence):
        raise TypeError(f"{owner}: ranks must be an int or a sequence of ints, got {type(ranks).__name__} {ranks!r}")
    out = tuple(check_int(owner, f"ranks[{k}]", r) for k, r in enumerate(ranks))
    if len(out) != count:
        raise ValueError(f"{owner}: ranks={list(out)} must hold {count} bond rank(s), got {len(out)}")
    return out


def _default_split(where: str, what: str, dim: str, size: int, parts: int) -> tuple[int, ...]:
    """The balanced split of ``size``; a ValueError when every split into ``parts`` factors needs a factor of 1."""
    split = balanced_factors(size, parts)
    if 1 in split:
        primes = prime_count(size)
        why = "1 has no factors" if size == 1 else "it is prime" if primes == 1 else f"it has {primes} prime factors"
        raise ValueError(
            f"{where}: {dim}={size} has no split into {parts} factors > 1 ({why}), so the default {what} would be "
            f"{list(split)}, a core with a trivial mode; pass {what} explicitly (e.g. {what}={list(split)}) or "
            f"choose a size with {parts} or more prime factors"
        )
    return split


def check_train(
    where: str,
    m: object,
    n: object,
    ranks: int | Sequence[int],
    in_factors: Sequence[int] | None,
    out_factors: Sequence[int] | None,
) -> tuple[int, int, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Validate a train of N >= 2 cores (BTT, TT): ``(m, n, in_factors, out_factors, bond ranks)``.

    A split left as None is the balanced one (as many factors as the other split, else 2); when that needs a factor
    of 1 (a prime size) it is a ValueError: pass the split explicitly.
    """
    m = check_int(where, "m", m)
    n = check_int(where, "n", n)
    _check_split_type(where, "in_factors", in_factors)
    _check_split_type(where, "out_factors", out_factors)
    parts = len(in_factors) if in_factors is not None else len(out_factors) if out_factors is not None else 2
    if parts < 2:
        raise ValueError(f"{where}: needs at least 2 cores, got factors for {parts}")
    if in_factors is None:
        fin = _default_split(where, "in_factors", "n", n, parts)
    else:
        fin = check_factors(where, "in_factors", n, in_factors, parts)
    if out_factors is None:
        fout = _default_split(where, "out_factors", "m", m, parts)
    else:
        fout = check_factors(where, "out_factors", m, out_factors, parts)
    if len(fin) != len(fout):
        raise ValueError(f"{where}: in_factors={list(fin)} and out_factors={list(fout)} must have the same length")
    return m, n, fin, fout, check_ranks(where, ranks, parts - 1)


Spec = tuple[list[tuple[str, tuple[str, ...]]], dict[str, int], tuple[str, ...], tuple[str, ...]]


def spec_rank_bound(spec: Spec) -> int:
    """The rank bound (minimal cut) of a family's network spec ``(factors, sizes, inputs, outputs)``, from shapes
    alone: no parameter is made."""
    factors, sizes, inputs, outputs = spec
    ids = {lab: k for k, lab in enumerate(sorted(sizes))}
    holder = torch.nn.Module()
    fs = tuple(
        Factor(holder, name, tuple(ids[lab] for lab in labs), tuple(sizes[lab] for lab in labs))
        for name, labs in factors
    )
    net = Network(fs, tuple((ids[lab], sizes[lab]) for lab in inputs), tuple((ids[lab], sizes[lab]) for lab in outputs))
    return net.rank_bound()[0]


def default_splits(
    fin: tuple[int, ...], fout: tuple[int, ...], in_factors: object, out_factors: object
) -> dict[str, tuple[int, ...]]:
    """The splits that were defaulted (the argument was None), by argument name."""
    chosen = {"in_factors": (fin, in_factors), "out_factors": (fout, out_factors)}
    return {name: split for name, (split, given) in chosen.items() if given is None}


def warn_default_rank(
    where: str,
    shape: tuple[int, int],
    defaults: dict[str, tuple[int, ...]],
    ranks: tuple[int, ...],
    bound: Callable[[tuple[int, ...]], int],
    stacklevel: int = 4,
) -> None:
    """Warn when default factor splits (``defaults``: name -> split) leave the rank bound below ``min(m, n)``.

    ``bound(ranks)`` is the rank bound with the chosen splits; the message names the smallest uniform bond rank that
    reaches ``min(m, n)`` with them, when there is one.
    """
    full = min(shape)
    got = bound(ranks)
    if not defaults or got >= full:
        return
    chosen = " and ".join(f"{name}={list(split)}" for name, split in defaults.items())
    lo, hi = max(ranks), full
    if bound((hi,) * len(ranks)) >= full:
        while lo < hi:  # the bound grows with the bonds: the smallest uniform bond reaching full rank
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if bound((mid,) * len(ranks)) < full else (lo, mid)
        fix = f"raise ranks to {lo} or pass in_factors/out_factors"
    else:
        fix = "pass in_factors/out_factors"
    warnings.warn(
        f"{where}: the default {chosen} limit the rank to {got} < min(m, n) = {full}; for full rank {fix}",
        UserWarning,
        stacklevel=stacklevel,
    )
