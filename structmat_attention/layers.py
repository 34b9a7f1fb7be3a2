"""Attention layers: thin ``nn.Module`` s over :func:`structured_attention`, the paper's variants, and a KV cache.

A :class:`StructuredAttention` layer with ``H`` heads and levels ``l = 0 .. L-1`` maps tokens ``x`` of shape
``(..., T, D)`` to

``out = Σ_h softmax_j(s_h(i, j)) v_h(j)`` projected by ``W_O``, with
``s_h(i, j) = c · Σ_l [i and j joined by level l] · c_l · x_i^T W_l[h] x_j``,
``v_h(j) = W_V[h] x_j`` and the output projection ``W_O`` of shape ``(D, H · d_v)`` applied to the concatenated heads.

A level joins every pair (global), the pairs in the same block of ``T_l`` tokens, or the pairs with ``|i - j| < w``
(a window). When no level is global, a pair that no level joins is masked out (its query gives that key no
attention), unless the layer is built with ``unjoined="zero"`` (score 0, still weighted by the softmax).
Each ``W_l`` is applied through its cheapest split ``W_l = L_l^T R_l`` (:func:`structmat.bilinear_split`);
the query features ``L_l x_i`` and key features ``R_l x_j`` are what a :class:`KVCache` keeps.

The paper's set (Kuang et al., ICML 2025) are constructors: :func:`standard_attention`,
:func:`bilinear_btt_attention`, :func:`bilinear_mlr_attention`, :func:`mlr_attention`,
:func:`sliding_window_attention` and :func:`gswa_attention`.
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, final

import torch

import structmat as sm
from structmat._factors import check_int, check_optional_int

from .cost import AttentionCost, CostPart, pairs_joined
from .functional import (
    Level,
    LevelFeatures,
    attend,
    attention_features,
    attention_path,
    resolve_scale,
    structured_attention,
)

__all__ = [
    "LevelSpec",
    "KVCache",
    "StructuredAttention",
    "standard_attention",
    "bilinear_btt_attention",
    "bilinear_mlr_attention",
    "mlr_attention",
    "sliding_window_attention",
    "gswa_attention",
]

OperatorFactory = Callable[..., sm.LinearOperator]


@dataclass(frozen=True)
class LevelSpec:
    """A level described by how to build its operator, so that every layer built from it gets fresh parameters.

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
        object.__setattr__(self, "block_size", check_optional_int("LevelSpec", "block_size", self.block_size))
        object.__setattr__(self, "window", check_optional_int("LevelSpec", "window", self.window))
        if isinstance(self.scale, bool) or not isinstance(self.scale, numbers.Real):
            raise TypeError(f"LevelSpec: scale must be a real number, got {type(self.scale).__name__} {self.scale!r}")
        if self.block_size is not None and self.window is not None:
            raise ValueError(f"LevelSpec: give block_size={self.block_size} or window={self.window}, not both")

    def build(
        self, d_model: int, n_heads: int, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> Level:
        """The :class:`Level` with a freshly built operator."""
        return Level(self.block_size, self.make(d_model, n_heads, dtype=dtype, device=device), self.scale, self.window)


def _check_bool(where: str, what: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{where}: {what} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _int_list(where: str, what: str, values: object, allow_none: bool = False) -> list[Any]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise TypeError(f"{where}: {what} must be a non-empty list, one entry per level, got {values!r}")
    out = []
    for k, v in enumerate(values):
        if v is None and allow_none:
            out.append(None)
            continue
        kind = "None or an int >= 1" if allow_none else "an int >= 1"
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{where}: {what}[{k}] must be {kind}, got {type(v).__name__} {v!r}")
        if v < 1:
            raise ValueError(f"{where}: {what}[{k}] must be {kind}, got {v!r}")
        out.append(int(v))
    return out


def _head_dim(where: str, d_model: int, n_heads: int) -> int:
    d_model = check_int(where, "d_model", d_model)
    n_heads = check_int(where, "n_heads", n_heads)
    if d_model % n_heads:
        raise ValueError(f"{where}: n_heads={n_heads} must divide d_model={d_model}")
    return d_model // n_heads


@final
class KVCache:
    """What one layer keeps of the tokens it has seen, for incremental decoding.

    Per level ``l`` the key features ``R_l x_j`` (after QK-norm when the layer uses it), of shape
    ``(..., H, T, r_l)`` (``(..., 1, T, r_l)`` for a side shared by the heads), and the values ``(..., H, T, d_v)``.
    Positions count from 0, so the next tokens' queries sit at ``q_offset = len(cache)``. A cache binds to the first
    layer and batch shape it is used with; :meth:`reset` frees it for reuse.

    Tokens that no later query can see are dropped: when the layer masks unjoined pairs (no global level), a token
    older than every level's reach (a window's ``w - 1`` tokens, a block's start) is gone, so a sliding-window cache
    holds at most ``window - 1`` tokens between calls (``window - 1 + T`` while attending ``T`` new ones) instead of
    all of them. ``len(cache)`` still counts every token seen; :attr:`start` is the position of the first one held
    and :attr:`stored` how many are held.

    Example:
        >>> import torch
        >>> from structmat_attention import KVCache, sliding_window_attention, standard_attention
        >>> layer = standard_attention(8, 2)
        >>> cache = KVCache()
        >>> x = torch.randn(1, 5, 8)
        >>> _ = layer(x[:, :3], cache=cache)
        >>> y = layer(x[:, 3:], cache=cache)  # two new tokens see all five
        >>> len(cache), torch.allclose(y, layer(x)[:, 3:], atol=1e-5)
        (5, True)
        >>> window = sliding_window_attention(8, 2, window=3)
        >>> cache = KVCache()
        >>> for t in range(5):
        ...     _ = window(x[:, t : t + 1], cache=cache)
        >>> len(cache), cache.start, cache.stored  # the last token sees itself and the 2 before it; 3 and 4 are kept
        (5, 3, 2)
    """

    def __init__(self) -> None:
        self.keys: tuple[torch.Tensor, ...] = ()
        self.values: torch.Tensor | None = None
        self._start = 0
        self._owner: weakref.ref[torch.nn.Module] | None = None
        self._batch: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return self._start + self.stored

    def __repr__(self) -> str:
        return f"KVCache(tokens={len(self)}, stored={self.stored}, batch_shape={self._batch}, levels={len(self.keys)})"

    @property
    def start(self) -> int:
        """Position of the first token held (the tokens before it were dropped: no later query sees them)."""
        return self._start

    @property
    def stored(self) -> int:
        """Tokens held: ``len(cache) - start``."""
        return 0 if self.values is None else int(self.values.shape[-2])

    @property
    def batch_shape(self) -> tuple[int, ...] | None:
        """The leading dims of the tokens it was filled with (None while empty)."""
        return self._batch

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached keys and values."""
        held = [*self.keys, *(() if self.values is None else (self.values,))]
        return sum(t.numel() * t.element_size() for t in held)

    def reset(self) -> None:
        """Forget every token and the layer it was bound to."""
        self.__init__()  # type: ignore[misc]

    def _check(self, owner: torch.nn.Module, batch: tuple[int, ...], values: torch.Tensor, where: str) -> None:
        if self._owner is not None and self._owner() is not owner:
            raise ValueError(f"{where}: this KVCache holds another layer's keys; use one cache per layer")
        if self._batch is not None and batch != self._batch:
            raise ValueError(
                f"{where}: the cache holds a batch of shape {self._batch}, got tokens with batch shape {batch}"
            )
        if self.values is not None and values.dtype != self.values.dtype:
            raise TypeError(f"{where}: the cache holds {self.values.dtype}, got tokens of {values.dtype}")
        if self.values is not None and values.device != self.values.device:
            raise ValueError(f"{where}: the cache is on {self.values.device}, got tokens on {values.device}")

    def _extend(
        self, owner: torch.nn.Module, batch: tuple[int, ...], keys: list[torch.Tensor], values: torch.Tensor, where: str
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Append the new tokens' key features and values; return everything held (the new tokens last)."""
        self._check(owner, batch, values, where)
        if self.values is None:
            self.keys, self.values = tuple(keys), values
            self._owner, self._batch = weakref.ref(owner), batch
        else:
            self.keys = tuple(torch.cat([old, new], dim=-2) for old, new in zip(self.keys, keys))
            self.values = torch.cat([self.values, values], dim=-2)
        return list(self.keys), self.values

    def _drop_before(self, position: int) -> None:
        """Forget the tokens before ``position`` (copied out, so that their memory is freed)."""
        drop = min(position - self._start, self.stored)
        if drop <= 0:
            return
        self.keys = tuple(k[..., drop:, :].clone() for k in self.keys)
        self.values = self.values[..., drop:, :].clone()  # type: ignore[index]
        self._start += drop


@final
class StructuredAttention(torch.nn.Module):
    """Multi-head attention whose scores are sums of bilinear forms over levels.

    ``s_h(i, j) = c · Σ_l [i, j joined by level l] · c_l · x_i^T W_l[h] x_j``, ``out_i = W_O concat_h(Σ_j
    softmax_j(s_h(i, ·)) W_V[h] x_j)``. ``c`` is ``scale`` ('sqrt': ``1/sqrt(d)``, 'mup': ``1/d``, with ``d`` the
    summed feature width ``Σ_l r_l`` of the levels' splits, or a number). Every ``W_l`` goes through its split
    ``L_l^T R_l``: queries ``L_l x_i``, keys ``R_l x_j``, ``r_l`` MACs per joined pair and head.

    Args:
        d_model: token width ``D``.
        n_heads: heads ``H``.
        levels: a list of :class:`Level` s (each ``op`` a stack of ``n_heads`` operators of shape
            ``(d_model, d_model)``) or :class:`LevelSpec` s (built here, with this layer's dtype and device).
        d_value: value width per head (default ``d_model // n_heads``).
        causal: query ``i`` sees keys ``j <= i`` only.
        scale: the logit scale ``c``: 'sqrt', 'mup' or a number.
        qk_norm: layer-normalize every level's query and key features.
        key_block: stream over key blocks of this size with an online softmax (peak memory ``O(T · key_block)``).
        unjoined: what a pair that no level joins gets (only when no level is global: a global level joins every
            pair). None (default) or ``"mask"``: the pair is masked out, its query gives the key no attention at all
            (sliding-window and block-local attention); ``"zero"``: the pair's score is 0, the plain sum of bilinear
            forms, so the key still gets the softmax weight ``exp(0) / Z`` (and a KV cache must then keep every
            token). :attr:`masks_unjoined` says which one the layer does.
        value: the value stack, ``(d_value, d_model)`` with ``heads=n_heads`` (default ``Dense``).
        output: the output operator, ``(d_model, n_heads * d_value)`` (default ``Dense``).
        dtype: dtype of the parameters built here.
        device: device of the parameters built here.

    Example:
        >>> import torch, structmat as sm
        >>> from structmat_attention import Level, StructuredAttention
        >>> levels = [Level(None, sm.LowRank(12, 12, rank=2, heads=3)), Level(4, sm.LowRank(12, 12, rank=2, heads=3))]
        >>> layer = StructuredAttention(12, 3, levels=levels)
        >>> layer(torch.randn(2, 10, 12)).shape
        torch.Size([2, 10, 12])
        >>> layer.cost(10).total("scores").macs  # 3 heads * (10 * 10 + (4*4 + 4*4 + 2*2)) pairs * rank 2
        816
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        levels: Sequence[Level | LevelSpec],
        *,
        d_value: int | None = None,
        causal: bool = True,
        scale: float | str = "sqrt",
        qk_norm: bool = False,
        key_block: int | None = None,
        unjoined: str | None = None,
        value: sm.LinearOperator | None = None,
        output: sm.LinearOperator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        where = f"StructuredAttention(d_model={d_model}, n_heads={n_heads})"
        self.d_model = check_int(where, "d_model", d_model)
        self.n_heads = check_int(where, "n_heads", n_heads)
        if d_value is None:
            d_value = _head_dim(where, d_model, n_heads)
        self.d_value = check_int(where, "d_value", d_value)
        if isinstance(levels, (Level, LevelSpec)) or not isinstance(levels, Sequence) or len(levels) == 0:
            raise TypeError(f"{where}: levels must be a non-empty list of Level or LevelSpec, got {levels!r}")
        built = []
        for k, lv in enumerate(levels):
            if isinstance(lv, LevelSpec):
                lv = lv.build(d_model, n_heads, dtype=dtype, device=device)
            if not isinstance(lv, Level):
                raise TypeError(f"{where}: levels[{k}] must be a Level or a LevelSpec, got {type(lv).__name__}")
            if lv.op.heads != n_heads or lv.op.shape != (d_model, d_model):
                raise ValueError(
                    f"{where}: levels[{k}].op must be a stack of n_heads={n_heads} operators of shape "
                    f"({d_model}, {d_model}), got {lv.op.name}"
                )
            built.append(lv)
        self.levels: list[Level] = built
        self.level_ops = torch.nn.ModuleList(lv.op for lv in built)  # registers the parameters
        self.causal = _check_bool(where, "causal", causal)
        resolve_scale(scale, 1, where)  # validate now
        self.scale = scale
        self.qk_norm = _check_bool(where, "qk_norm", qk_norm)
        self.key_block = check_optional_int(where, "key_block", key_block)
        if unjoined is not None and unjoined not in ("zero", "mask"):
            raise ValueError(f"{where}: unjoined must be None, 'zero' or 'mask', got {unjoined!r}")
        self.unjoined = unjoined
        self._where = where
        if value is None:
            value = sm.Dense(self.d_value, d_model, heads=n_heads, dtype=dtype, device=device)
        if output is None:
            output = sm.Dense(d_model, n_heads * self.d_value, dtype=dtype, device=device)
        for what, op in (("value", value), ("output", output)):
            if not isinstance(op, sm.LinearOperator):
                raise TypeError(f"{where}: {what} must be a structmat LinearOperator or None, got {type(op).__name__}")
        if not isinstance(value, sm.LinearOperator) or value.heads != n_heads or value.shape != (self.d_value, d_model):
            got = value.name if isinstance(value, sm.LinearOperator) else type(value).__name__
            raise ValueError(
                f"{where}: value must be a stack of n_heads={n_heads} operators of shape ({self.d_value}, {d_model}), "
                f"got {got}"
            )
        if (
            not isinstance(output, sm.LinearOperator)
            or output.heads is not None
            or (output.shape != (d_model, n_heads * self.d_value))
        ):
            got = output.name if isinstance(output, sm.LinearOperator) else type(output).__name__
            raise ValueError(
                f"{where}: output must be one operator of shape ({d_model}, {n_heads * self.d_value}), got {got}"
            )
        self.value = value
        self.output = output
        self._prepare()

    def _prepare(self) -> None:
        """Compute every level's split now, eagerly, so that ``torch.compile`` only reads it (never traces min cut)."""
        for lv in self.levels:
            sm.bilinear_split(lv.op)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._prepare()  # a deep copy or an unpickled layer has fresh operators without their splits

    @property
    def masks_unjoined(self) -> bool:
        """Whether pairs that no level joins are masked out: no level is global and ``unjoined`` is not 'zero'."""
        return self.unjoined != "zero" and not any(lv.block_size is None and lv.window is None for lv in self.levels)

    def _keep_from(self, position: int) -> int:
        """The first position a query at ``position`` or later may see (0: every token is kept).

        Rounded down to a multiple of every block size, so that positions counted from it fall into the same
        blocks as absolute ones (windows only compare differences).
        """
        if not self.masks_unjoined or not self.causal:
            return 0
        first, step = position, 1
        for lv in self.levels:
            if lv.block_size is not None:
                first = min(first, position // lv.block_size * lv.block_size)
                step = math.lcm(step, lv.block_size)
            elif lv.window is not None:
                first = min(first, position - lv.window + 1)
        return max(first, 0) // step * step

    def extra_repr(self) -> str:
        lv = ", ".join(
            f"{lv.op.name}"
            + (f" block={lv.block_size}" if lv.block_size else "")
            + (f" window={lv.window}" if lv.window else "")
            + (f" c={lv.scale}" if lv.scale != 1.0 else "")
            for lv in self.levels
        )
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, d_value={self.d_value}, levels=[{lv}], "
            f"causal={self.causal}, scale={self.scale!r}, masks_unjoined={self.masks_unjoined}"
        )

    def new_cache(self) -> KVCache:
        """An empty :class:`KVCache` for this layer."""
        return KVCache()

    def _check_mask(self, mask: object, t_q: int, t_k: int, where: str) -> torch.Tensor | None:
        """The user's mask, checked: a bool or floating tensor whose last two dims broadcast to ``(T_q, T_k)``."""
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{where}: mask must be a tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(
                f"{where}: mask must be boolean (True = may attend) or an additive float mask, got {mask.dtype}"
            )
        if mask.ndim < 1 or mask.shape[-1] not in (1, t_k) or (mask.ndim > 1 and mask.shape[-2] not in (1, t_q)):
            raise ValueError(
                f"{where}: mask must be broadcastable to (..., {self.n_heads}, T={t_q}, T_k={t_k}) (T_k counts cached "
                f"tokens too), got {tuple(mask.shape)}"
            )
        return mask

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Attend.

        Args:
            x: tokens ``(..., T, d_model)`` (with a cache: the new tokens only).
            mask: boolean (True = may attend) or additive float mask, broadcastable to ``(..., H, T, T_k)`` where
                ``T_k`` counts the cached tokens too.
            cache: a :class:`KVCache`; the new tokens sit at positions ``len(cache) .. len(cache) + T - 1``, attend
                to every cached token and to each other (causally when the layer is causal), and join the cache.

        Returns:
            ``(..., T, d_model)``.
        """
        where = type(self).__name__
        if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[-1] != self.d_model:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{where}: x must have shape (..., T, d_model={self.d_model}), got {got}")
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"{where}: cache must be a KVCache or None, got {type(cache).__name__}")
        if cache is not None and not self.causal:
            raise ValueError(
                f"{self._where}: a KVCache needs a causal layer, this one has causal=False (its first tokens would "
                f"attend to later ones in the full forward, which the cache cannot give them)"
            )
        t_q = x.shape[-2]
        past = 0 if cache is None else len(cache)
        mask = self._check_mask(mask, t_q, past + t_q, where)
        v = self.value(x).movedim(-2, -3)  # (..., H, T, d_v)
        if cache is None:
            out = structured_attention(
                x,
                x,
                v,
                self.levels,
                self.causal,
                mask,
                scale=self.scale,
                qk_norm=self.qk_norm,
                key_block=self.key_block,
                unjoined=self.unjoined,
            )
        else:
            out = self._attend_cached(x, v, mask, cache, where)
        out = out.movedim(-3, -2).reshape(*x.shape[:-1], self.n_heads * self.d_value)
        return self.output(out)

    def _attend_cached(
        self, x: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, cache: KVCache, where: str
    ) -> torch.Tensor:
        """The new tokens ``x`` attend to the cache's tokens and to each other; they join the cache, and the tokens
        no later query can see leave it."""
        past = len(cache)
        feats = attention_features(x, x, self.levels, self.scale, qk_norm=self.qk_norm)  # new tokens only
        keys, v = cache._extend(self, tuple(x.shape[:-2]), [k for _, _, k, _ in feats], v, where)
        start = cache.start  # keys held: positions start .. past + t_q - 1, counted from start below
        if mask is not None and mask.shape[-1] != 1:
            mask = mask[..., start:]
        feats = [LevelFeatures(lv, q, k, c) for (lv, q, _, c), k in zip(feats, keys)]
        out = attend(
            feats, v, self.causal, mask, q_offset=past - start, key_block=self.key_block, unjoined=self.unjoined
        )
        cache._drop_before(self._keep_from(len(cache)))
        return out

    def cost(self, seq_len: int, batch: int = 1, *, past: int = 0) -> AttentionCost:
        """Forward cost from shapes alone (no data touched), as :class:`AttentionCost` in FLOPs and MACs.

        Args:
            seq_len: new tokens per sequence ``T_q`` (the whole sequence without a cache).
            batch: sequences.
            past: tokens already cached (keys ``T_k = past + seq_len``): ``cost(1, past=t)`` is one decoding step.
                The softmax and ``P @ V`` run over the keys the cache still holds: a sliding window's last
                ``window - 1`` tokens and the new ones, not all ``T_k``.

        See :mod:`structmat_attention.cost` for each part's convention.
        """
        where = f"{type(self).__name__}.cost"
        t_q = check_int(where, "seq_len", seq_len)
        batch = check_int(where, "batch", batch)
        past = check_int(where, "past", past, 0)
        t_k, h, n = past + t_q, self.n_heads, batch * t_q
        held = t_k - self._keep_from(past)  # the keys a KVCache still holds (all of them without a cache)
        parts: list[CostPart] = []
        scores: list[CostPart] = []
        norm = 0
        for k, lv in enumerate(self.levels):
            left, right = sm.bilinear_split(lv.op)
            for side, op in (("query", left), ("key", right)):
                c = op.cost(n)
                parts.append(CostPart(f"{side}_features[{k}]", c.flops, c.macs))
                norm += n * (op.heads or 1) * op.shape[0]
            macs = batch * h * pairs_joined(lv.block_size, lv.window, t_q, t_k, past) * left.shape[0]
            scores.append(CostPart(f"scores[{k}]", 2 * macs, macs))
        if self.qk_norm:
            parts.append(CostPart("qk_norm", 5 * norm, 0))
        c = self.value.cost(n)
        parts.append(CostPart("value_projection", c.flops, c.macs))
        parts += scores
        entries = batch * h * t_q * held
        parts.append(CostPart("softmax", 5 * entries, 0))
        parts.append(CostPart("attention_values", 2 * entries * self.d_value, entries * self.d_value))
        c = self.output.cost(n)
        parts.append(CostPart("output_projection", c.flops, c.macs))
        return AttentionCost(t_q, batch, past, h, tuple(parts), self.attention_path(t_q, past=past))

    def attention_path(self, seq_len: int, *, past: int = 0, mask: bool = False) -> str:
        """The attention path the forward runs on ``seq_len`` new tokens after ``past`` cached ones (no work done).

        ``"pieces"``: fused attention calls on sibling blocks merged by their log-sum-exp (self-attention from
        position 0 with nested block sizes and no window, on CPU in float32/float64); else ``"sdpa"``, ``"scores"``
        or ``"streamed"`` (see :func:`structmat_attention.functional.attention_path`), compiled or not.

        Args:
            seq_len: new tokens.
            past: tokens in the KV cache before them.
            mask: whether a mask is passed.

        Example:
            >>> from structmat_attention import mlr_attention
            >>> layer = mlr_attention(32, 4, ranks=[4, 2, 2], max_seq_len=1024)
            >>> layer.attention_path(1024), layer.attention_path(1, past=1023)
            ('pieces', 'sdpa')
        """
        where = f"{type(self).__name__}.attention_path"
        t_q = check_int(where, "seq_len", seq_len)
        past = check_int(where, "past", past, 0)
        start = self._keep_from(past) if past else 0  # the cache holds positions start .. past + t_q - 1
        param = next(iter(self.parameters()), None)
        return attention_path(
            self.levels,
            t_q,
            past - start + t_q,
            q_offset=past - start,
            key_block=self.key_block,
            mask=mask,
            dtype=param.dtype if param is not None else None,
            device=param.device if param is not None else None,
        )


# -- the paper's set ---------------------------------------------------------------------------------------------------


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
