"""Attention whose score between tokens i and j is a sum of bilinear forms through structmat operators.

``s(i, j) = Σ_l [i and j in the same level-l block] · c_l · x_i^T W_l x_j``

Level ``l`` splits the positions into contiguous blocks of ``block_size`` tokens (None: one block, global); ``W_l`` is
any structmat operator, or a stack of one per head. Each ``W_l`` is applied through its cheapest split
``W_l = L_l^T R_l`` (:func:`structmat.bilinear_split`): queries become ``L_l x_i``, keys ``R_l x_j``, and a pair
costs the cut width ``r_l`` instead of the full dimension.

A pair that no level joins (possible only when no level is global: blocks and sliding windows) gets no attention by
default; ``unjoined="zero"`` gives it score 0 instead (the plain sum above).

Standard attention is one global level with ``W = W_Q^T W_K`` (``LowRank``); Bilinear BTT attention is one level with
``W = BTT``; MLR attention has levels with ``T_l = T / 2^l`` and low-rank ``W_l``.

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
from dataclasses import dataclass
from typing import NamedTuple

import torch

import structmat as sm

from . import _pieces

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


def _int_arg(where: str, what: str, value: object, minimum: int, *, optional: bool = False) -> int | None:
    """``value`` as a plain int >= ``minimum`` (any integer type but bool), or None when ``optional``."""
    if value is None and optional:
        return None
    kind = f"{'None or ' if optional else ''}an int >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: {what} must be {kind}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{where}: {what} must be {kind}, got {value!r}")
    return int(value)


def _autocasting(x: torch.Tensor) -> bool:
    """Whether autocast is on for ``x``'s device (then dtypes may differ: autocast casts them)."""
    kind = x.device.type
    return torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)


def _bool_arg(where: str, what: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{where}: {what} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _unjoined_arg(where: str, unjoined: object, levels: Sequence[Level]) -> bool:
    """Whether pairs that no level joins are masked out (False also when some level joins every pair)."""
    if unjoined is not None and unjoined not in ("zero", "mask"):
        raise ValueError(f"{where}: unjoined must be None, 'zero' or 'mask', got {unjoined!r}")
    if any(lv.is_global for lv in levels):
        return False
    return unjoined != "zero"


@dataclass(frozen=True)
class Level:
    """One level of a multi-level bilinear score.

    Attributes:
        block_size: tokens per contiguous block (positions counted from 0); None for one global block.
        op: the operator ``W`` of shape ``(D_q, D_k)``, or a stack of one per head.
        scale: the level's constant ``c_l``.
        window: instead of blocks, a sliding window: query i and key j interact when ``|i - j| < window``
            (positions absolute). Exclusive with ``block_size``.

    Building a Level computes the operator's split (:func:`structmat.bilinear_split`, kept on the operator), so
    attention over Levels built beforehand compiles with ``torch.compile(fullgraph=True)``.
    """

    block_size: int | None
    op: sm.LinearOperator
    scale: float = 1.0
    window: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.op, sm.LinearOperator):
            raise TypeError(f"Level: op must be a structmat LinearOperator, got {type(self.op).__name__}")
        where = f"Level({self.op.name})"
        b = _int_arg(where, "block_size", self.block_size, 1, optional=True)
        w = _int_arg(where, "window", self.window, 1, optional=True)
        if isinstance(self.scale, bool) or not isinstance(self.scale, numbers.Real):
            raise TypeError(f"{where}: scale must be a real number, got {type(self.scale).__name__} {self.scale!r}")
        if not math.isfinite(self.scale):
            raise ValueError(f"{where}: scale must be finite, got {self.scale!r}")
        if b is not None and w is not None:
            raise ValueError(f"{where}: give block_size={b} or window={w}, not both")
        object.__setattr__(self, "block_size", b)  # plain ints (numpy integers are accepted)
        object.__setattr__(self, "window", w)
        sides = sm.bilinear_split(self.op)  # computed now, outside any compiled region, and kept on the operator
        dense = tuple(_dense_is_cheapest(side) for side in sides)
        object.__setattr__(self, "_dense_sides", dense)
        object.__setattr__(
            self, "_side_params", tuple(_param_of(self.op, s) if d else None for s, d in zip(sides, dense))
        )

    @property
    def is_global(self) -> bool:
        """Whether the level joins every pair (no blocks, no window)."""
        return self.block_size is None and self.window is None

    def pair_mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
        """Which (query, key) positions this level joins, or None when it joins all."""
        if self.block_size is not None:
            return (q_pos[:, None] // self.block_size) == (k_pos[None, :] // self.block_size)
        if self.window is not None:
            return (q_pos[:, None] - k_pos[None, :]).abs() < self.window
        return None


def _dense_is_cheapest(side: sm.LinearOperator) -> bool:
    """Whether applying ``side`` costs as much as a dense matrix of its shape (a plain factor such as a low-rank
    side): then several levels' sides run as ONE matmul with their dense matrices stacked (:func:`_fused_sides`)."""
    m, n = side.shape
    flops = side.cost(1).flops
    return flops > 0 and flops >= 2 * (side.heads or 1) * m * n


def _param_of(op: sm.LinearOperator, side: sm.LinearOperator) -> tuple[str, bool] | None:
    """``(name, transposed)`` when ``side``'s dense matrix IS one of ``op``'s parameters (a low-rank side is a factor,
    a dense side the weight), found once by value: then the features read the parameter itself, not ``dense()``."""
    try:
        if side.device.type == "meta":
            return None
        d = side.dense().detach()
    except (RuntimeError, ValueError, NotImplementedError):  # an operator without a dense form here: no shortcut
        return None
    for name, p in op.named_parameters():
        for transposed in (False, True):
            m = p.detach().mT if transposed else p.detach()
            if m.shape == d.shape and torch.equal(m, d):
                return name, transposed
    return None


def _side_matrix(level: Level, j: int, side: sm.LinearOperator) -> torch.Tensor:
    """The dense matrix of side ``j`` of ``level``'s split: its parameter when :func:`_param_of` found one."""
    found = getattr(level, "_side_params", (None, None))[j]
    if found is None:
        return side.dense()
    p = level.op.get_parameter(found[0])
    return p.mT if found[1] else p


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
    """Query and key features of one level: ``(L x_q, R x_k)``, each ``(..., [H,] T, r)``.

    Example:
        >>> import torch, structmat as sm
        >>> from structmat_attention import Level, level_features
        >>> q, k = level_features(Level(None, sm.LowRank(8, 6, rank=2, heads=3)), torch.randn(5, 8), torch.randn(4, 6))
        >>> q.shape, k.shape
        (torch.Size([3, 5, 2]), torch.Size([3, 4, 2]))
    """
    if not isinstance(level, Level):
        raise TypeError(f"level_features: level must be a Level, got {type(level).__name__}")
    _check([level], x_q, x_k, "level_features")
    return _level_features(level, x_q, x_k)


def _level_features(level: Level, x_q: torch.Tensor, x_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    left, right = sm.bilinear_split(level.op)  # computed once, kept on the operator
    return _side(left, x_q), _side(right, x_k)


def _all_level_features(
    levels: Sequence[Level], x_q: torch.Tensor, x_k: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every level's ``(L x_q, R x_k)``. The sides that cost as much as their dense matrix and read the same tokens
    (every query side, every key side, or both when ``x_q is x_k``) run as one matmul with their dense matrices
    stacked, one GEMM instead of one small product per level and side (the features are then views of its output)."""
    jobs = [
        (i, j, side, x)
        for i, lv in enumerate(levels)
        for j, (side, x) in enumerate(zip(sm.bilinear_split(lv.op), (x_q, x_k)))
    ]
    out: list[list[torch.Tensor | None]] = [[None, None] for _ in levels]
    groups: dict[tuple[int, int | None], list] = {}
    for i, j, side, x in jobs:
        if getattr(levels[i], "_dense_sides", (False, False))[j]:
            groups.setdefault((id(x), side.heads), []).append((i, j, side, x))
    for group in groups.values():
        if len(group) < 2:
            continue
        x = group[0][3]
        weight = torch.cat([_side_matrix(levels[i], j, side).reshape(-1, x.shape[-1]) for i, j, side, _ in group])
        widths = [(side.heads or 1) * side.shape[0] for _, _, side, _ in group]
        parts = torch.matmul(x, weight.mT).split(widths, dim=-1)  # one split: its backward is one concatenation
        for (i, j, side, _), part in zip(group, parts):
            h = side.heads
            out[i][j] = part.unflatten(-1, (h, side.shape[0])).movedim(-2, -3) if h is not None else part
    for i, j, side, x in jobs:
        if out[i][j] is None:
            out[i][j] = _side(side, x)
    return [(q, k) for q, k in out]  # type: ignore[misc]


def resolve_scale(scale: float | str, width: int, where: str = "bilinear_scores") -> float:
    """The logit scale: a number, or ``"sqrt"`` (1/sqrt(d)) or ``"mup"`` (1/d) for feature width ``d``.

    >>> resolve_scale("sqrt", 64), resolve_scale("mup", 64), resolve_scale(0.5, 64)
    (0.125, 0.015625, 0.5)
    """
    if not isinstance(where, str):
        raise TypeError(f"resolve_scale: where must be a str, got {type(where).__name__}")
    width = _int_arg(where, "the feature width", width, 1)
    if isinstance(scale, str):
        if scale == "sqrt":
            return 1.0 / math.sqrt(width)
        if scale == "mup":
            return 1.0 / width
        raise ValueError(f"{where}: scale must be a number, 'sqrt' (1/sqrt(d)) or 'mup' (1/d), got {scale!r}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{where}: scale must be a number, 'sqrt' or 'mup', got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"{where}: scale must be finite, got {scale!r}")
    return float(scale)


def _check(levels: list[Level], x_q: torch.Tensor, x_k: torch.Tensor, where: str) -> int | None:
    """Check the tokens against the levels; the number of heads (None without stacks)."""
    for name, x in (("x_q", x_q), ("x_k", x_k)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a tensor of shape (..., T, D), got {type(x).__name__}")
        if x.ndim < 2:
            raise ValueError(f"{where}: {name} must be a tensor of shape (..., T, D), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{where}: {name} must be a floating-point tensor, got {x.dtype}")
    if x_q.dtype != x_k.dtype and not _autocasting(x_q):
        raise TypeError(f"{where}: x_q and x_k must have one dtype, got {x_q.dtype} and {x_k.dtype}")
    try:
        torch.broadcast_shapes(x_q.shape[:-2], x_k.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"{where}: the batch dims of x_q {tuple(x_q.shape)} and x_k {tuple(x_k.shape)} do not broadcast"
        ) from None
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
        if lv.op.dtype is not None and lv.op.dtype != x_q.dtype and not _autocasting(x_q):
            raise TypeError(f"{where}: {lv.op.name} has {lv.op.dtype} parameters, the tokens are {x_q.dtype}")
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
    levels: list[Level],
    x_q: torch.Tensor,
    x_k: torch.Tensor,
    scale: float | str,
    qk_norm: bool,
    heads: int | None,
    where: str,
) -> list[tuple[Level, torch.Tensor, torch.Tensor, float]]:
    """Every level's (checked) features, each side with a head dim when the levels are stacks."""
    qk_norm = _bool_arg(where, "qk_norm", qk_norm)
    resolve_scale(scale, 1, where)  # check before any work
    feats = [(lv, q, k) for lv, (q, k) in zip(levels, _all_level_features(levels, x_q, x_k))]
    width = sum(q.shape[-1] for _, q, _ in feats)
    base = resolve_scale(scale, width, where)
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
    q_offset = _int_arg(where, "q_offset", q_offset, 0)
    masked = _unjoined_arg(where, unjoined, lvs)
    feats = _features(lvs, x_q, x_k, scale, qk_norm, heads, where)
    t_q, t_k = x_q.shape[-2], x_k.shape[-2]
    s = _scores(feats, t_q, t_k, q_offset)
    if masked and not _joins_all(lvs, t_q, t_k, q_offset):
        s = s.masked_fill(~_joined(lvs, t_q, 0, t_k, q_offset, s.device), float("-inf"))
    return s


def _joins_all(levels: Sequence[Level], t_q: int, t_k: int, q_offset: int) -> bool:
    """Whether some level joins every pair of these queries (positions ``q_offset ..``) and keys (``0 .. t_k - 1``):
    then nothing is unjoined and no mask is built (a block as long as the sequence is a global level here)."""
    end = max(q_offset + t_q, t_k)  # every position lies in 0 .. end - 1
    for lv in levels:
        if lv.is_global:
            return True
        if lv.block_size is not None and end <= lv.block_size:
            return True
        if lv.window is not None and max(q_offset + t_q - 1, t_k - 1 - q_offset) < lv.window:
            return True
    return False


def _joined(levels: Sequence[Level], t_q: int, k0: int, k1: int, q_offset: int, device: torch.device) -> torch.Tensor:
    """``(T_q, k1 - k0)``: whether some level joins query ``q_offset + i`` and key ``k0 + j`` (no global level)."""
    q_pos = torch.arange(t_q, device=device) + q_offset
    k_pos = torch.arange(k0, k1, device=device)
    joined = torch.zeros(t_q, k1 - k0, dtype=torch.bool, device=device)
    for lv in levels:
        joined |= lv.pair_mask(q_pos, k_pos)
    return joined


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
                n = math.prod(lead)  # explicit, not -1: T_q or T_k may be 0
                q3 = q.expand(*lead, t_q, q.shape[-1]).reshape(n, t_q, q.shape[-1])
                k3 = k.expand(*lead, t_k, k.shape[-1]).reshape(n, t_k, k.shape[-1])
                s.view(n, t_q, t_k).baddbmm_(q3, k3.mT, alpha=c)
            continue
        tiles = _tiles(lv, t_q, t_k, q_offset, q.device, q.dtype)
        if s is not None and torch.compiler.is_compiling():  # AOT autograd mis-traces the in-place add onto s
            s = s + _AddTiles.apply(q.new_zeros(*lead, t_q, t_k), q, k, tiles, c)
            continue
        if s is None:
            s = q.new_zeros(*lead, t_q, t_k)
        s = _AddTiles.apply(s, q, k, tiles, c)
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


def _expanded_width(levels: Sequence[Level], widths: Sequence[int], t_q: int, t_k: int, q_offset: int) -> int | None:
    """Width of :func:`_expanded`'s features, or None when a level (a window) has no such form."""
    width = 0
    for lv, r in zip(levels, widths):
        if lv.window is not None:
            return None
        blocks = 1 if lv.block_size is None else -(-max(q_offset + t_q, t_k) // lv.block_size)
        width += r * blocks
    return width


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
    t_q = _int_arg(where, "t_q", t_q, 0)
    t_k = t_q if t_k is None else _int_arg(where, "t_k", t_k, 0)
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


def _mask_scores(
    s: torch.Tensor,
    causal: bool,
    mask: torch.Tensor | None,
    q_offset: int,
    k_start: int = 0,
    joined: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores with ``-inf`` where the pair is not visible (causality, unjoined pairs, a boolean mask), plus an
    additive mask."""
    t_q, t_k = s.shape[-2:]
    if causal:
        qpos = torch.arange(t_q, device=s.device) + q_offset
        kpos = torch.arange(t_k, device=s.device) + k_start
        s = s.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
    if joined is not None:
        s = s.masked_fill(~joined, float("-inf"))
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
    return [LevelFeatures(*f) for f in _features(lvs, x_q, x_k, scale, qk_norm, heads, where)]


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
    offset = _int_arg(where, "q_offset", q_offset, 0)
    block = _int_arg(where, "key_block", key_block, 1, optional=True)
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


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    mask: torch.Tensor | None,
    q_offset: int,
    joined: torch.Tensor | None,
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
    return _sdpa_core(q, k, v, causal, mask, q_offset, t_q, t_k, joined)[..., :d_v]


def _sdpa_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    mask: torch.Tensor | None,
    q_offset: int,
    t_q: int,
    t_k: int,
    joined: torch.Tensor | None,
) -> torch.Tensor:
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if mask is None and joined is None and (not causal or (q_offset == 0 and t_q == t_k)):
        return sdpa(q, k, v, is_causal=causal, scale=1.0)
    allowed = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device)
    if causal:
        allowed = (
            torch.arange(t_k, device=q.device)[None, :] <= (torch.arange(t_q, device=q.device) + q_offset)[:, None]
        )
    if joined is not None:
        allowed = allowed & joined
    if mask is not None and mask.dtype != torch.bool:
        add = mask.masked_fill(~allowed, float("-inf"))
        return torch.nan_to_num(sdpa(q, k, v, attn_mask=add, scale=1.0), nan=0.0)
    if mask is not None:
        allowed = allowed & mask
    out = sdpa(q, k, v, attn_mask=allowed, scale=1.0)
    return torch.nan_to_num(out, nan=0.0) * allowed.any(-1, keepdim=True)


def _level_rows(lv: Level, t_q: int, k0: int, k1: int, q_offset: int) -> tuple[int, int]:
    """The query rows ``a .. b - 1`` that level ``lv`` may join with keys ``k0 .. k1 - 1`` (all for a global one)."""
    if lv.block_size is not None:
        lo, hi = k0 // lv.block_size * lv.block_size, -(-k1 // lv.block_size) * lv.block_size
    elif lv.window is not None:
        lo, hi = k0 - lv.window + 1, k1 + lv.window - 1
    else:
        return 0, t_q
    return min(max(lo - q_offset, 0), t_q), min(max(hi - q_offset, 0), t_q)


def _tile_rows(levels: Sequence[Level], t_q: int, k0: int, k1: int, causal: bool, q_offset: int, masked: bool):
    """The query rows ``r0 .. r1 - 1`` that may see some key in ``k0 .. k1 - 1``: the others are masked there (by
    causality, or because no level joins them when unjoined pairs are masked), so a tile skips them."""
    r0, r1 = 0, t_q
    if causal:
        r0 = max(r0, k0 - q_offset)
    if masked:
        rows = [_level_rows(lv, t_q, k0, k1, q_offset) for lv in levels]
        r0, r1 = max(r0, min(a for a, _ in rows)), min(r1, max(b for _, b in rows))
    return r0, r1


def _block_scores(
    feats: list,
    rows: tuple[int, int],
    k0: int,
    k1: int,
    causal: bool,
    mask: torch.Tensor | None,
    q_offset: int,
    masked: bool,
) -> tuple[torch.Tensor, list[tuple[int, int, torch.Tensor | None]]]:
    """Scores of queries ``r0 .. r1 - 1`` against keys ``k0 .. k1 - 1`` (masked), and for each level the rows it
    joins there (relative to ``r0``) with its pair mask on them: a blocked or windowed level multiplies only the
    rows it may join."""
    r0, r1 = rows
    t_q = feats[0][1].shape[-2]
    device = feats[0][1].device
    kpos = torch.arange(k0, k1, device=device)
    lead = torch.broadcast_shapes(*(x.shape[:-2] for f in feats for x in f[1:3]))
    s = None
    parts = []
    joined = torch.zeros(r1 - r0, k1 - k0, dtype=torch.bool, device=device) if masked else None
    for lv, q, k, c in sorted(feats, key=lambda f: not f[0].is_global):  # global levels first: s starts full
        a, b = _level_rows(lv, t_q, k0, k1, q_offset)
        a, b = max(a, r0) - r0, min(b, r1) - r0
        if a >= b:
            parts.append((a, a, None))
            continue
        part = torch.matmul(q[..., r0 + a : r0 + b, :], k[..., k0:k1, :].mT)
        near = lv.pair_mask(torch.arange(r0 + a, r0 + b, device=device) + q_offset, kpos)
        if near is not None and joined is not None:
            joined[a:b] |= near
        near = near.to(part.dtype) if near is not None else None
        parts.append((a, b, near))
        if near is not None:
            part = part * near
        if c != 1.0:
            part = part * c
        if s is None and (a, b) == (0, r1 - r0) and part.shape[:-2] == lead:
            s = part
            continue
        if s is None:
            s = part.new_zeros(*lead, r1 - r0, k1 - k0)
        s[..., a:b, :] += part
    order = sorted(range(len(feats)), key=lambda i: not feats[i][0].is_global)
    parts = [parts[order.index(i)] for i in range(len(feats))]  # back in the levels' order
    sub_mask = None
    if mask is not None:
        sub_mask = mask[..., k0:k1] if mask.shape[-1] != 1 else mask
        if sub_mask.ndim >= 2 and sub_mask.shape[-2] != 1:
            sub_mask = sub_mask[..., r0:r1, :]
    return _mask_scores(s, causal, sub_mask, q_offset + r0, k0, joined), parts


class _Streamed(torch.autograd.Function):
    """Online softmax over key blocks, forward and backward: neither holds more than one ``(T_q, key_block)`` tile
    of scores per head (the backward recomputes each tile from the features and the saved log-sum-exp, as flash
    attention does). A tile covers only the query rows that may see one of its keys (causally: not the rows above
    the diagonal; with unjoined pairs masked: the rows some level joins with its keys), and a blocked or windowed
    level multiplies only the rows it joins. An additive mask gets its gradient tile by tile too: it is the scores'
    gradient ``dS``."""

    @staticmethod
    def forward(ctx, setup, v, mask, *qk):  # type: ignore[override]
        levels, scales, t_q, t_k, causal, q_offset, kb, masked = setup
        feats = [(lv, qk[2 * i], qk[2 * i + 1], c) for i, (lv, c) in enumerate(zip(levels, scales))]
        lead = torch.broadcast_shapes(*(x.shape[:-2] for x in qk))
        out_lead = torch.broadcast_shapes(lead, v.shape[:-2])
        dtype = torch.matmul(qk[0].new_zeros(1, 1), v.new_zeros(1, 1)).dtype  # autocast's choice, if it is on
        running_max = qk[0].new_full((*lead, t_q, 1), float("-inf"), dtype=dtype)
        denom = qk[0].new_zeros(*lead, t_q, 1, dtype=dtype)
        acc = v.new_zeros(*out_lead, t_q, v.shape[-1], dtype=dtype)
        for k0 in range(0, t_k, kb):
            k1 = min(k0 + kb, t_k)
            r0, r1 = _tile_rows(levels, t_q, k0, k1, causal, q_offset, masked)
            if r0 >= r1:
                continue
            s, _ = _block_scores(feats, (r0, r1), k0, k1, causal, mask, q_offset, masked)
            rm = running_max[..., r0:r1, :]
            new_max = torch.maximum(rm, s.amax(dim=-1, keepdim=True))
            safe = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
            p = torch.exp(s - safe)
            old = torch.exp(torch.where(torch.isfinite(rm), rm, safe) - safe)
            denom[..., r0:r1, :] = denom[..., r0:r1, :] * old + p.sum(dim=-1, keepdim=True)
            acc[..., r0:r1, :] = acc[..., r0:r1, :] * old + torch.matmul(p, v[..., k0:k1, :])
            running_max[..., r0:r1, :] = new_max
        safe = torch.where(torch.isfinite(running_max), running_max, torch.zeros_like(running_max))
        lse = torch.where(denom > 0, safe + torch.log(denom), torch.full_like(denom, float("-inf")))
        out = torch.where(denom > 0, acc / denom.clamp_min(torch.finfo(acc.dtype).tiny), torch.zeros_like(acc))
        ctx.setup = setup
        ctx.save_for_backward(v, out, lse, mask, *qk)
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        levels, scales, t_q, t_k, causal, q_offset, kb, masked = ctx.setup
        v, out, lse, mask, *qk = ctx.saved_tensors
        feats = [(lv, qk[2 * i], qk[2 * i + 1], c) for i, (lv, c) in enumerate(zip(levels, scales))]
        lead = dout.shape[:-2]
        grads = [x.new_zeros(*lead, *x.shape[-2:]) for x in qk]
        dv = v.new_zeros(*lead, *v.shape[-2:])
        dmask = torch.zeros_like(mask) if ctx.needs_input_grad[2] else None
        delta = (dout * out).sum(-1, keepdim=True)
        live = torch.isfinite(lse)
        lse0 = torch.where(live, lse, torch.zeros_like(lse))
        for k0 in range(0, t_k, kb):
            k1 = min(k0 + kb, t_k)
            r0, r1 = _tile_rows(levels, t_q, k0, k1, causal, q_offset, masked)
            if r0 >= r1:
                continue
            s, parts = _block_scores(feats, (r0, r1), k0, k1, causal, mask, q_offset, masked)
            p = torch.where(live[..., r0:r1, :], torch.exp(s - lse0[..., r0:r1, :]), torch.zeros_like(s))
            do = dout[..., r0:r1, :]
            dv[..., k0:k1, :] += torch.matmul(p.mT, do)
            ds = p * (torch.matmul(do, v[..., k0:k1, :].mT) - delta[..., r0:r1, :])
            if dmask is not None:  # s = (levels' scores) + mask: the mask's gradient is ds
                target = dmask[..., k0:k1] if mask.shape[-1] != 1 else dmask
                if target.ndim >= 2 and target.shape[-2] != 1:
                    target = target[..., r0:r1, :]
                target += _reduce_to(ds, target.shape)
            for i, ((_, q, k, c), (a, b, near)) in enumerate(zip(feats, parts)):
                if a >= b:
                    continue
                g = ds[..., a:b, :]
                g = g * near if near is not None else g
                if c != 1.0:
                    g = g * c
                grads[2 * i][..., r0 + a : r0 + b, :] += torch.matmul(g, k[..., k0:k1, :])
                grads[2 * i + 1][..., k0:k1, :] += torch.matmul(g.mT, q[..., r0 + a : r0 + b, :])
        grads = [_reduce_to(g, x.shape) for g, x in zip(grads, qk)]
        return (None, _reduce_to(dv, v.shape), dmask, *grads)


def _streamed(
    feats: list,
    v: torch.Tensor,
    t_q: int,
    t_k: int,
    causal: bool,
    mask: torch.Tensor | None,
    q_offset: int,
    kb: int,
    masked: bool,
) -> torch.Tensor:
    """Online softmax over key blocks of ``kb`` keys (see :class:`_Streamed`)."""
    setup = ([f[0] for f in feats], [f[3] for f in feats], t_q, t_k, causal, q_offset, kb, masked)
    qk = [x for f in feats for x in (f[1], f[2])]
    return _Streamed.apply(setup, v, mask, *qk)
