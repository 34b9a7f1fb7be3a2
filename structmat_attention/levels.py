"""Levels: which pairs of tokens a level joins, through which operator, and the features it gives them.

"Level" in this package means one term of a multi-level bilinear score. Its relatives elsewhere:

- :class:`Level` — one term ``[i, j joined] · c_l · x_i^T W_l x_j`` of attention's scores: an operator ``W_l``
  already built, and which pairs it joins (all of them, the pairs in one block of ``block_size`` tokens, or the
  pairs closer than ``window``) — a level over the *sequence* positions.
- :class:`LevelSpec` — a recipe for a :class:`Level`: how to build ``W_l`` (a factory), so that every
  :class:`~structmat_attention.StructuredAttention` layer built from it gets its own parameters.
- Not to be confused with the levels of a ``structmat.MultiLevelLowRank`` operator (levels over the *feature*
  dimensions, inside one ``W_l``) or with ``structmat``'s recipe for one level of a ``MultiLevel`` operator.

A level's features are its query side ``L_l x_q`` and key side ``R_l x_k`` of the split ``W_l = L_l^T R_l``
(:func:`structmat.bilinear_split`): :func:`level_features` for one, :func:`attention_features` for all of them
with the logit scale folded in (:class:`LevelFeatures`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

import structmat as sm
from structmat.checks import check_int

from ._args import _autocasting, _bool_arg

__all__ = [
    "Level",
    "LevelSpec",
    "LevelFeatures",
    "level_features",
    "attention_features",
    "resolve_scale",
]

OperatorFactory = Callable[..., sm.LinearOperator]


@dataclass(frozen=True)
class Level:
    """One term of attention's multi-level score: an operator ``W_l`` and the (query, key) pairs it joins.

    ``s(i, j) = Σ_l [level l joins i and j] · c_l · x_i^T W_l x_j``. The pairs are those of the token *positions*
    (all of them, one block of ``block_size`` tokens, or a window); the operator is already built (for a recipe
    that builds a fresh one per layer, see :class:`LevelSpec`). This is not a level of a ``MultiLevelLowRank``
    operator, which splits the *feature* dimensions inside one ``W_l``.

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
        b = check_int(where, "block_size", self.block_size, 1, optional=True)
        w = check_int(where, "window", self.window, 1, optional=True)
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


@dataclass(frozen=True)
class LevelSpec:
    """A recipe for a :class:`Level`: which pairs it joins and how to build its operator, once per layer.

    :meth:`build` returns the :class:`Level`; :class:`~structmat_attention.StructuredAttention` calls it with its own
    width, heads, dtype and device, so every layer built from one spec gets fresh parameters.

    Attributes:
        make: ``make(d_model, n_heads, dtype=..., device=...)`` returns a stack of ``n_heads`` operators of shape
            ``(d_model, d_model)``.
        block_size: tokens per block (None: global, or windowed).
        scale: the level's constant ``c_l``.
        window: a sliding window instead of blocks: pairs with ``|i - j| < window``.

    Example:
        >>> import structmat as sm
        >>> from structmat_attention import LevelSpec, StructuredAttention
        >>> spec = LevelSpec(lambda d, h, **kw: sm.LowRank(d, d, rank=2, heads=h, **kw), block_size=4)
        >>> layer = StructuredAttention(8, 2, levels=[spec])
        >>> layer.levels[0].block_size, layer.levels[0].op.name
        (4, 'LowRank(8, 8, rank=2, heads=2)')
    """

    make: OperatorFactory
    block_size: int | None = None
    scale: float = 1.0
    window: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.make, sm.LinearOperator):
            raise TypeError(
                f"LevelSpec: make must be a factory (d_model, n_heads, dtype=, device=) -> operator, got the operator "
                f"{self.make.name}; use Level(block_size, op) for an operator already built"
            )
        if not callable(self.make):
            raise TypeError(
                f"LevelSpec: make must be a callable (d_model, n_heads, dtype=, device=), got {self.make!r}"
            )
        object.__setattr__(self, "block_size", check_int("LevelSpec", "block_size", self.block_size, optional=True))
        object.__setattr__(self, "window", check_int("LevelSpec", "window", self.window, optional=True))
        if isinstance(self.scale, bool) or not isinstance(self.scale, numbers.Real):
            raise TypeError(f"LevelSpec: scale must be a real number, got {type(self.scale).__name__} {self.scale!r}")
        if self.block_size is not None and self.window is not None:
            raise ValueError(f"LevelSpec: give block_size={self.block_size} or window={self.window}, not both")

    def build(
        self, d_model: int, n_heads: int, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> Level:
        """The :class:`Level` with a freshly built operator."""
        return Level(self.block_size, self.make(d_model, n_heads, dtype=dtype, device=device), self.scale, self.window)


class LevelFeatures(NamedTuple):
    """One level's query and key features, ``(..., [H,] T, r)`` each, and its constant (logit scale included)."""

    level: Level
    q: torch.Tensor
    k: torch.Tensor
    scale: float


def _dense_is_cheapest(side: sm.LinearOperator) -> bool:
    """Whether applying ``side`` costs as much as a dense matrix of its shape (a plain factor such as a low-rank
    side): then several levels' sides run as ONE matmul with their dense matrices stacked
    (:func:`_all_level_features`)."""
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
    width = check_int(where, "the feature width", width, 1)
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


def _unjoined_arg(where: str, unjoined: object, levels: Sequence[Level]) -> bool:
    """Whether pairs that no level joins are masked out (False also when some level joins every pair)."""
    if unjoined is not None and unjoined not in ("zero", "mask"):
        raise ValueError(f"{where}: unjoined must be None, 'zero' or 'mask', got {unjoined!r}")
    if any(lv.is_global for lv in levels):
        return False
    return unjoined != "zero"


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
