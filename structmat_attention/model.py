"""A small pre-LN GPT-style language model around any attention layer, with KV-cache decoding.

``h_0 = E[tokens] + P[positions]``; each block ``h <- h + attn(LN(h))``, ``h <- h + MLP(LN(h))``; logits
``= W_head LN(h_L)``. The attention is any callable ``(d_model, n_heads) -> module`` whose module takes
``forward(x, mask=None, cache=None)``, such as the constructors of :mod:`structmat_attention.variants` (bind their
other arguments with :func:`functools.partial`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import final

import torch

from structmat.checks import check_int

from .layers import KVCache

__all__ = ["TransformerBlock", "GPT"]

AttentionFactory = Callable[[int, int], torch.nn.Module]


@final
class TransformerBlock(torch.nn.Module):
    """Pre-LN block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` with ``MLP = Linear, GELU, Linear``.

    Args:
        d_model: token width.
        attention: the attention module (``forward(x, mask=None, cache=None)``).
        mlp_ratio: hidden width of the MLP over ``d_model``.

    Example:
        >>> import torch
        >>> from structmat_attention import TransformerBlock, standard_attention
        >>> block = TransformerBlock(8, standard_attention(8, 2))
        >>> block(torch.randn(2, 5, 8)).shape
        torch.Size([2, 5, 8])
    """

    def __init__(self, d_model: int, attention: torch.nn.Module, mlp_ratio: int = 4) -> None:
        super().__init__()
        d_model = check_int("TransformerBlock", "d_model", d_model)
        hidden = check_int("TransformerBlock", "mlp_ratio", mlp_ratio) * d_model
        if not isinstance(attention, torch.nn.Module):
            raise TypeError(f"TransformerBlock: attention must be an nn.Module, got {type(attention).__name__}")
        width = getattr(attention, "d_model", d_model)
        if width != d_model:
            raise ValueError(f"TransformerBlock: d_model={d_model} but the attention layer has d_model={width}")
        self.ln_attn = torch.nn.LayerNorm(d_model)
        self.attn = attention
        self.ln_mlp = torch.nn.LayerNorm(d_model)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(d_model, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, d_model)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """``(..., T, d_model) -> (..., T, d_model)``; ``cache`` goes to the attention."""
        x = x + self.attn(self.ln_attn(x), mask=mask, cache=cache)
        return x + self.mlp(self.ln_mlp(x))


@final
class GPT(torch.nn.Module):
    """A decoder-only language model: token and learned positional embeddings, pre-LN blocks, final LN, LM head.

    Args:
        vocab_size: tokens.
        d_model: width.
        n_heads: attention heads.
        n_layers: blocks.
        max_seq_len: length of the positional table (the longest sequence, cached tokens included).
        attention: ``attention(d_model, n_heads)`` builds each block's attention layer.
        mlp_ratio: MLP hidden width over ``d_model``.
        dtype: parameter dtype.
        device: parameter device.

    Example:
        >>> import functools, torch
        >>> from structmat_attention import GPT, mlr_attention
        >>> _ = torch.manual_seed(0)
        >>> model = GPT(11, 16, 2, 2, max_seq_len=12, attention=functools.partial(mlr_attention, ranks=[4, 4],
        ...             max_seq_len=12))
        >>> tokens = torch.randint(0, 11, (2, 5))
        >>> model(tokens).shape
        torch.Size([2, 5, 11])
        >>> model.generate(tokens, 4, greedy=True).shape
        torch.Size([2, 9])
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_heads: int,
        n_layers: int,
        max_seq_len: int,
        attention: AttentionFactory,
        *,
        mlp_ratio: int = 4,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        where = "GPT"
        self.vocab_size = check_int(where, "vocab_size", vocab_size)
        self.d_model = check_int(where, "d_model", d_model)
        self.n_heads = check_int(where, "n_heads", n_heads)
        self.n_layers = check_int(where, "n_layers", n_layers)
        self.max_seq_len = check_int(where, "max_seq_len", max_seq_len)
        if isinstance(attention, torch.nn.Module):
            raise TypeError(
                f"{where}: attention must be a factory (d_model, n_heads) -> module such as standard_attention, got "
                f"the module {type(attention).__name__}; every block builds its own layer (bind other arguments with "
                f"functools.partial)"
            )
        if not callable(attention):
            raise TypeError(f"{where}: attention must be a callable (d_model, n_heads) -> module, got {attention!r}")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"{where}: dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.tok_emb = torch.nn.Embedding(vocab_size, d_model)
        self.pos_emb = torch.nn.Embedding(max_seq_len, d_model)
        torch.nn.init.normal_(self.tok_emb.weight, std=0.02)
        torch.nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.blocks = torch.nn.ModuleList(
            TransformerBlock(d_model, _build_attention(attention, d_model, n_heads), mlp_ratio) for _ in range(n_layers)
        )
        self.ln_f = torch.nn.LayerNorm(d_model)
        self.head = torch.nn.Linear(d_model, vocab_size, bias=False)
        if dtype is not None or device is not None:
            self.to(device=device, dtype=dtype)

    def new_cache(self) -> list[KVCache]:
        """One empty :class:`KVCache` per block."""
        return [KVCache() for _ in self.blocks]

    def forward(self, tokens: torch.Tensor, cache: Sequence[KVCache] | None = None) -> torch.Tensor:
        """Logits for every position.

        Args:
            tokens: ``(..., T)`` integer ids (with a cache: the new tokens only).
            cache: from :meth:`new_cache`; the tokens continue the cached ones and join the cache.

        Returns:
            ``(..., T, vocab_size)``.
        """
        where = "GPT"
        tokens = self._check_tokens(tokens, where)
        if cache is not None and (
            isinstance(cache, KVCache)
            or not isinstance(cache, Sequence)
            or not all(isinstance(c, KVCache) for c in cache)
        ):
            raise TypeError(
                f"{where}: cache must be a list of {len(self.blocks)} KVCache (one per block), got {cache!r}"
            )
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(
                f"{where}: cache must be a list of {len(self.blocks)} KVCache (one per block), got {len(cache)}"
            )
        past = len(cache[0]) if cache is not None else 0
        t = tokens.shape[-1]
        if past + t > self.max_seq_len:
            raise ValueError(
                f"{where}: sequence of {past + t} tokens ({past} cached + {t} new) is longer than the positional "
                f"table, max_seq_len={self.max_seq_len}"
            )
        pos = torch.arange(past, past + t, device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(pos)
        for k, block in enumerate(self.blocks):
            x = block(x, cache=None if cache is None else cache[k])
        return self.head(self.ln_f(x))

    def _check_tokens(self, tokens: object, where: str) -> torch.Tensor:
        """Integer token ids of shape ``(..., T)``, each in ``0 .. vocab_size - 1``."""
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"{where}: tokens must be an integer tensor of shape (..., T), got {type(tokens).__name__}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise TypeError(
                f"{where}: tokens must be an integer tensor of shape (..., T), got {tokens.dtype} {tuple(tokens.shape)}"
            )
        if tokens.ndim < 1:
            raise ValueError(f"{where}: tokens must have shape (..., T), got a 0-d tensor")
        if tokens.numel():
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= self.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(f"{where}: token id {bad} is outside the vocabulary 0 .. {self.vocab_size - 1}")
        return tokens if tokens.dtype in (torch.int32, torch.int64) else tokens.long()

    @torch.no_grad()
    def generate(
        self,
        tokens: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        greedy: bool = False,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue ``tokens`` ``(B, T)`` by ``max_new_tokens``, sampling (or argmax with ``greedy``) each one.

        With ``use_cache`` the prompt fills the KV caches once and each step feeds one token; without, each step
        runs the whole sequence again (same result, for checking).

        Args:
            tokens: the prompt, integer ids ``(B, T)`` with ``T >= 1``.
            max_new_tokens: tokens to add (an int >= 0).
            temperature: divides the logits before sampling (finite, > 0).
            top_k: sample among the ``top_k`` most likely tokens only (an int >= 1; None: all).
            greedy: take the most likely token instead of sampling.
            use_cache: decode through KV caches (the attention layers must be causal).
            generator: the random generator for sampling.

        Returns:
            ``(B, T + max_new_tokens)``.
        """
        where = "GPT.generate"
        tokens = self._check_tokens(tokens, where)
        if tokens.shape[-1] == 0:
            raise ValueError(f"{where}: the prompt is empty (tokens of shape {tuple(tokens.shape)}); give at least one")
        max_new_tokens = check_int(where, "max_new_tokens", max_new_tokens, 0)
        if tokens.shape[-1] + max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"{where}: {tokens.shape[-1]} + {max_new_tokens} tokens exceed max_seq_len={self.max_seq_len}"
            )
        for name, flag in (("greedy", greedy), ("use_cache", use_cache)):
            if not isinstance(flag, bool):
                raise TypeError(f"{where}: {name} must be a bool, got {type(flag).__name__} {flag!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
            raise TypeError(f"{where}: temperature must be a number, got {type(temperature).__name__} {temperature!r}")
        if not greedy and not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"{where}: temperature must be finite and > 0 (or use greedy=True), got {temperature!r}")
        if top_k is not None:
            top_k = check_int(where, "top_k", top_k)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"{where}: generator must be a torch.Generator or None, got {type(generator).__name__}")
        cache = self.new_cache() if use_cache else None
        out = tokens
        step = tokens
        for _ in range(max_new_tokens):
            logits = self(step if use_cache else out, cache=cache)[..., -1, :]
            if greedy:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
                nxt = nxt.reshape(*probs.shape[:-1], 1)
            out = torch.cat([out, nxt], dim=-1)
            step = nxt
        return out


def _build_attention(factory: AttentionFactory, d_model: int, n_heads: int) -> torch.nn.Module:
    """``factory(d_model, n_heads)``, checked to be a module."""
    layer = factory(d_model, n_heads)
    if not isinstance(layer, torch.nn.Module):
        raise TypeError(
            f"GPT: attention(d_model={d_model}, n_heads={n_heads}) must return an nn.Module, got {type(layer).__name__}"
        )
    return layer
