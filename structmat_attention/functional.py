"""Attention whose score between tokens i and j is a sum of bilinear forms through structmat operators.

``s(i, j) = Σ_l [i and j in the same level-l block] · c_l · x_i^T W_l x_j``

Level ``l`` splits the positions into contiguous blocks of ``block_size`` tokens (None: one block, global); ``W_l`` is
any structmat operator, or a stack of one per head. Each ``W_l`` is applied through its cheapest split
``W_l = L_l^T R_l`` (:func:`structmat.bilinear_split`): queries become ``L_l x_i``, keys ``R_l x_j``, and a pair
costs the cut width ``r_l`` instead of the full dimension.

Standard attention is one global level with ``W = W_Q^T W_K`` (``LowRank``); Bilinear BTT attention is one level with
``W = BTT``; MLR attention has levels with ``T_l = T / 2^l`` and low-rank ``W_l``.

Memory: the scores of every level accumulate, in place, into ONE ``(T_q, T_k)`` matrix per head (a blocked level
only touches its diagonal blocks). :func:`structured_attention` with ``key_block=B`` instead streams over key blocks
with an online softmax and never holds more than ``(T_q, B)`` scores per head, forward or backward.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

import structmat as sm

__all__ = [
    "Level",
    "LevelFeatures",
    "bilinear_scores",
    "structured_attention",
    "attention_features",
    "attend",
    "level_features",
    "resolve_scale",
]


@dataclass(frozen=True)
class Level:
    """One level of a multi-level bilinear score.

    Attributes:
        block_size: tokens per contiguous block (positions counted from 0); None for one global block.
        op: the operator ``W`` of shape ``(D_q, D_k)``, or a stack of one per head.
        scale: the level's constant ``c_l``.
        window: instead of blocks, a sliding window: query i and key j interact when ``|i - j| < window``
            (positions absolute). Exclusive with ``block_size``.
    """

    block_size: int | None
    op: sm.LinearOperator
    scale: float = 1.0
    window: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.op, sm.LinearOperator):
            raise TypeError(f"Level: op must be a structmat LinearOperator, got {type(self.op).__name__}")
        b = self.block_size
        if b is not None and (isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 1):
            raise ValueError(f"Level({self.op.name}): block_size must be None or an int >= 1, got {b!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, numbers.Real):
            raise TypeError(f"Level({self.op.name}): scale must be a real number, got {self.scale!r}")
        w = self.window
        if w is not None:
            if isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < 1:
                raise ValueError(f"Level({self.op.name}): window must be None or an int >= 1, got {w!r}")
            if b is not None:
                raise ValueError(f"Level({self.op.name}): give block_size={b} or window={w}, not both")

    def pair_mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
        """Which (query, key) positions this level joins, or None when it joins all."""
        if self.block_size is not None:
            return (q_pos[:, None] // self.block_size) == (k_pos[None, :] // self.block_size)
        if self.window is not None:
            return (q_pos[:, None] - k_pos[None, :]).abs() < self.window
        return None


def _as_levels(levels: sm.LinearOperator | Level | Sequence[Level], where: str) -> list[Level]:
    if isinstance(levels, sm.LinearOperator):
        return [Level(None, levels)]
    if isinstance(levels, Level):
        return [levels]
    if isinstance(levels, (list, tuple)) and levels and all(isinstance(lv, Level) for lv in levels):
        return list(levels)
    raise TypeError(f"{where}: expected an operator, a Level or a non-empty list of Levels, got {levels!r}")


def _side(op: sm.LinearOperator, x: torch.Tensor) -> torch.Tensor:
    """``op`` on the last dim of ``x`` (..., T, D) -> (..., T, r), or (..., H, T, r) for a stack."""
    y = op(x)
    return y.movedim(-2, -3) if op.heads is not None else y


def level_features(level: Level, x_q: torch.Tensor, x_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key features of one level: ``(L x_q, R x_k)``, each ``(..., [H,] T, r)``."""
    left, right = sm.bilinear_split(level.op)  # computed once, kept on the operator
    return _side(left, x_q), _side(right, x_k)


def resolve_scale(scale: float | str, width: int, where: str = "bilinear_scores") -> float:
    """The logit scale: a number, or ``"sqrt"`` (1/sqrt(d)) or ``"mup"`` (1/d) for feature width ``d``.

    >>> resolve_scale("sqrt", 64), resolve_scale("mup", 64), resolve_scale(0.5, 64)
    (0.125, 0.015625, 0.5)
    """
    if isinstance(scale, str):
        if scale == "sqrt":
            return 1.0 / math.sqrt(width)
        if scale == "mup":
            return 1.0 / width
        raise ValueError(f"{where}: scale must be a number, 'sqrt' (1/sqrt(d)) or 'mup' (1/d), got {scale!r}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{where}: scale must be a number, 'sqrt' or 'mup', got {type(scale).__name__}")
    return float(scale)


def _check(levels: list[Level], x_q: torch.Tensor, x_k: torch.Tensor, where: str) -> int | None:
    for name, x in (("x_q", x_q), ("x_k", x_k)):
        if not isinstance(x, torch.Tensor) or x.ndim < 2:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{where}: {name} must be a tensor of shape (..., T, D), got {got}")
    heads = {lv.op.heads for lv in levels} - {None}
    if len(heads) > 1:
        raise ValueError(f"{where}: levels are stacks of different numbers of heads {sorted(heads)}")
    for lv in levels:
        m, n = lv.op.shape
        if x_q.shape[-1] != m or x_k.shape[-1] != n:
            raise ValueError(
                f"{where}: {lv.op.name} needs x_q (..., T_q, {m}) and x_k (..., T_k, {n}), "
                f"got {tuple(x_q.shape)} and {tuple(x_k.shape)}"
            )
    return heads.pop() if heads else None


def _block_ranges(block: int, t_q: int, t_k: int, q_offset: int) -> list[tuple[int, int, int, int]]:
    """``(q0, q1, k0, k1)`` for every block that holds both queries (at ``q_offset + i``) and keys (at ``j``)."""
    out = []
    first, last = q_offset // block, (q_offset + t_q - 1) // block
    for u in range(first, last + 1):
        k0, k1 = u * block, min((u + 1) * block, t_k)
        if k0 >= k1:
            continue
        q0, q1 = max(u * block - q_offset, 0), min((u + 1) * block - q_offset, t_q)
        out.append((q0, q1, k0, k1))
    return out


def _features(
    levels: list[Level], x_q: torch.Tensor, x_k: torch.Tensor, scale: float | str, qk_norm: bool, heads: int | None
) -> list[tuple[Level, torch.Tensor, torch.Tensor, float]]:
    feats = [(lv, *level_features(lv, x_q, x_k)) for lv in levels]
    width = sum(q.shape[-1] for _, q, _ in feats)
    base = resolve_scale(scale, width)
    out = []
    for lv, q, k in feats:
        if qk_norm:
            q = torch.nn.functional.layer_norm(q, q.shape[-1:])
            k = torch.nn.functional.layer_norm(k, k.shape[-1:])
        if heads is not None:  # a side shared by the heads broadcasts over them
            q = q if q.ndim == x_q.ndim + 1 else q.unsqueeze(-3)
            k = k if k.ndim == x_k.ndim + 1 else k.unsqueeze(-3)
        out.append((lv, q, k, base * lv.scale))
    return out


def bilinear_scores(
    x_q: torch.Tensor,
    x_k: torch.Tensor,
    levels: sm.LinearOperator | Level | Sequence[Level],
    scale: float | str = 1.0,
    *,
    q_offset: int = 0,
    qk_norm: bool = False,
) -> torch.Tensor:
    """``s[..., i, j] = scale · Σ_l [same level-l block] · c_l · x_q[i]^T W_l x_k[j]``.

    Args:
        x_q: queries' tokens ``(..., T_q, D_q)``.
        x_k: keys' tokens ``(..., T_k, D_k)``.
        levels: an operator ``W`` (one global level), a :class:`Level`, or a list of them.
        scale: a number, ``"sqrt"`` (1/sqrt(d)) or ``"mup"`` (1/d), with d the total feature width over levels.
        q_offset: absolute position of the first query (keys start at 0), for incremental decoding.
        qk_norm: layer-normalize each level's query and key features (no affine) before the product.

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
    """
    where = "bilinear_scores"
    lvs = _as_levels(levels, where)
    heads = _check(lvs, x_q, x_k, where)
    feats = _features(lvs, x_q, x_k, scale, qk_norm, heads)
    return _scores(feats, x_q.shape[-2], x_k.shape[-2], q_offset)


Tile = tuple[int, int, int, int, "torch.Tensor | None"]


def _reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a gradient over the dims its input was broadcast along."""
    while grad.ndim > len(shape):
        grad = grad.sum(0)
    dims = [d for d, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1]
    return grad.sum(dims, keepdim=True) if dims else grad


class _AddTiles(torch.autograd.Function):
    """``s[..., a:b, ka:kb] += c * (q[..., a:b, :] @ k[..., ka:kb, :]^T) (* mask)`` for every tile, in place.

    Autograd's own in-place slice updates clone the whole (T_q, T_k) gradient once per slice; this backward reads
    the tiles of the incoming gradient directly.
    """

    @staticmethod
    def forward(ctx, s, q, k, tiles, c):  # type: ignore[override]
        for a, b, ka, kb, near in tiles:
            part = torch.matmul(q[..., a:b, :], k[..., ka:kb, :].mT)
            if near is not None:
                part = part * near
            s[..., a:b, ka:kb].add_(part, alpha=c)
        ctx.mark_dirty(s)
        ctx.save_for_backward(q, k)
        ctx.tiles, ctx.c = tiles, c
        return s

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        q, k = ctx.saved_tensors
        lead = grad.shape[:-2]
        gq = q.new_zeros(*lead, *q.shape[-2:]) if ctx.needs_input_grad[1] else None
        gk = k.new_zeros(*lead, *k.shape[-2:]) if ctx.needs_input_grad[2] else None
        for a, b, ka, kb, near in ctx.tiles:
            g = grad[..., a:b, ka:kb]
            if near is not None:
                g = g * near
            if gq is not None:
                gq[..., a:b, :] += torch.matmul(g, k[..., ka:kb, :]) * ctx.c
            if gk is not None:
                gk[..., ka:kb, :] += torch.matmul(g.mT, q[..., a:b, :]) * ctx.c
        gq = _reduce_to(gq, q.shape) if gq is not None else None
        gk = _reduce_to(gk, k.shape) if gk is not None else None
        return grad, gq, gk, None, None


def _tiles(lv: Level, t_q: int, t_k: int, q_offset: int, device: torch.device, dtype: torch.dtype) -> list[Tile]:
    if lv.block_size is not None:
        return [(a, b, ka, kb, None) for a, b, ka, kb in _block_ranges(lv.block_size, t_q, t_k, q_offset)]
    w = int(lv.window or 1)  # a Level without blocks that reaches here has a window
    out: list[Tile] = []
    for a in range(0, t_q, w):  # query chunks of w see keys within w of their ends: a (w, <= 3w) tile each
        b = min(a + w, t_q)
        ka, kb = max(q_offset + a - w + 1, 0), min(q_offset + b + w - 1, t_k)
        if ka < kb:
            near = lv.pair_mask(torch.arange(a, b, device=device) + q_offset, torch.arange(ka, kb, device=device))
            out.append((a, b, ka, kb, near.to(dtype)))
    return out


def _scores(feats: list, t_q: int, t_k: int, q_offset: int) -> torch.Tensor:
    """Accumulate every level into one score matrix per head: global levels first, then blocks and windows."""
    lead = torch.broadcast_shapes(*(q.shape[:-2] for _, q, _, _ in feats), *(k.shape[:-2] for _, _, k, _ in feats))
    s = None
    for lv, q, k, c in sorted(feats, key=lambda f: f[0].block_size is not None or f[0].window is not None):
        if lv.block_size is None and lv.window is None:
            if s is None:
                s = torch.matmul(q, k.mT)
                if s.shape[:-2] != lead:
                    s = s.expand(*lead, t_q, t_k).contiguous()
                if c != 1.0:
                    s = s.mul_(c)
            else:  # in place: no second (T_q, T_k) matrix
                q3 = q.expand(*lead, t_q, q.shape[-1]).reshape(-1, t_q, q.shape[-1])
                k3 = k.expand(*lead, t_k, k.shape[-1]).reshape(-1, t_k, k.shape[-1])
                s.view(-1, t_q, t_k).baddbmm_(q3, k3.mT, alpha=c)
            continue
        if s is None:
            s = q.new_zeros(*lead, t_q, t_k)
        s = _AddTiles.apply(s, q, k, _tiles(lv, t_q, t_k, q_offset, q.device, q.dtype), c)
    return s


def _expanded(feats: list, t_q: int, t_k: int, q_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One pair of features whose plain dot product is the multi-level score.

    A blocked level's features are spread over one slot per block (``q ⊗ e_block(i)``), so a query and a key in
    different blocks meet only zeros. Width ``Σ_l r_l · blocks_l``.
    """
    qs, ks = [], []
    for lv, q, k, c in feats:
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
        q = q.expand(*lead, *q.shape[-2:]) * c if c != 1.0 else q.expand(*lead, *q.shape[-2:])
        k = k.expand(*lead, *k.shape[-2:])
        if lv.block_size is not None:
            b = lv.block_size
            nb = -(-max(q_offset + t_q, t_k) // b)
            qid = (torch.arange(t_q, device=q.device) + q_offset) // b
            kid = torch.arange(t_k, device=k.device) // b
            onehot_q = torch.nn.functional.one_hot(qid, nb).to(q.dtype)
            onehot_k = torch.nn.functional.one_hot(kid, nb).to(k.dtype)
            q = (q.unsqueeze(-1) * onehot_q[:, None, :]).flatten(-2)
            k = (k.unsqueeze(-1) * onehot_k[:, None, :]).flatten(-2)
        qs.append(q)
        ks.append(k)
    lead = torch.broadcast_shapes(*(q.shape[:-2] for q in qs), *(k.shape[:-2] for k in ks))
    q = torch.cat([x.expand(*lead, *x.shape[-2:]) for x in qs], dim=-1)
    k = torch.cat([x.expand(*lead, *x.shape[-2:]) for x in ks], dim=-1)
    return q, k


def _expanded_width(feats: list, t_q: int, t_k: int, q_offset: int) -> int | None:
    """Width of :func:`_expanded`'s features, or None when a level (a window) has no such form."""
    width = 0
    for lv, q, _, _ in feats:
        if lv.window is not None:
            return None
        blocks = 1 if lv.block_size is None else -(-max(q_offset + t_q, t_k) // lv.block_size)
        width += q.shape[-1] * blocks
    return width


def _mask_scores(
    s: torch.Tensor, causal: bool, mask: torch.Tensor | None, q_offset: int, k_start: int = 0
) -> torch.Tensor:
    t_q, t_k = s.shape[-2:]
    if causal:
        qpos = torch.arange(t_q, device=s.device) + q_offset
        kpos = torch.arange(t_k, device=s.device) + k_start
        s = s.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask, float("-inf"))
        else:
            s = s + mask
    return s


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
) -> torch.Tensor:
    """``softmax(bilinear_scores(x_q, x_k, levels) + masks) @ v``.

    Args:
        x_q: ``(..., T_q, D_q)``.
        x_k: ``(..., T_k, D_k)``.
        v: values ``(..., T_k, D_v)``, or ``(..., H, T_k, D_v)`` per head.
        levels: an operator, a :class:`Level` or a list of Levels (see :func:`bilinear_scores`).
        causal: query at absolute position ``q_offset + i`` sees keys ``j <= q_offset + i`` only.
        mask: a boolean mask (True = may attend) or an additive float mask, broadcastable to the scores
            ``(..., [H,] T_q, T_k)``.
        scale: a number, ``"sqrt"`` or ``"mup"`` (see :func:`bilinear_scores`).
        q_offset: absolute position of the first query (for decoding with a KV cache).
        qk_norm: layer-normalize query and key features.
        key_block: stream over blocks of this many keys with an online softmax (peak memory ``O(T_q · key_block)``
            per head instead of ``O(T_q · T_k)``, in the backward too: it recomputes each tile from the features
            and the saved log-sum-exp).
        method: ``"scores"``: one (T_q, T_k) score matrix per head, levels accumulated into it in place;
            ``"sdpa"``: torch's fused ``scaled_dot_product_attention`` on features whose plain dot product is the
            multi-level score (a blocked level spreads its r_l features over one slot per block, width
            ``Σ_l r_l · blocks_l``; no score matrix is held; not for windowed levels); ``"streamed"``: the online
            softmax over ``key_block`` keys; ``"auto"`` (default): streamed when ``key_block`` is given, else sdpa
            when its width is at most twice the direct width ``Σ_l r_l``, else scores.

    Returns:
        ``(..., T_q, D_v)``, or ``(..., H, T_q, D_v)`` for stacks. A query that may attend to no key gets zeros.

    Example:
        >>> import torch, structmat as sm
        >>> from structmat_attention import structured_attention
        >>> W = sm.LowRank(8, 8, rank=4, heads=2)
        >>> x, v = torch.randn(6, 8), torch.randn(2, 6, 3)
        >>> out = structured_attention(x, x, v, W, causal=True)
        >>> out.shape, torch.allclose(out, structured_attention(x, x, v, W, causal=True, key_block=4), atol=1e-6)
        (torch.Size([2, 6, 3]), True)
    """
    feats = attention_features(x_q, x_k, levels, scale, qk_norm=qk_norm)
    return attend(feats, v, causal, mask, q_offset=q_offset, key_block=key_block, method=method)


class LevelFeatures(NamedTuple):
    """One level's query and key features, ``(..., [H,] T, r)`` each, and its constant (logit scale included)."""

    level: Level
    q: torch.Tensor
    k: torch.Tensor
    scale: float


def attention_features(
    x_q: torch.Tensor,
    x_k: torch.Tensor,
    levels: sm.LinearOperator | Level | Sequence[Level],
    scale: float | str = 1.0,
    *,
    qk_norm: bool = False,
) -> list[LevelFeatures]:
    """Every level's query features ``L_l x_q`` and key features ``R_l x_k`` (the first half of attention).

    A KV cache keeps the key features and passes them, with fresh query features, to :func:`attend`.

    Example:
        >>> import torch, structmat as sm
        >>> from structmat_attention import attention_features
        >>> f = attention_features(torch.randn(5, 8), torch.randn(5, 8), sm.LowRank(8, 8, rank=3, heads=2), "sqrt")
        >>> f[0].q.shape, f[0].k.shape, round(f[0].scale, 4)
        (torch.Size([2, 5, 3]), torch.Size([2, 5, 3]), 0.5774)
    """
    where = "attention_features"
    lvs = _as_levels(levels, where)
    heads = _check(lvs, x_q, x_k, where)
    return [LevelFeatures(*f) for f in _features(lvs, x_q, x_k, scale, qk_norm, heads)]


def attend(
    features: Sequence[LevelFeatures],
    v: torch.Tensor,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    *,
    q_offset: int = 0,
    key_block: int | None = None,
    method: str = "auto",
) -> torch.Tensor:
    """``softmax(Σ_l [pair in level l] c_l q_l k_l^T + masks) @ v`` from features (the second half of attention).

    Args:
        features: from :func:`attention_features` (keys may come from a cache: T_k is the keys' length).
        v: ``(..., T_k, D_v)`` or ``(..., H, T_k, D_v)``.
        causal: query ``q_offset + i`` sees keys ``j <= q_offset + i``.
        mask: boolean (True = may attend) or additive, broadcastable to ``(..., [H,] T_q, T_k)``.
        q_offset: absolute position of the first query.
        key_block: stream over key blocks with an online softmax.
        method: ``"auto"``, ``"sdpa"``, ``"scores"`` or ``"streamed"`` (see :func:`structured_attention`).

    Returns:
        ``(..., [H,] T_q, D_v)``.
    """
    where = "attend"
    feats = [tuple(f) for f in features]
    if not feats or any(len(f) != 4 for f in feats):
        raise TypeError(f"{where}: features must be a non-empty list of LevelFeatures")
    t_q, t_k = feats[0][1].shape[-2], feats[0][2].shape[-2]
    heads = next((f[1].shape[-3] for f in feats if f[0].op.heads is not None), None)
    if not isinstance(v, torch.Tensor) or v.ndim < 2 or v.shape[-2] != t_k:
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"{where}: v must have shape (..., T_k={t_k}, D_v), got {got}")
    if heads is not None and v.ndim == feats[0][2].ndim - 1:
        v = v.unsqueeze(-3)  # one value set for every head
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TypeError(f"{where}: mask must be a tensor or None, got {type(mask).__name__}")
    if key_block is not None and (isinstance(key_block, bool) or not isinstance(key_block, int) or key_block < 1):
        raise ValueError(f"{where}: key_block must be None or an int >= 1, got {key_block!r}")
    if method not in ("auto", "sdpa", "scores", "streamed"):
        raise ValueError(f"{where}: method must be 'auto', 'sdpa', 'scores' or 'streamed', got {method!r}")
    if key_block is not None and key_block < t_k and method in ("auto", "streamed"):
        return _streamed(feats, v, t_q, t_k, causal, mask, q_offset, key_block)
    if method == "streamed":
        return _streamed(feats, v, t_q, t_k, causal, mask, q_offset, key_block or t_k)
    width = _expanded_width(feats, t_q, t_k, q_offset)
    direct = sum(q.shape[-1] for _, q, _, _ in feats)
    if method == "sdpa" and width is None:
        raise ValueError(f"{where}: method='sdpa' cannot express a sliding-window level; use 'scores' or 'auto'")
    if method == "sdpa" or (method == "auto" and width is not None and width <= 2 * direct):
        q, k = _expanded(feats, t_q, t_k, q_offset)
        return _sdpa(q, k, v, causal, mask, q_offset)
    s = _mask_scores(_scores(feats, t_q, t_k, q_offset), causal, mask, q_offset)
    p = torch.softmax(s, dim=-1)
    if mask is not None:
        p = torch.nan_to_num(p, nan=0.0)  # rows with no visible key
    return torch.matmul(p, v)


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, mask: torch.Tensor | None, q_offset: int
) -> torch.Tensor:
    """torch's fused attention on the expanded features (scale already folded into q).

    The fused CPU kernel needs one head dim for q, k and v (else torch falls back to a path that materializes the
    scores), so the narrower side is zero-padded: zero features add nothing to a dot product, zero value columns
    are cut off again.
    """
    t_q, t_k = q.shape[-2], k.shape[-2]
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    q, k, v = (x.expand(*lead, *x.shape[-2:]) for x in (q, k, v))
    d_v = v.shape[-1]
    if q.shape[-1] > d_v:
        v = torch.nn.functional.pad(v, (0, q.shape[-1] - d_v))
    elif q.shape[-1] < d_v:
        q = torch.nn.functional.pad(q, (0, d_v - q.shape[-1]))
        k = torch.nn.functional.pad(k, (0, d_v - k.shape[-1]))
    return _sdpa_core(q, k, v, causal, mask, q_offset, t_q, t_k)[..., :d_v]


def _sdpa_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    mask: torch.Tensor | None,
    q_offset: int,
    t_q: int,
    t_k: int,
) -> torch.Tensor:
    if mask is None and (not causal or (q_offset == 0 and t_q == t_k)):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=1.0)
    allowed = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device)
    if causal:
        allowed = (
            torch.arange(t_k, device=q.device)[None, :] <= (torch.arange(t_q, device=q.device) + q_offset)[:, None]
        )
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=1.0)
            return torch.nan_to_num(out, nan=0.0) * allowed.any(-1, keepdim=True)
        add = mask.to(q.dtype).masked_fill(~allowed, float("-inf"))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=add, scale=1.0)
        return torch.nan_to_num(out, nan=0.0)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=1.0)


def _block_scores(
    feats: list, t_q: int, k0: int, k1: int, causal: bool, mask: torch.Tensor | None, q_offset: int
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Scores of every query against keys ``k0 .. k1 - 1`` (masked), and each level's pair mask there."""
    qpos = torch.arange(t_q, device=feats[0][1].device) + q_offset
    kpos = torch.arange(k0, k1, device=qpos.device)
    s = None
    nears = []
    for lv, q, k, c in feats:
        part = torch.matmul(q, k[..., k0:k1, :].mT)
        near = lv.pair_mask(qpos, kpos)
        near = near.to(part.dtype) if near is not None else None
        nears.append(near)
        if near is not None:
            part = part * near
        if c != 1.0:
            part = part * c
        s = part if s is None else s + part
    sub_mask = None
    if mask is not None:
        sub_mask = mask[..., k0:k1] if mask.shape[-1] != 1 else mask
    return _mask_scores(s, causal, sub_mask, q_offset, k0), nears


class _Streamed(torch.autograd.Function):
    """Online softmax over key blocks, forward and backward: neither holds more than one ``(T_q, key_block)`` tile
    of scores per head (the backward recomputes each tile from the features and the saved log-sum-exp, as flash
    attention does). The mask is a constant: no gradient flows to it."""

    @staticmethod
    def forward(ctx, setup, v, *qk):  # type: ignore[override]
        levels, scales, t_q, t_k, causal, mask, q_offset, kb = setup
        feats = [(lv, qk[2 * i], qk[2 * i + 1], c) for i, (lv, c) in enumerate(zip(levels, scales))]
        running_max = denom = acc = None
        for k0 in range(0, t_k, kb):
            k1 = min(k0 + kb, t_k)
            s, _ = _block_scores(feats, t_q, k0, k1, causal, mask, q_offset)
            block_max = s.amax(dim=-1, keepdim=True)
            new_max = block_max if running_max is None else torch.maximum(running_max, block_max)
            safe = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
            p = torch.exp(s - safe)
            vb = v[..., k0:k1, :]
            if acc is None:
                denom, acc = p.sum(dim=-1, keepdim=True), torch.matmul(p, vb)
            else:
                old = torch.exp(torch.where(torch.isfinite(running_max), running_max, safe) - safe)
                denom = denom * old + p.sum(dim=-1, keepdim=True)
                acc = acc * old + torch.matmul(p, vb)
            running_max = new_max
        safe = torch.where(torch.isfinite(running_max), running_max, torch.zeros_like(running_max))
        lse = torch.where(denom > 0, safe + torch.log(denom), torch.full_like(denom, float("-inf")))
        out = torch.where(denom > 0, acc / denom.clamp_min(torch.finfo(acc.dtype).tiny), torch.zeros_like(acc))
        ctx.setup = setup
        ctx.save_for_backward(v, out, lse, *qk)
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        levels, scales, t_q, t_k, causal, mask, q_offset, kb = ctx.setup
        v, out, lse, *qk = ctx.saved_tensors
        feats = [(lv, qk[2 * i], qk[2 * i + 1], c) for i, (lv, c) in enumerate(zip(levels, scales))]
        lead = dout.shape[:-2]
        grads = [x.new_zeros(*lead, *x.shape[-2:]) for x in qk]
        dv = v.new_zeros(*lead, *v.shape[-2:])
        delta = (dout * out).sum(-1, keepdim=True)
        live = torch.isfinite(lse)
        lse0 = torch.where(live, lse, torch.zeros_like(lse))
        for k0 in range(0, t_k, kb):
            k1 = min(k0 + kb, t_k)
            s, nears = _block_scores(feats, t_q, k0, k1, causal, mask, q_offset)
            p = torch.where(live, torch.exp(s - lse0), torch.zeros_like(s))
            dv[..., k0:k1, :] += torch.matmul(p.mT, dout)
            ds = p * (torch.matmul(dout, v[..., k0:k1, :].mT) - delta)
            for i, ((_, q, k, c), near) in enumerate(zip(feats, nears)):
                g = ds * near if near is not None else ds
                if c != 1.0:
                    g = g * c
                grads[2 * i] += torch.matmul(g, k[..., k0:k1, :])
                grads[2 * i + 1][..., k0:k1, :] += torch.matmul(g.mT, q)
        grads = [_reduce_to(g, x.shape) for g, x in zip(grads, qk)]
        return (None, _reduce_to(dv, v.shape), *grads)


def _streamed(
    feats: list, v: torch.Tensor, t_q: int, t_k: int, causal: bool, mask: torch.Tensor | None, q_offset: int, kb: int
) -> torch.Tensor:
    """Online softmax over key blocks of ``kb`` keys (see :class:`_Streamed`)."""
    setup = ([f[0] for f in feats], [f[3] for f in feats], t_q, t_k, causal, mask, q_offset, kb)
    qk = [x for f in feats for x in (f[1], f[2])]
    return _Streamed.apply(setup, v, *qk)
