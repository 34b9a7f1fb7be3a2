"""Attention whose score between tokens i and j is a sum of bilinear forms through structmat operators: the
functions (:func:`structured_attention`, :func:`bilinear_scores`, :func:`attention_features` and :func:`attend`)
and the choice of the execution path (:func:`attention_path`).

``s(i, j) = Σ_l [i and j in the same level-l block] · c_l · x_i^T W_l x_j``

Level ``l`` splits the positions into contiguous blocks of ``block_size`` tokens (None: one block, global); ``W_l`` is
any structmat operator, or a stack of one per head. Each ``W_l`` is applied through its cheapest split
``W_l = L_l^T R_l`` (:func:`structmat.bilinear_split`): queries become ``L_l x_i``, keys ``R_l x_j``, and a pair
costs the cut width ``r_l`` instead of the full dimension.

A pair that no level joins (possible only when no level is global: blocks and sliding windows) gets no attention by
default; ``unjoined="zero"`` gives it score 0 instead (the plain sum above).

Standard attention is one global level with ``W = W_Q^T W_K`` (``LowRank``); Bilinear BTT attention is one level with
``W = BTT``; MLR attention has levels with ``T_l = T / 2^l`` and low-rank ``W_l``.

The levels and their features live in :mod:`structmat_attention.levels` (re-exported here); the paths in private
modules: ``_pieces`` (pieces), ``_scores`` (scores), ``_sdpa`` (sdpa) and ``_streamed`` (streamed).

Paths (``method``; :func:`attention_path` says which one runs): for self-attention with nested block sizes (MLR
attention) the default runs the "pieces" path: sibling blocks attend to each other with the features of the levels
that join them, as batched calls of torch's fused CPU attention kernel, merged exactly by their log-sum-exp (memory
``O(T · d)``, no score matrix). Otherwise the scores of every level accumulate, in place, into ONE ``(T_q, T_k)``
matrix per head (a blocked level only touches its diagonal blocks), or torch's fused attention runs on block-expanded
features. :func:`structured_attention` with ``key_block=B`` instead streams over key blocks with an online softmax
and never holds more than ``(T_q, B)`` scores per head, forward or backward.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch

import structmat as sm
from structmat.checks import check_int

from . import _pieces
from ._args import _autocasting, _bool_arg
from ._scores import _mask_scores, _scores
from ._sdpa import _expanded, _expanded_width, _sdpa
from ._streamed import _streamed
from .levels import (
    Level,
    LevelFeatures,
    _as_levels,
    _check,
    _features,
    _joined,
    _joins_all,
    _unjoined_arg,
    attention_features,
    level_features,
    resolve_scale,
)

__all__ = [
    "METHODS",
    "Level",
    "attention_path",
    "LevelFeatures",
    "bilinear_scores",
    "structured_attention",
    "attention_features",
    "attend",
    "level_features",
    "resolve_scale",
]


#: The ``method`` values of :func:`structured_attention` and :func:`attend`.
METHODS = ("auto", "pieces", "sdpa", "scores", "streamed")


def bilinear_scores(
    x_q: torch.Tensor,
    x_k: torch.Tensor,
    levels: sm.LinearOperator | Level | Sequence[Level],
    scale: float | str = 1.0,
    *,
    q_offset: int = 0,
    qk_norm: bool = False,
    unjoined: str | None = None,
) -> torch.Tensor:
    """``s[..., i, j] = scale · Σ_l [pair joined by level l] · c_l · x_q[i]^T W_l x_k[j]``.

    Args:
        x_q: queries' tokens ``(..., T_q, D_q)``.
        x_k: keys' tokens ``(..., T_k, D_k)``.
        levels: an operator ``W`` (one global level), a :class:`Level`, or a list of them.
        scale: a number, ``"sqrt"`` (1/sqrt(d)) or ``"mup"`` (1/d), with d the total feature width over levels.
        q_offset: absolute position of the first query (keys start at 0), for incremental decoding.
        qk_norm: layer-normalize each level's query and key features (no affine) before the product.
        unjoined: the score of a pair that no level joins. ``"mask"``: ``-inf`` (attention will not see it, as in
            sliding-window or block-local attention); ``"zero"``: 0 (the plain sum above; attention still gives the
            pair weight); None (default): ``"mask"``. When some level is global, every pair is joined and this has
            no effect.

    Returns:
        ``(..., T_q, T_k)``, or ``(..., H, T_q, T_k)`` when the operators are stacks of H heads.

    Example:
        >>> import torch, structmat as sm
        >>> from structmat_attention import bilinear_scores, Level
        >>> W = sm.LowRank(8, 8, rank=2)
        >>> x = torch.randn(5, 8)
        >>> torch.allclose(bilinear_scores(x, x, W), x @ W.dense() @ x.T, atol=1e-5)
        True
        >>> s = bilinear_scores(x, x, [Level(None, W), Level(2, sm.LowRank(8, 8, rank=1))])
        >>> s.shape
        torch.Size([5, 5])
        >>> s = bilinear_scores(x, x, Level(None, W, window=2))  # no global level: unjoined pairs are masked
        >>> bool(s[0, 1].isfinite()), s[0, 2].item()
        (True, -inf)
    """
    where = "bilinear_scores"
    lvs = _as_levels(levels, where)
    heads = _check(lvs, x_q, x_k, where)
    q_offset = check_int(where, "q_offset", q_offset, 0)
    masked = _unjoined_arg(where, unjoined, lvs)
    feats = _features(lvs, x_q, x_k, scale, qk_norm, heads, where)
    t_q, t_k = x_q.shape[-2], x_k.shape[-2]
    s = _scores(feats, t_q, t_k, q_offset)
    if masked and not _joins_all(lvs, t_q, t_k, q_offset):
        s = s.masked_fill(~_joined(lvs, t_q, 0, t_k, q_offset, s.device), float("-inf"))
    return s


def _choose(
    levels: Sequence[Level],
    widths: Sequence[int],
    t_q: int,
    t_k: int,
    q_offset: int,
    key_block: int | None,
    method: str,
    has_mask: bool,
    device: torch.device,
    dtype: torch.dtype,
    where: str,
) -> str:
    """The method :func:`attend` runs (see :func:`attention_path`); an explicit 'pieces' that cannot run raises."""
    if method == "streamed" or (method == "auto" and key_block is not None and key_block < t_k):
        return "streamed"
    if method in ("pieces", "auto"):
        autocast = torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)
        blocks = [lv.block_size for lv in levels]
        windows = [lv.window for lv in levels]
        why = _pieces.pieces_blocker(blocks, windows, t_q, t_k, q_offset, has_mask, device, dtype, autocast)
        if why is None and method == "auto" and not any(b is not None and b < t_k for b in blocks):
            why = "no block level shorter than the sequence"  # sdpa is one fused call already
        if why is None:
            return "pieces"
        if method == "pieces":
            raise ValueError(f"{where}: method='pieces' does not apply: {why}; use method='auto' to fall back")
    if method in ("sdpa", "scores"):
        return method
    width = _expanded_width(levels, widths, t_q, t_k, q_offset)
    return "sdpa" if width is not None and width <= 2 * sum(widths) else "scores"


def attention_path(
    levels: sm.LinearOperator | Level | Sequence[Level],
    t_q: int,
    t_k: int | None = None,
    *,
    q_offset: int = 0,
    key_block: int | None = None,
    method: str = "auto",
    mask: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> str:
    """Which method :func:`structured_attention` / :func:`attend` runs for these levels and sizes (no work done).

    Args:
        levels: an operator, a :class:`Level` or a list of Levels.
        t_q: queries.
        t_k: keys (default ``t_q``).
        q_offset: absolute position of the first query.
        key_block: the ``key_block`` argument.
        method: the ``method`` argument (``"auto"`` resolves; an explicit one is returned as is, after checking that
            ``"pieces"`` applies).
        mask: whether a user mask is given.
        dtype: the features' dtype (default: the operators' parameters', else float32).
        device: the features' device (default: the operators' parameters').

    Returns:
        ``"pieces"``, ``"sdpa"``, ``"scores"`` or ``"streamed"`` (``"empty"`` when ``t_k = 0``), the same under
        ``torch.compile`` (the pieces path's autograd function traces whole, ``fullgraph=True``).

    Example:
        >>> import structmat as sm
        >>> from structmat_attention import Level
        >>> from structmat_attention.functional import attention_path
        >>> levels = [Level(None, sm.LowRank(8, 8, rank=4)), Level(512, sm.LowRank(8, 8, rank=2))]
        >>> attention_path(levels, 1024), attention_path(levels, 1024, q_offset=3, t_k=1027)
        ('pieces', 'sdpa')
    """
    where = "attention_path"
    lvs = _as_levels(levels, where)
    t_q = check_int(where, "t_q", t_q, 0)
    t_k = t_q if t_k is None else check_int(where, "t_k", t_k, 0)
    args = _attend_args(where, False, q_offset, key_block, method, None, lvs)
    if not isinstance(mask, bool):
        raise TypeError(f"{where}: mask must be a bool (whether a mask is given), got {type(mask).__name__}")
    if dtype is None:
        dtype = next((lv.op.dtype for lv in lvs if lv.op.dtype is not None), torch.float32)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{where}: dtype must be a torch.dtype or None, got {type(dtype).__name__}")
    device = lvs[0].op.device if device is None else torch.device(device)
    if t_k == 0:
        return "empty"
    widths = [sm.bilinear_split(lv.op)[0].shape[0] for lv in lvs]
    return _choose(lvs, widths, t_q, t_k, args.q_offset, args.key_block, args.method, mask, device, dtype, where)


def structured_attention(
    x_q: torch.Tensor,
    x_k: torch.Tensor,
    v: torch.Tensor,
    levels: sm.LinearOperator | Level | Sequence[Level],
    causal: bool = False,
    mask: torch.Tensor | None = None,
    *,
    scale: float | str = 1.0,
    q_offset: int = 0,
    qk_norm: bool = False,
    key_block: int | None = None,
    method: str = "auto",
    unjoined: str | None = None,
) -> torch.Tensor:
    """``softmax(bilinear_scores(x_q, x_k, levels) + masks) @ v``.

    Args:
        x_q: ``(..., T_q, D_q)``.
        x_k: ``(..., T_k, D_k)``.
        v: values ``(..., T_k, D_v)``, or ``(..., H, T_k, D_v)`` per head.
        levels: an operator, a :class:`Level` or a list of Levels (see :func:`bilinear_scores`).
        causal: query at absolute position ``q_offset + i`` sees keys ``j <= q_offset + i`` only.
        mask: a boolean mask (True = may attend) or an additive float mask (it may require grad), broadcastable to
            the scores ``(..., [H,] T_q, T_k)``.
        scale: a number, ``"sqrt"`` or ``"mup"`` (see :func:`bilinear_scores`).
        q_offset: absolute position of the first query (an int >= 0, for decoding with a KV cache).
        qk_norm: layer-normalize query and key features.
        key_block: stream over blocks of this many keys with an online softmax (peak memory ``O(T_q · key_block)``
            per head instead of ``O(T_q · T_k)``, in the backward too: it recomputes each tile from the features
            and the saved log-sum-exp).
        method: ``"pieces"``: levels ordered coarse to fine, each block's queries attend to the keys of its
            earlier (causal) or other sibling blocks with the features of the levels that join them, and the
            finest blocks to themselves with all features, as batched calls of torch's fused CPU attention kernel
            merged exactly by their log-sum-exp (work ``Σ`` over pairs of the joined width, memory ``O(T · d)``,
            backward through the same kernel). It needs self-attention from position 0 (``T_q = T_k``,
            ``q_offset = 0``), nested block sizes (each dividing the next larger one; blocks at least as long as
            the sequence count as global), no window level, no mask, CPU tensors in float32 or float64 and no
            autocast; partial last blocks and any ratio between block sizes are fine.
            ``"scores"``: one (T_q, T_k) score matrix per head, levels accumulated into it in place;
            ``"sdpa"``: torch's fused ``scaled_dot_product_attention`` on features whose plain dot product is the
            multi-level score (a blocked level spreads its r_l features over one slot per block, width
            ``Σ_l r_l · blocks_l``; no score matrix is held; not for windowed levels); ``"streamed"``: the online
            softmax over ``key_block`` keys; ``"auto"`` (default): streamed when ``key_block`` is given, else
            pieces when it applies and some level has blocks shorter than the sequence, else sdpa when its width
            is at most twice the direct width ``Σ_l r_l``, else scores. All give the same result;
            :func:`attention_path` says which one runs. An explicit ``"pieces"`` that does not apply raises
            ValueError saying why.
        unjoined: what a pair that no level joins gets when no level is global (with a global level every
            pair is joined and this has no effect). ``"mask"``: no attention (score ``-inf``, as in sliding-window or
            block-local attention); ``"zero"``: score 0, the plain sum of bilinear forms, so the pair still gets
            attention weight; None (default): ``"mask"``.

    Returns:
        ``(..., T_q, D_v)``, or ``(..., H, T_q, D_v)`` for stacks. A query that may attend to no key (every pair
        masked, or no keys at all: ``T_k = 0``) gets zeros.

    Example:
        >>> import torch, structmat as sm
        >>> from structmat_attention import Level, structured_attention
        >>> W = sm.LowRank(8, 8, rank=4, heads=2)
        >>> x, v = torch.randn(6, 8), torch.randn(2, 6, 3)
        >>> out = structured_attention(x, x, v, W, causal=True)
        >>> out.shape, torch.allclose(out, structured_attention(x, x, v, W, causal=True, key_block=4), atol=1e-6)
        (torch.Size([2, 6, 3]), True)
        >>> local = structured_attention(x, x, v, Level(None, W, window=2))  # token i sees i - 1, i, i + 1 only
        >>> v2 = v.clone(); v2[:, 5] += 1.0  # token 5 is out of token 0's window
        >>> torch.equal(local[:, 0], structured_attention(x, x, v2, Level(None, W, window=2))[:, 0])
        True
    """
    where = "structured_attention"
    lvs = _as_levels(levels, where)
    heads = _check(lvs, x_q, x_k, where)
    args = _attend_args(where, causal, q_offset, key_block, method, unjoined, lvs)  # checked before any work
    feats = _features(lvs, x_q, x_k, scale, qk_norm, heads, where)
    return _attend(feats, v, mask, args, where)


def attend(
    features: Sequence[LevelFeatures],
    v: torch.Tensor,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    *,
    q_offset: int = 0,
    key_block: int | None = None,
    method: str = "auto",
    unjoined: str | None = None,
) -> torch.Tensor:
    """``softmax(Σ_l [pair in level l] c_l q_l k_l^T + masks) @ v`` from features (the second half of attention).

    Args:
        features: from :func:`attention_features` (keys may come from a cache: T_k is the keys' length).
        v: ``(..., T_k, D_v)`` or ``(..., H, T_k, D_v)``.
        causal: query ``q_offset + i`` sees keys ``j <= q_offset + i``.
        mask: boolean (True = may attend) or additive (it may require grad), broadcastable to
            ``(..., [H,] T_q, T_k)``.
        q_offset: absolute position of the first query (an int >= 0).
        key_block: stream over key blocks with an online softmax.
        method: ``"auto"``, ``"pieces"``, ``"sdpa"``, ``"scores"`` or ``"streamed"`` (see
            :func:`structured_attention`; :func:`attention_path` says which one ``"auto"`` runs).
        unjoined: what a pair that no level joins gets when no level is global (with a global level every
            pair is joined and this has no effect). ``"mask"``: no attention (score ``-inf``, as in sliding-window or
            block-local attention); ``"zero"``: score 0, the plain sum of bilinear forms, so the pair still gets
            attention weight; None (default): ``"mask"``.

    Returns:
        ``(..., [H,] T_q, D_v)``; zeros for a query that may attend to no key.

    Example:
        >>> import torch, structmat as sm
        >>> from structmat_attention import attend, attention_features, structured_attention
        >>> W = sm.LowRank(8, 8, rank=2, heads=2)
        >>> x, v = torch.randn(5, 8), torch.randn(2, 5, 3)
        >>> out = attend(attention_features(x, x, W), v, causal=True)
        >>> torch.allclose(out, structured_attention(x, x, v, W, causal=True))
        True
    """
    where = "attend"
    feats = _check_features(features, where)
    args = _attend_args(where, causal, q_offset, key_block, method, unjoined, [f[0] for f in feats])
    return _attend(feats, v, mask, args, where)


class _Args(NamedTuple):
    """The checked scalar arguments of :func:`attend`; ``masked``: whether unjoined pairs are masked out."""

    causal: bool
    q_offset: int
    key_block: int | None
    method: str
    masked: bool


def _attend_args(
    where: str,
    causal: object,
    q_offset: object,
    key_block: object,
    method: object,
    unjoined: object,
    levels: Sequence[Level],
) -> _Args:
    causal = _bool_arg(where, "causal", causal)
    offset = check_int(where, "q_offset", q_offset, 0)
    block = check_int(where, "key_block", key_block, 1, optional=True)
    if method not in METHODS:
        raise ValueError(f"{where}: method must be 'auto', 'pieces', 'sdpa', 'scores' or 'streamed', got {method!r}")
    if method == "sdpa" and any(lv.window is not None for lv in levels):
        raise ValueError(f"{where}: method='sdpa' cannot express a sliding-window level; use 'scores' or 'auto'")
    return _Args(causal, offset, block, method, _unjoined_arg(where, unjoined, levels))  # type: ignore[arg-type]


def _check_features(features: object, where: str) -> list[tuple[Level, torch.Tensor, torch.Tensor, float]]:
    """``features`` as plain tuples, checked: one T_q, one T_k, one dtype, widths and heads that agree."""
    if not isinstance(features, (list, tuple)) or not features:
        raise TypeError(f"{where}: features must be a non-empty list of LevelFeatures, got {type(features).__name__}")
    feats = []
    for i, f in enumerate(features):
        if not isinstance(f, tuple) or len(f) != 4:
            raise TypeError(f"{where}: features[{i}] must be a LevelFeatures (level, q, k, scale), got {f!r}")
        lv, q, k, c = f
        if not isinstance(lv, Level) or not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
            got = ", ".join(type(x).__name__ for x in (lv, q, k))
            raise TypeError(f"{where}: features[{i}] must hold a Level and two tensors, got ({got})")
        if q.ndim < 2 or k.ndim < 2 or q.shape[-1] != k.shape[-1]:
            raise ValueError(
                f"{where}: features[{i}] needs q (..., T_q, r) and k (..., T_k, r) of one width r, "
                f"got {tuple(q.shape)} and {tuple(k.shape)}"
            )
        if isinstance(c, bool) or not isinstance(c, numbers.Real):
            raise TypeError(f"{where}: features[{i}].scale must be a real number, got {type(c).__name__} {c!r}")
        if not math.isfinite(c):
            raise ValueError(f"{where}: features[{i}].scale must be finite, got {c!r}")
        feats.append((lv, q, k, float(c)))
    for side, dim in (("T_q", 1), ("T_k", 2)):
        sizes = [f[dim].shape[-2] for f in feats]
        if len(set(sizes)) > 1:
            raise ValueError(f"{where}: every level needs the same {side}, got {sizes}")
    dtypes = {x.dtype for f in feats for x in f[1:3]}
    if (len(dtypes) > 1 and not _autocasting(feats[0][1])) or not all(d.is_floating_point for d in dtypes):
        raise TypeError(
            f"{where}: features must be floating-point tensors of one dtype, got {sorted(map(str, dtypes))}"
        )
    heads = {f[0].op.heads for f in feats} - {None}
    if len(heads) > 1:
        raise ValueError(f"{where}: levels are stacks of different numbers of heads {sorted(heads)}")
    if heads:
        h = next(iter(heads))
        for i, (_, q, k, _) in enumerate(feats):
            if q.ndim < 3 or k.ndim < 3 or q.shape[-3] not in (1, h) or k.shape[-3] not in (1, h):
                raise ValueError(
                    f"{where}: features[{i}] needs q (..., H, T_q, r) and k (..., H, T_k, r) with H = {h} or 1, "
                    f"got {tuple(q.shape)} and {tuple(k.shape)}"
                )
    try:
        torch.broadcast_shapes(*(x.shape[:-2] for f in feats for x in f[1:3]))
    except RuntimeError:
        shapes = [tuple(x.shape) for f in feats for x in f[1:3]]
        raise ValueError(f"{where}: the features' batch dims do not broadcast: {shapes}") from None
    return feats


def _check_values(
    v: object, lead: torch.Size, t_k: int, heads: int | None, dtype: torch.dtype, where: str
) -> tuple[torch.Tensor, torch.Size]:
    """``v`` (with a head dim when the levels are stacks and ``v`` has none) and the output's batch dims."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{where}: v must be a tensor of shape (..., T_k={t_k}, D_v), got {type(v).__name__}")
    if v.ndim < 2 or v.shape[-2] != t_k:
        raise ValueError(f"{where}: v must have shape (..., T_k={t_k}, D_v), got {tuple(v.shape)}")
    if v.dtype != dtype and not (v.is_floating_point() and _autocasting(v)):
        raise TypeError(f"{where}: v must have the features' dtype {dtype}, got {v.dtype}")
    if heads is not None and v.ndim == len(lead) + 1:
        v = v.unsqueeze(-3)  # one value set for every head
    if heads is not None and v.ndim >= 3 and v.shape[-3] not in (1, heads):
        raise ValueError(
            f"{where}: v of shape {tuple(v.shape)} has {v.shape[-3]} heads (dim -3), the levels are stacks of "
            f"{heads}: give (..., {heads}, T_k, D_v) or (..., T_k, D_v)"
        )
    try:
        out_lead = torch.broadcast_shapes(lead, v.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"{where}: v's batch dims {tuple(v.shape[:-2])} do not broadcast with the scores' {tuple(lead)}"
        ) from None
    return v, out_lead


def _check_mask(
    mask: object, lead: torch.Size, t_q: int, t_k: int, dtype: torch.dtype, where: str
) -> torch.Tensor | None:
    """``mask`` checked against the scores' shape ``(*lead, T_q, T_k)``; an additive one in the scores' dtype."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{where}: mask must be a tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{where}: mask must be boolean (True = may attend) or floating (additive), got {mask.dtype}")
    target = (*lead, t_q, t_k)
    try:
        fits = torch.broadcast_shapes(mask.shape, target) == target
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"{where}: mask of shape {tuple(mask.shape)} does not broadcast to the scores' shape {target} "
            f"(..., [H,] T_q={t_q}, T_k={t_k})"
        )
    if mask.dtype != torch.bool and mask.dtype != dtype:
        mask = mask.to(dtype)
    if mask.ndim == 0:  # one entry for every pair: the paths slice the key dim
        mask = mask.reshape(1)
    return mask


def _attend(feats: list, v: object, mask: object, args: _Args, where: str) -> torch.Tensor:
    """The checked core of :func:`attend`: picks the method."""
    t_q, t_k = feats[0][1].shape[-2], feats[0][2].shape[-2]
    levels = [f[0] for f in feats]
    heads = next((lv.op.heads for lv in levels if lv.op.heads is not None), None)
    lead = torch.broadcast_shapes(*(x.shape[:-2] for f in feats for x in f[1:3]))
    dtype = feats[0][1].dtype
    v, out_lead = _check_values(v, lead, t_k, heads, dtype, where)
    mask = _check_mask(mask, out_lead, t_q, t_k, dtype, where)
    causal, q_offset, key_block, method, masked = args
    masked = masked and not _joins_all(levels, t_q, t_k, q_offset)
    if t_k == 0:  # no key to attend to: zeros, still connected to the inputs
        return torch.matmul(sum(torch.matmul(q, k.mT) for _, q, k, _ in feats), v)
    widths = [q.shape[-1] for _, q, _, _ in feats]
    x = feats[0][1]
    path = _choose(levels, widths, t_q, t_k, q_offset, key_block, method, mask is not None, x.device, dtype, where)
    if path == "pieces":
        plan = _pieces.plan_pieces([lv.block_size for lv in levels], widths, t_k, v.shape[-1], causal, masked)
        return _pieces.pieces_attention(plan, feats, v, out_lead)
    if path == "streamed":
        return _streamed(feats, v, t_q, t_k, causal, mask, q_offset, min(key_block or t_k, t_k), masked)
    joined = _joined(levels, t_q, 0, t_k, q_offset, feats[0][1].device) if masked else None
    if path == "sdpa":
        q, k = _expanded(feats, t_q, t_k, q_offset)
        return _sdpa(q, k, v, causal, mask, q_offset, joined)
    s = _mask_scores(_scores(feats, t_q, t_k, q_offset), causal, mask, q_offset, 0, joined)
    if mask is not None or joined is not None:  # rows with no visible key get zeros (and zero gradients)
        dead = s.amax(dim=-1, keepdim=True) == float("-inf")
        p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    else:
        p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v)
