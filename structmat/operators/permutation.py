"""``Permutation``: a reordering of coordinates. An axis permutation is a network with no factor (it fuses into
neighbouring products); a general one is a gather."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, ClassVar, final

import torch

from ..core.base import LinearOperator
from ..core.network import Network
from ..core.nodes import GatherNode, NetNode, Node

__all__ = ["Permutation"]

_SHOWN = 12  # entries of a long permutation shown in messages


def _show(values: Sequence[Any]) -> str:
    """A permutation for a message: in full when short, else its first entries and its length."""
    values = list(values)
    if len(values) <= _SHOWN:
        return repr(values)
    return f"[{', '.join(map(repr, values[:_SHOWN]))}, ...] (length {len(values)})"


def _check_perm(perm: Any) -> tuple[int, ...]:
    """``perm`` as a tuple of ints, checked to be a permutation of ``range(len(perm))``."""
    if isinstance(perm, torch.Tensor):
        if perm.ndim != 1 or perm.is_floating_point() or perm.is_complex() or perm.dtype == torch.bool:
            raise TypeError(
                f"Permutation: perm must be a sequence of ints, got a tensor of shape {tuple(perm.shape)} and "
                f"dtype {perm.dtype}"
            )
        perm = perm.tolist()
    if isinstance(perm, (str, bytes)) or not isinstance(perm, Sequence):
        raise TypeError(
            f"Permutation: perm must be a sequence of ints (a permutation of range(n)), got {type(perm).__name__} "
            f"{perm!r}" + (f"; for the identity of size {perm}, use Identity({perm})" if isinstance(perm, int) else "")
        )
    bad = [p for p in perm if isinstance(p, bool) or not isinstance(p, numbers.Integral)]
    if bad:
        raise TypeError(f"Permutation: perm must hold ints, got {_show(perm)} (not an int: {bad[0]!r})")
    values = tuple(int(p) for p in perm)
    n = len(values)
    if not n:
        raise ValueError("Permutation: perm must be a permutation of range(0), got []; an operator needs n >= 1")
    seen = [False] * n
    for k, p in enumerate(values):
        if not 0 <= p < n:
            raise ValueError(
                f"Permutation: perm must be a permutation of range({n}), got {_show(values)}: entry {k} is {p}, "
                f"outside range({n})"
            )
        if seen[p]:
            raise ValueError(
                f"Permutation: perm must be a permutation of range({n}), got {_show(values)}: {p} appears twice"
            )
        seen[p] = True
    return values


@final
class Permutation(LinearOperator):
    """``y[k] = x[perm[k]]``, shape ``(n, n)``.

    Args:
        perm: a permutation of ``range(n)`` (a sequence of ints, or a 1-D integer tensor).

    Raises:
        TypeError: when ``perm`` is not a sequence (``Permutation(5)``) or holds something other than ints.
        ValueError: when ``perm`` is empty, repeats an entry or has one outside ``range(n)``.

    Example:
        >>> import torch, structmat as sm
        >>> sm.Permutation([2, 0, 1])(torch.tensor([10.0, 20.0, 30.0])).tolist()
        [30.0, 10.0, 20.0]
        >>> P = sm.Permutation.from_axes((2, 3), (1, 0))  # view x as (2, 3), transpose, flatten
        >>> P(torch.arange(6.0)).tolist()
        [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
        >>> sm.Permutation(5)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: Permutation: perm must be a sequence of ints (a permutation of range(n)), got int 5; ...
    """

    def __init__(self, perm: Sequence[int]) -> None:
        values = _check_perm(perm)
        super().__init__((len(values), len(values)))
        self._perm: tuple[int, ...] | None = values
        self._axes: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    @classmethod
    def from_axes(cls, sizes: Sequence[int], order: Sequence[int]) -> Permutation:
        """View ``x`` as ``sizes`` (row-major), permute the axes to ``order``, flatten: a factor-free network.

        No index vector is built (``from_axes([100000, 100000], [1, 0])`` is as cheap as a small one); :attr:`perm`
        computes it only when asked.

        Example:
            >>> import structmat as sm
            >>> P = sm.Permutation.from_axes((100000, 100000), (1, 0))
            >>> P.shape, P.cost(batch=1).flops
            ((10000000000, 10000000000), 0)
        """
        for what, seq in (("sizes", sizes), ("order", order)):
            if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
                raise TypeError(
                    f"Permutation.from_axes: {what} must be a sequence of ints, got {type(seq).__name__} {seq!r}"
                )
        sizes, order = tuple(sizes), tuple(order)
        if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in sizes):
            raise TypeError(f"Permutation.from_axes: sizes must be positive ints, got {sizes}")
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError(f"Permutation.from_axes: sizes must be positive ints, got {sizes}")
        if any(isinstance(k, bool) or not isinstance(k, numbers.Integral) for k in order):
            raise TypeError(f"Permutation.from_axes: order must be a permutation of range({len(sizes)}), got {order}")
        if sorted(order) != list(range(len(sizes))):
            raise ValueError(f"Permutation.from_axes: order must be a permutation of range({len(sizes)}), got {order}")
        obj = cls.__new__(cls)
        obj._init_axes(tuple(int(s) for s in sizes), tuple(int(k) for k in order))
        return obj

    def _init_axes(self, sizes: tuple[int, ...], order: tuple[int, ...]) -> None:
        """The constructor of an axis permutation: shapes only, no index vector."""
        n = math.prod(sizes)
        LinearOperator.__init__(self, (n, n))
        self._perm = None
        self._axes = (sizes, order)
        self._node  # noqa: B018 - lowers now, as every constructor does

    @property
    def perm(self) -> tuple[int, ...]:
        """The permutation as a tuple of ``n`` ints (computed on first use for an axis permutation, so only ask for it
        when ``n`` ints fit in memory)."""
        if self._perm is None:
            sizes, order = self._axes  # type: ignore[misc]
            self._perm = tuple(torch.arange(math.prod(sizes)).reshape(sizes).permute(order).reshape(-1).tolist())
        return self._perm

    expr_name: ClassVar[str] = "permutation"
    expr_aliases: ClassVar[dict[str, str]] = {"permute_axes": "from_axes"}
    projection: ClassVar[str] = "fixed"

    def _expr_name(self) -> str:
        return "permutation" if self._axes is None else "permute_axes"

    def _expr_args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self._axes is not None:  # a reshape-transpose: its sizes and order, never the index vector
            return (list(self._axes[0]), list(self._axes[1])), {}
        return (list(self.perm),), {}

    def _lower(self) -> Node:
        if self._axes is None:
            return GatherNode(self.perm)
        sizes, order = self._axes
        modes = tuple(enumerate(sizes))
        return NetNode(Network((), modes, tuple(modes[k] for k in order)))
