"""Attention layers: a thin ``nn.Module`` over :func:`structured_attention`, and a KV cache.

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

The paper's set (Kuang et al., ICML 2025) are constructors in :mod:`structmat_attention.variants` (still importable
from here). :class:`LevelSpec` lives in :mod:`structmat_attention.levels` (re-exported here).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any, final

import torch

import structmat as sm
from structmat.checks import check_int

from ._args import _bool_arg, _head_dim
from .cost import AttentionCost, CostPart, pairs_joined
from .functional import attend, attention_path, structured_attention
from .levels import Level, LevelFeatures, LevelSpec, attention_features, resolve_scale

__all__ = ["LevelSpec", "KVCache", "StructuredAttention"]


def _moved() -> list[str]:
    """The paper's constructors, which moved to :mod:`structmat_attention.variants` (imported lazily: variants
    imports this module): still importable from here."""
    from . import variants

    return variants.__all__


def __getattr__(name: str) -> Any:
    """``structmat_attention.layers.standard_attention`` etc."""
    if not name.startswith("__") and name in _moved():
        from . import variants

        return getattr(variants, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_moved()])


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
        self.causal = _bool_arg(where, "causal", causal)
        resolve_scale(scale, 1, where)  # validate now
        self.scale = scale
        self.qk_norm = _bool_arg(where, "qk_norm", qk_norm)
        self.key_block = check_int(where, "key_block", key_block, optional=True)
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
