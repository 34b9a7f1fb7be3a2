"""``MultiLevel``: a sum over levels of block-diagonal matrices whose blocks are operators of any family.

This is the multi-level block tensor contraction family of Kuang et al. (2025): level ``l`` partitions the matrix into
contiguous diagonal blocks, each block is a structured operator (a tensor contraction: low-rank, BTT, Monarch,
Kronecker, dense, or any ``TensorNetwork``), and every level refines the one before (each block of level ``l + 1`` lies
inside one block of level ``l``)::

    A = sum_l  diag(B_{l,1}, B_{l,2}, ..., B_{l,k_l})

Low-rank, BTT, Monarch and Kronecker matrices are the one-level, one-block case (with the block's tensor network as
the contraction); ``MultiLevelLowRank`` is the case where every block is low-rank. A level with ``k`` equal blocks is
built as one stacked operator laid out by :class:`~structmat.BlockDiagonal` (one network for the level), so the whole
operator lowers to a sum of one network per level.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, final

import torch

from ..checks import check_int
from ..combinators import BlockDiagonal
from ..core import nodes as _nodes
from ..core.base import LinearOperator, check_compatible
from ..core.family import check_heads
from ..core.nodes import Node

__all__ = ["LevelRecipe", "BlockLevel", "MultiLevel"]

Partition = tuple[tuple[int, int], ...]  # (rows, cols) of each diagonal block, in order
Family = Callable[..., LinearOperator]


class LevelRecipe:
    """The recipe of one level of a :class:`MultiLevel`: ``blocks`` diagonal blocks, each ``family(rows, cols, ...)``.

    Args:
        family: any structmat family (``LowRank``, ``BTT``, ``Monarch``, ``TT``, ``Dense``, ``MLR`` …), or a callable
            with the same signature, called as ``family(rows, cols, **options, heads=..., dtype=..., device=...)``
            (keywords that would be None are left out) and returning an operator of shape ``(rows, cols)``.
        blocks: the number of equal contiguous diagonal blocks (it must divide ``m`` and ``n``), or the explicit
            ``(rows, cols)`` of each block, summing to ``(m, n)``.
        **options: passed to ``family`` for every block (``rank=4``, ``ranks=2``, ``nblocks=4`` …); an option that
            shares a name with ``LevelRecipe``'s own arguments (``blocks`` of an ``MLR`` block) needs a ``lambda``
            family.

    Example:
        >>> import structmat as sm
        >>> sm.LevelRecipe(sm.LowRank, blocks=4, rank=2)
        LevelRecipe(LowRank, blocks=4, rank=2)
    """

    __slots__ = ("family", "blocks", "options")

    def __init__(self, family: Family, blocks: int | Sequence[Sequence[int]] = 1, **options: Any) -> None:
        kind = type(self).__name__
        if isinstance(family, torch.nn.Module):  # callable, but applying it is not building a block
            what = family.name if isinstance(family, LinearOperator) else type(family).__name__
            raise TypeError(
                f"{kind}: family must be an operator class or a factory called as family(rows, cols, ...) for "
                f"every block, got the built operator {what}; pass its class (e.g. {kind}({type(family).__name__}, "
                "...)), or pass a built operator as a level of MultiLevel directly"
            )
        if not callable(family):
            raise TypeError(f"{kind}: family must be an operator class or a callable, got {type(family).__name__}")
        self.family = family
        self.blocks = blocks
        self.options: Mapping[str, Any] = dict(options)

    def __repr__(self) -> str:
        name = getattr(self.family, "__name__", repr(self.family))
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({name}, blocks={self.blocks!r}{opts})"


@final
class BlockLevel(LevelRecipe):
    """Deprecated name of :class:`LevelRecipe` (the recipe of one level of a :class:`MultiLevel`); it warns.

    Example:
        >>> import warnings, structmat as sm
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     level = sm.BlockLevel(sm.LowRank, rank=2)
        >>> isinstance(level, sm.LevelRecipe), caught[0].category.__name__
        (True, 'DeprecationWarning')
    """

    __slots__ = ()

    def __init__(self, family: Family, blocks: int | Sequence[Sequence[int]] = 1, **options: Any) -> None:
        warnings.warn(
            "structmat.BlockLevel is deprecated: use structmat.LevelRecipe (the same recipe of one level of a "
            "MultiLevel)",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(family, blocks, **options)


# -- block layouts shared with MultiLevelLowRank ----------------------------------------------------------------------
def _partition(where: str, level: int, m: int, n: int, blocks: object) -> Partition:
    """``blocks`` of level ``level`` as the ``(rows, cols)`` of each block; it must tile ``(m, n)``."""
    if isinstance(blocks, numbers.Integral) and not isinstance(blocks, bool):
        k = check_int(where, f"blocks[{level}]", blocks)
        if m % k or n % k:
            raise ValueError(f"{where}: blocks[{level}]={k} must divide m={m} and n={n}")
        return ((m // k, n // k),) * k
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence) or not blocks:
        raise TypeError(
            f"{where}: blocks[{level}] must be a number of equal blocks or a non-empty list of (rows, cols) pairs, "
            f"got {blocks!r}"
        )
    out = []
    for j, pair in enumerate(blocks):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise TypeError(f"{where}: blocks[{level}][{j}] must be a (rows, cols) pair, got {pair!r}")
        out.append(
            (
                check_int(where, f"blocks[{level}][{j}] rows", pair[0]),
                check_int(where, f"blocks[{level}][{j}] cols", pair[1]),
            )
        )
    rows, cols = sum(p for p, _ in out), sum(q for _, q in out)
    if (rows, cols) != (m, n):
        raise ValueError(
            f"{where}: the blocks of level {level} cover (rows, cols)=({rows}, {cols}), not (m, n)=({m}, {n}): "
            f"{[tuple(p) for p in out]}"
        )
    return tuple(out)


def _bounds(sizes: Sequence[int]) -> list[int]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


def _check_nested(where: str, parts: Sequence[Partition]) -> None:
    """Every block of level ``l + 1`` must lie inside one block of level ``l``."""
    for level in range(1, len(parts)):
        coarse, fine = parts[level - 1], parts[level]
        rows, cols = _bounds([p for p, _ in coarse]), _bounds([q for _, q in coarse])
        r0 = c0 = 0
        for j, (p, q) in enumerate(fine):
            k = max(i for i in range(len(coarse)) if rows[i] <= r0)
            if not (r0 + p <= rows[k + 1] and cols[k] <= c0 and c0 + q <= cols[k + 1]):
                hint = ""
                if len(set(coarse)) == 1 and len(set(fine)) == 1:
                    hint = f" (blocks[{level - 1}]={len(coarse)} must divide blocks[{level}]={len(fine)})"
                raise ValueError(
                    f"{where}: levels are not nested: block {j} of level {level} (rows {r0}:{r0 + p}, columns "
                    f"{c0}:{c0 + q}) does not lie inside one block of level {level - 1}{hint}"
                )
            r0, c0 = r0 + p, c0 + q


def _describe(part: Partition) -> int | list[tuple[int, int]]:
    """A level's blocks as written in names: their number when they are equal, else their sizes."""
    return len(part) if len(set(part)) == 1 else list(part)


def _build_level(
    where: str,
    level: int,
    family: Family,
    part: Partition,
    options: Mapping[str, Any],
    *,
    heads: int | None,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> LinearOperator:
    """One level: ``family`` for every block of ``part``, laid out block-diagonally.

    Equal blocks are one stacked operator (``k`` blocks, ``H * k`` stacked operators for a stack of H heads) under
    ``BlockDiagonal(stack, heads=H)``: one network for the level. Unequal blocks are separate operators.
    """
    k = len(part)
    equal = len(set(part)) == 1
    if not equal and heads is not None:
        raise ValueError(
            f"{where}: level {level} has unequal blocks {list(part)}; a stack of heads={heads} needs equal blocks"
        )

    def make(rows: int, cols: int, stack: int | None) -> LinearOperator:
        kwargs = dict(options)
        for key, value in (("heads", stack), ("dtype", dtype), ("device", device)):
            if value is not None:
                kwargs[key] = value
        try:
            op = family(rows, cols, **kwargs)
        except (ValueError, TypeError) as err:
            raise type(err)(f"{where}: level {level}: {err}") from None
        if not isinstance(op, LinearOperator):
            raise TypeError(f"{where}: level {level}: family returned {type(op).__name__}, not a LinearOperator")
        if op.shape != (rows, cols) or op.heads != stack:
            raise ValueError(
                f"{where}: level {level}: family returned {op.name}, expected shape ({rows}, {cols})"
                + (f" with heads={stack}" if stack is not None else "")
            )
        return op

    if k == 1:
        return make(*part[0], heads)
    if equal:
        return BlockDiagonal(make(*part[0], (heads or 1) * k), heads=heads)
    return BlockDiagonal(*(make(rows, cols, None) for rows, cols in part))


def _layout(op: LinearOperator) -> Partition:
    """The diagonal blocks of a built operator: a ``BlockDiagonal``'s blocks, else one block."""
    if isinstance(op, BlockDiagonal):
        blocks = list(op.blocks)
        if len(blocks) == 1 and blocks[0].heads is not None:  # a stack laid out as equal blocks
            return (blocks[0].shape,) * (blocks[0].heads // (op.heads or 1))
        return tuple(b.shape for b in blocks)
    return (op.shape,)


@final
class MultiLevel(LinearOperator):
    """A sum over levels of block-diagonal matrices of structured blocks: ``A = Σ_l diag(B_{l,1}, ..., B_{l,k_l})``.

    Each level is a :class:`LevelRecipe` (its blocks are built here, with this operator's ``heads``, ``dtype`` and
    ``device``) or an already built operator of shape ``(m, n)``, used as it is (its parameters are shared): a
    ``BlockDiagonal`` contributes its blocks, any other operator is one block. Levels go from coarse to fine: each
    block of level ``l + 1`` must lie inside one block of level ``l``.

    The rank bound, cost and execution come from the levels' networks (one per level for equal blocks); the rank is
    at most ``min(m, n, Σ_l Σ_j rank(B_{l,j}))``.

    Args:
        m: rows.
        n: columns.
        levels: the levels, coarse to fine, each a :class:`LevelRecipe` or a ``LinearOperator`` of shape ``(m, n)``.
        heads: a stack of this many independent operators (every level a stack of H), or None; by default the
            built levels' own.
        dtype: parameter dtype of the levels built here.
        device: parameter device of the levels built here.

    Attributes:
        levels: the level operators (``nn.ModuleList``).
        blocks: per level, the ``(rows, cols)`` of each diagonal block.

    Example:
        >>> import torch, structmat as sm
        >>> A = sm.MultiLevel(64, 64, [sm.LevelRecipe(sm.LowRank, rank=4), sm.LevelRecipe(sm.BTT, blocks=4, ranks=1)])
        >>> A.name, A.blocks[1]
        ('MultiLevel(64, 64, blocks=[1, 4])', ((16, 16), (16, 16), (16, 16), (16, 16)))
        >>> A.num_params, A.rank()  # 4 * (64 + 64) + 4 * (2 * 4**3)
        (1024, Rank(bound=64, exact=False))
        >>> x = torch.randn(3, 64)
        >>> torch.allclose(A(x), A.levels[0](x) + A.levels[1](x))
        True
    """

    def __init__(
        self,
        m: int,
        n: int,
        levels: Sequence[LevelRecipe | LinearOperator],
        *,
        heads: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        where = f"MultiLevel({m}, {n})"
        m = check_int(where, "m", m)
        n = check_int(where, "n", n)
        heads = check_heads(where, heads)
        if isinstance(levels, (str, bytes, LevelRecipe, LinearOperator)) or not isinstance(levels, Sequence):
            raise TypeError(
                f"{where}: levels must be a list of LevelRecipe recipes or operators, got {type(levels).__name__}"
            )
        if not levels:
            raise ValueError(f"{where}: needs at least one level, got none")
        built = [lv for lv in levels if isinstance(lv, LinearOperator)]
        for k, lv in enumerate(levels):
            if not isinstance(lv, (LevelRecipe, LinearOperator)):
                raise TypeError(
                    f"{where}: levels[{k}] must be a LevelRecipe or a LinearOperator, got {type(lv).__name__}"
                )
            if isinstance(lv, LinearOperator) and lv.shape != (m, n):
                raise ValueError(f"{where}: levels[{k}] is {lv.name}; every level must have shape ({m}, {n})")
        if heads is None and built:
            stacks = {lv.heads for lv in built}
            if len(stacks) > 1:
                listing = ", ".join(lv.name for lv in built)
                raise ValueError(f"{where}: the levels must all be stacks of the same number of heads, got {listing}")
            heads = stacks.pop()
        for k, lv in enumerate(levels):
            if isinstance(lv, LinearOperator) and lv.heads != heads:
                raise ValueError(
                    f"{where}: levels[{k}] is {lv.name}, but every level must be "
                    + (f"a stack of heads={heads}" if heads is not None else "a single operator (no heads)")
                )
        parts: list[Partition] = []
        ops: list[LinearOperator] = []
        for k, lv in enumerate(levels):
            if isinstance(lv, LevelRecipe):
                part = _partition(where, k, m, n, lv.blocks)
                parts.append(part)
                ops.append(_build_level(where, k, lv.family, part, lv.options, heads=heads, dtype=dtype, device=device))
            else:
                parts.append(_layout(lv))
                ops.append(lv)
        _check_nested(where, parts)
        check_compatible(where, ops)
        super().__init__((m, n), heads)
        self.levels = torch.nn.ModuleList(ops)
        self.blocks: tuple[Partition, ...] = tuple(parts)

    @property
    def nblocks(self) -> tuple[int, ...]:
        """The number of diagonal blocks of each level."""
        return tuple(len(part) for part in self.blocks)

    def _describe(self) -> tuple[str, str]:
        return "MultiLevel", f"blocks={[_describe(part) for part in self.blocks]}"

    def _operands(self) -> tuple[LinearOperator, ...]:
        return tuple(self.levels)

    expr_name: ClassVar[str] = "multilevel"
    projection: ClassVar[str] = "levels"

    def _expr_args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (*self.shape, list(self.levels)), {}

    def _lower(self) -> Node:
        return _nodes.add([op._node for op in self.levels])
