"""The paper's attention variants (Kuang et al., ICML 2025) as constructors of :class:`StructuredAttention`.

:func:`standard_attention`, :func:`bilinear_btt_attention`, :func:`bilinear_mlr_attention`, :func:`mlr_attention`,
:func:`sliding_window_attention` and :func:`gswa_attention`: each picks the levels (:class:`LevelSpec` s: which
pairs each joins and how to build its operator) and passes every other option to the layer.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import structmat as sm
from structmat.checks import check_int

from ._args import _head_dim, _int_list
from .layers import StructuredAttention
from .levels import LevelSpec, OperatorFactory

__all__ = [
    "standard_attention",
    "bilinear_btt_attention",
    "bilinear_mlr_attention",
    "mlr_attention",
    "sliding_window_attention",
    "gswa_attention",
]


def _lowrank(rank: int) -> OperatorFactory:
    def make(d: int, h: int, **kw: Any) -> sm.LinearOperator:
        return sm.LowRank(d, d, rank=rank, heads=h, **kw)

    return make


def standard_attention(d_model: int, n_heads: int, *, d_head: int | None = None, **options: Any) -> StructuredAttention:
    """Standard multi-head attention: one global low-rank level per head.

    ``s_h(i, j) = x_i^T W_Q[h]^T W_K[h] x_j / sqrt(d_head)``, i.e. ``W[h] = U_h V_h`` (``LowRank``, rank ``d_head``)
    with queries ``U_h^T x_i`` and keys ``V_h x_j``; values ``W_V[h] x_j`` of width ``d_head``.

    Args:
        d_model: token width.
        n_heads: heads (must divide ``d_model`` unless ``d_head`` is given).
        d_head: query/key width per head (default ``d_model // n_heads``).
        **options: passed to :class:`StructuredAttention` (``d_value``, ``causal``, ``scale``, ``qk_norm``,
            ``key_block``, ``dtype``, ``device``).

    Example:
        >>> import torch
        >>> from structmat_attention import standard_attention
        >>> layer = standard_attention(16, 4)
        >>> layer.levels[0].op.name, layer(torch.randn(3, 16)).shape
        ('LowRank(16, 16, rank=4, heads=4)', torch.Size([3, 16]))
    """
    where = f"standard_attention(d_model={d_model}, n_heads={n_heads})"
    if d_head is None:
        d_head = _head_dim(where, d_model, n_heads)
    d_head = check_int(where, "d_head", d_head)
    options.setdefault("d_value", d_head)
    return StructuredAttention(d_model, n_heads, [LevelSpec(_lowrank(d_head))], **options)


def _btt_rank(d: int, bond: int, shape: dict[str, Any]) -> int:
    """The rank bound of a BTT(d, d) with this bond, from shapes on the meta device (its rank warning silenced: this
    is the probe that finds the full-rank bond)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return sm.BTT(d, d, ranks=bond, device="meta", **shape).rank().bound


def bilinear_btt_attention(
    d_model: int,
    n_heads: int,
    *,
    ranks: int | Sequence[int] | None = None,
    in_factors: Sequence[int] | None = None,
    out_factors: Sequence[int] | None = None,
    **options: Any,
) -> StructuredAttention:
    """Bilinear BTT attention: one global level, ``W[h]`` a full-rank block tensor-train per head.

    ``s_h(i, j) = c · x_i^T B_h x_j`` with ``B_h = BTT(d_model, d_model, ranks)``. When no cut of the BTT is
    narrower than ``d_model`` (full rank: cores ``(a, b) x (c, d)`` with bond ``s`` need ``a · c · s >= d_model``),
    the split is ``(I, B_h)``: the query side is the raw token, the keys are ``B_h x_j``, and a pair costs
    ``d_model`` per head (``scale='sqrt'`` gives ``c = 1/sqrt(d_model)``). A narrower BTT splits at its cut like any
    operator.

    Args:
        d_model: token width.
        n_heads: heads.
        ranks: BTT bond rank(s); default the smallest single bond that makes ``B_h`` full rank (1 when ``d_model``
            is a square, e.g. 2 for 12 = (3, 4) x (3, 4)).
        in_factors: the BTT input split (default balanced).
        out_factors: the BTT output split.
        **options: passed to :class:`StructuredAttention`.

    Example:
        >>> import torch
        >>> from structmat_attention import bilinear_btt_attention
        >>> layer = bilinear_btt_attention(16, 2)
        >>> layer.levels[0].op.name, layer(torch.randn(5, 16)).shape
        ('BTT(16, 16, ranks=[1], heads=2)', torch.Size([5, 16]))
    """

    def make(d: int, h: int, **kw: Any) -> sm.LinearOperator:
        shape = dict(in_factors=in_factors, out_factors=out_factors)
        bond = ranks
        if bond is None:  # the smallest full-rank bond, found from shapes on the meta device
            bond = 1
            while _btt_rank(d, bond, shape) < d:
                bond += 1
        return sm.BTT(d, d, ranks=bond, heads=h, **shape, **kw)

    return StructuredAttention(d_model, n_heads, [LevelSpec(make)], **options)


def bilinear_mlr_attention(
    d_model: int,
    n_heads: int,
    ranks: Sequence[int],
    blocks: Sequence[Any] | None = None,
    **options: Any,
) -> StructuredAttention:
    """Bilinear MLR attention over the features: one global level, ``W[h]`` a multi-level low-rank matrix.

    ``s_h(i, j) = c · x_i^T M_h x_j`` with ``M_h = Σ_k diag(U_{k,1} V_{k,1}, ..., U_{k,b_k} V_{k,b_k})`` over feature
    levels ``k`` of ``b_k = blocks[k]`` diagonal blocks of rank ``ranks[k]`` (:class:`structmat.MultiLevelLowRank`).
    Its split concatenates the levels' cuts: width ``Σ_k b_k · ranks[k]`` per pair and head.

    Args:
        d_model: token width.
        n_heads: heads.
        ranks: the rank of each feature level's blocks.
        blocks: each feature level's number of blocks (default ``[1, 2, 4, ...]``).
        **options: passed to :class:`StructuredAttention`.

    Example:
        >>> import torch
        >>> from structmat_attention import bilinear_mlr_attention
        >>> layer = bilinear_mlr_attention(16, 2, ranks=[2, 1], blocks=[1, 4])
        >>> layer(torch.randn(5, 16)).shape, layer.cost(5)["scores[0]"].macs  # 2 heads * 25 pairs * (2 + 4*1)
        (torch.Size([5, 16]), 300)
    """

    def make(d: int, h: int, **kw: Any) -> sm.LinearOperator:
        return sm.MultiLevelLowRank(d, d, ranks=ranks, blocks=blocks, heads=h, **kw)

    return StructuredAttention(d_model, n_heads, [LevelSpec(make)], **options)


def mlr_attention(
    d_model: int,
    n_heads: int,
    ranks: Sequence[int],
    block_sizes: Sequence[int | None] | None = None,
    *,
    max_seq_len: int | None = None,
    **options: Any,
) -> StructuredAttention:
    """MLR attention over the sequence: level ``l`` joins tokens in the same block of ``T_l``, low-rank ``r_l`` each.

    ``s_h(i, j) = c · Σ_l [⌊i/T_l⌋ = ⌊j/T_l⌋] · x_i^T U_{l,h} V_{l,h} x_j`` with ``U_{l,h} V_{l,h}`` of rank
    ``r_l = ranks[l]``: the head's query/key channels are split across the levels (typically ``Σ_l r_l = d_head``),
    so ``scale='sqrt'`` gives ``c = 1/sqrt(Σ_l r_l)`` and one level equals standard attention. The scores cost
    ``Σ_l r_l · T_l`` per query and head. Blocks that don't divide ``T`` end in a partial block. Without a global
    level (every block size given), tokens in no common block do not attend to each other at all (``unjoined``
    default; ``unjoined="zero"`` gives them score 0 instead).

    Args:
        d_model: token width.
        n_heads: heads (must divide ``d_model`` unless ``d_value`` is given).
        ranks: ``r_l`` per level.
        block_sizes: ``T_l`` per level (None: global). Default ``[None, T/2, T/4, ...]`` with ``T = max_seq_len``.
        max_seq_len: the sequence length the default block sizes halve.
        **options: passed to :class:`StructuredAttention`.

    Example:
        >>> import torch
        >>> from structmat_attention import mlr_attention
        >>> layer = mlr_attention(16, 2, ranks=[4, 2, 2], max_seq_len=8)
        >>> [lv.block_size for lv in layer.levels], layer(torch.randn(7, 16)).shape
        ([None, 4, 2], torch.Size([7, 16]))
    """
    where = f"mlr_attention(d_model={d_model}, n_heads={n_heads})"
    rs = _int_list(where, "ranks", ranks)
    if block_sizes is None:
        if max_seq_len is None:
            raise ValueError(f"{where}: give block_sizes, or max_seq_len for the default [None, T/2, T/4, ...]")
        max_seq_len = check_int(where, "max_seq_len", max_seq_len)
        if max_seq_len >> (len(rs) - 1) < 1:
            raise ValueError(
                f"{where}: max_seq_len={max_seq_len} is too short to halve into {len(rs)} levels "
                f"(needs >= {2 ** (len(rs) - 1)})"
            )
        sizes: list[int | None] = [None] + [max_seq_len >> k for k in range(1, len(rs))]
    else:
        sizes = _int_list(where, "block_sizes", block_sizes, allow_none=True)
    if len(sizes) != len(rs):
        raise ValueError(
            f"{where}: ranks has {len(rs)} entries but block_sizes has {len(sizes)}; give one block size per level"
        )
    specs = [LevelSpec(_lowrank(r), block_size=b) for r, b in zip(rs, sizes)]
    return StructuredAttention(d_model, n_heads, specs, **options)


def sliding_window_attention(
    d_model: int, n_heads: int, window: int, *, d_head: int | None = None, **options: Any
) -> StructuredAttention:
    """Sliding-window attention: token ``i`` attends to ``j`` only when ``|i - j| < window``.

    ``s_h(i, j) = x_i^T U_h V_h x_j / sqrt(d_head)`` for ``|i - j| < window``, and the pair is masked out otherwise
    (the layer's default for a set of levels none of which is global): causally, each query sees itself and the
    ``window - 1`` tokens before it, and a :class:`KVCache` holds at most ``window - 1`` tokens between calls.

    Args:
        d_model: token width.
        n_heads: heads.
        window: ``w >= 1``.
        d_head: query/key width per head (default ``d_model // n_heads``).
        **options: passed to :class:`StructuredAttention`.

    Example:
        >>> import torch
        >>> from structmat_attention import sliding_window_attention
        >>> layer = sliding_window_attention(8, 2, window=3)
        >>> layer.levels[0].window, layer(torch.randn(6, 8)).shape
        (3, torch.Size([6, 8]))
    """
    where = f"sliding_window_attention(d_model={d_model}, n_heads={n_heads}, window={window})"
    window = check_int(where, "window", window)
    if d_head is None:
        d_head = _head_dim(where, d_model, n_heads)
    d_head = check_int(where, "d_head", d_head)
    options.setdefault("d_value", d_head)
    return StructuredAttention(d_model, n_heads, [LevelSpec(_lowrank(d_head), window=window)], **options)


def gswa_attention(
    d_model: int,
    n_heads: int,
    window: int,
    *,
    global_rank: int | None = None,
    window_rank: int | None = None,
    **options: Any,
) -> StructuredAttention:
    """Global + sliding-window attention (GSWA): the head's channels split between a global and a windowed level.

    ``s_h(i, j) = c · (x_i^T U_h V_h x_j + [|i - j| < w] · x_i^T U'_h V'_h x_j)`` with ranks ``global_rank`` and
    ``window_rank`` (default ``d_head // 2`` and the rest): far pairs see the global part only, near pairs both;
    ``scale='sqrt'`` gives ``c = 1/sqrt(global_rank + window_rank)``.

    Args:
        d_model: token width.
        n_heads: heads (must divide ``d_model``).
        window: ``w >= 1``.
        global_rank: rank of the global level per head.
        window_rank: rank of the windowed level per head.
        **options: passed to :class:`StructuredAttention`.

    Example:
        >>> import torch
        >>> from structmat_attention import gswa_attention
        >>> layer = gswa_attention(16, 2, window=4)
        >>> [lv.op.name for lv in layer.levels]
        ['LowRank(16, 16, rank=4, heads=2)', 'LowRank(16, 16, rank=4, heads=2)']
    """
    where = f"gswa_attention(d_model={d_model}, n_heads={n_heads}, window={window})"
    window = check_int(where, "window", window)
    d_head = _head_dim(where, d_model, n_heads)
    if global_rank is None and window_rank is None and d_head < 2:
        raise ValueError(f"{where}: d_head={d_head} cannot be split between a global and a windowed level")
    if global_rank is None:
        global_rank = d_head // 2 if window_rank is None else max(d_head - window_rank, 1)
    if window_rank is None:
        window_rank = max(d_head - global_rank, 1)
    global_rank = check_int(where, "global_rank", global_rank)
    window_rank = check_int(where, "window_rank", window_rank)
    options.setdefault("d_value", d_head)
    specs = [LevelSpec(_lowrank(global_rank)), LevelSpec(_lowrank(window_rank), window=window)]
    return StructuredAttention(d_model, n_heads, specs, **options)
