"""``MultiLevelLowRank`` (``MLR``): a sum over levels of block-diagonal matrices with low-rank blocks.

Level ``l`` splits the matrix into ``blocks[l]`` contiguous diagonal blocks (or blocks of explicit sizes), each of
rank ``ranks[l]``; each level refines the one before. Level ``l`` with ``k`` equal blocks of shape ``(p, q)`` is
``BlockDiagonal(LowRank(p, q, ranks[l], heads=k))``, one network ``U[k,o,r] V[k,r,i]`` whose block label is a diagonal
mode, so the whole operator is a sum of one network per level (the core's :class:`~structmat.Sum`).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, ClassVar, final

import torch

from ..checks import check_int
from ..core import nodes as _nodes
from ..core.base import LinearOperator
from ..core.family import check_heads
from ..core.nodes import Node
from .lowrank import LowRank
from .multilevel import Partition, _build_level, _check_nested, _describe, _partition

__all__ = ["MultiLevelLowRank", "MLR"]


@final
class MultiLevelLowRank(LinearOperator):
    """A multi-level low-rank matrix: ``A = Σ_l diag(U_{l,1} V_{l,1}, ..., U_{l,k_l} V_{l,k_l})``.

    Every block of level ``l`` has rank ``ranks[l]``. The rank bound is the core's bound for a sum,
    ``min(m, n, Σ_l Σ_j ranks[l])`` (``min(m, n, Σ_l blocks[l] * ranks[l])`` for equal blocks); it is exact only for
    one level. Parameters: ``Σ_l ranks[l] * (m + n)`` (every level's blocks tile the rows and the columns once).

    Args:
        m: rows.
        n: columns.
        ranks: the rank of the blocks of each level, ``1 <= ranks[l] <= min(rows, cols)`` of every block.
        blocks: per level, the number of equal contiguous diagonal blocks (dividing ``m`` and ``n``, and dividing the
            next level's number), or the ``(rows, cols)`` of each block, summing to ``(m, n)``; every block of level
            ``l + 1`` must lie inside one block of level ``l``. Default ``[1, 2, 4, ...]``, one entry per rank.
        heads: a stack of this many independent operators (equal blocks only), or None.
        dtype: parameter dtype.
        device: parameter device.

    Attributes:
        ranks: the rank of each level's blocks.
        blocks: per level, the ``(rows, cols)`` of each block.
        levels: the level operators (``nn.ModuleList``): a ``LowRank`` for a one-block level, else a
            ``BlockDiagonal`` of low-rank blocks.

    Example:
        >>> import torch, structmat as sm
        >>> A = sm.MLR(64, 64, ranks=[4, 2], blocks=[1, 4])
        >>> A.name, A.blocks[1]
        ('MLR(64, 64, ranks=[4, 2], blocks=[1, 4])', ((16, 16), (16, 16), (16, 16), (16, 16)))
        >>> A.rank(), A.num_params  # min(64, 1*4 + 4*2); (4 + 2) * (64 + 64)
        (Rank(bound=12, exact=False), 768)
        >>> A.cost(batch=1).flops  # 2 * 4 * 128 + 2 * 2 * 128 per level, plus 64 additions
        1600
        >>> B = sm.MLR(10, 10, ranks=[2, 1], blocks=[1, [(4, 4), (6, 6)]])
        >>> B.name, B.rank().bound
        ('MLR(10, 10, ranks=[2, 1], blocks=[1, [(4, 4), (6, 6)]])', 4)
    """

    def __init__(
        self,
        m: int,
        n: int,
        ranks: Sequence[int],
        blocks: Sequence[int | Sequence[Sequence[int]]] | None = None,
        *,
        heads: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        where = f"MLR({m}, {n}, ranks={_show(ranks)}, blocks={_show(blocks)})"
        m = check_int(where, "m", m)
        n = check_int(where, "n", n)
        heads = check_heads(where, heads)
        if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence):
            raise TypeError(
                f"{where}: ranks must be a list of ints, one per level, got {type(ranks).__name__} {ranks!r}"
            )
        if not ranks:
            raise ValueError(f"{where}: ranks must hold one rank per level, at least one, got {ranks!r}")
        ranks_ = tuple(check_int(where, f"ranks[{k}]", r) for k, r in enumerate(ranks))
        if blocks is None:
            blocks = [2**k for k in range(len(ranks_))]
        if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence):
            raise TypeError(f"{where}: blocks must be a list with one entry per level, got {blocks!r}")
        if len(blocks) != len(ranks_):
            raise ValueError(
                f"{where}: ranks has {len(ranks_)} entries but blocks has {len(blocks)} levels; give one rank per level"
            )
        parts = [_partition(where, k, m, n, b) for k, b in enumerate(blocks)]
        for k, (r, part) in enumerate(zip(ranks_, parts)):
            j = min(range(len(part)), key=lambda i: min(part[i]))
            if r > min(part[j]):
                raise ValueError(
                    f"{where}: ranks[{k}]={r} is larger than block {j} of level {k}, of (rows, cols)={part[j]}; "
                    f"the rank of a block is at most min(rows, cols) = {min(part[j])}"
                )
        _check_nested(where, parts)
        super().__init__((m, n), heads)
        self.ranks: tuple[int, ...] = ranks_
        self.blocks: tuple[Partition, ...] = tuple(parts)
        self.levels = torch.nn.ModuleList(
            _build_level(where, k, LowRank, part, {"rank": r}, heads=heads, dtype=dtype, device=device)
            for k, (r, part) in enumerate(zip(ranks_, parts))
        )

    @property
    def nblocks(self) -> tuple[int, ...]:
        """The number of diagonal blocks of each level."""
        return tuple(len(part) for part in self.blocks)

    def _describe(self) -> tuple[str, str]:
        return "MLR", f"ranks={list(self.ranks)}, blocks={[_describe(part) for part in self.blocks]}"

    def _operands(self) -> tuple[LinearOperator, ...]:
        return tuple(self.levels)

    expr_name: ClassVar[str] = "mlr"
    projection: ClassVar[str] = "levels"

    def _expr_args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        blocks = [_level_blocks(self.shape, part) for part in self.blocks]
        return self.shape, {"ranks": list(self.ranks), "blocks": blocks, "heads": self.heads}

    def _lower(self) -> Node:
        return _nodes.add([op._node for op in self.levels])


def _show(value: object) -> str:
    """A constructor argument as written, for messages (lists of ints and pairs stay readable)."""
    if isinstance(value, numbers.Integral) or value is None or isinstance(value, (str, bytes)):
        return repr(value)
    if isinstance(value, Sequence):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value)


def _level_blocks(shape: tuple[int, int], part: Sequence[tuple[int, int]]) -> int | list[list[int]]:
    """One level's blocks as written: their number when they split ``shape`` equally, else their ``[rows, cols]``."""
    k = len(part)
    m, n = shape
    if m % k == 0 and n % k == 0 and all(tuple(b) == (m // k, n // k) for b in part):
        return k
    return [list(b) for b in part]


MLR = MultiLevelLowRank
