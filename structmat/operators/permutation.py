"""``Permutation``: a reordering of coordinates. An axis permutation is a network with no factor (it fuses into
neighbouring products); a general one is a gather."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import final

import torch

from .._base import LinearOperator
from .._network import Network
from .._nodes import GatherNode, NetNode, Node

__all__ = ["Permutation"]


@final
class Permutation(LinearOperator):
    """``y[k] = x[perm[k]]``, shape ``(n, n)``.

    Args:
        perm: a permutation of ``range(n)``.

    Example:
        >>> import torch, structmat as sm
        >>> sm.Permutation([2, 0, 1])(torch.tensor([10.0, 20.0, 30.0])).tolist()
        [30.0, 10.0, 20.0]
        >>> P = sm.Permutation.from_axes((2, 3), (1, 0))  # view x as (2, 3), transpose, flatten
        >>> P(torch.arange(6.0)).tolist()
        [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
    """

    def __init__(self, perm: Sequence[int]) -> None:
        if isinstance(perm, torch.Tensor):
            perm = perm.tolist()
        perm = list(perm)
        if not all(isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in perm):
            raise TypeError(f"Permutation: perm must hold ints, got {perm!r}")
        if sorted(perm) != list(range(len(perm))) or not perm:
            raise ValueError(f"Permutation: perm must be a permutation of range({len(perm)}), got {perm}")
        super().__init__((len(perm), len(perm)))
        self.perm = tuple(int(p) for p in perm)
        self._axes: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    @classmethod
    def from_axes(cls, sizes: Sequence[int], order: Sequence[int]) -> Permutation:
        """View ``x`` as ``sizes`` (row-major), permute the axes to ``order``, flatten: a factor-free network."""
        for what, seq in (("sizes", sizes), ("order", order)):
            if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
                raise TypeError(
                    f"Permutation.from_axes: {what} must be a sequence of ints, got {type(seq).__name__} {seq!r}"
                )
        sizes, order = tuple(sizes), tuple(order)
        if not sizes or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in sizes):
            raise ValueError(f"Permutation.from_axes: sizes must be positive ints, got {sizes}")
        if any(isinstance(k, bool) or not isinstance(k, numbers.Integral) for k in order) or sorted(order) != list(
            range(len(sizes))
        ):
            raise ValueError(f"Permutation.from_axes: order must be a permutation of range({len(sizes)}), got {order}")
        n = math.prod(sizes)
        obj = cls(torch.arange(n).reshape(sizes).permute(order).reshape(-1).tolist())
        obj._axes = (sizes, order)
        return obj

    def _lower(self) -> Node:
        if self._axes is None:
            return GatherNode(self.perm)
        sizes, order = self._axes
        modes = tuple(enumerate(sizes))
        return NetNode(Network((), modes, tuple(modes[k] for k in order)))
