"""Forward cost of a structured attention layer, from shapes alone, in both conventions.

Conventions (every entry holds both):

- ``flops``: a multiply-add counts 2 (opt_einsum's and structmat's :class:`structmat.Cost` convention);
- ``macs``: one per multiply-add (the paper's and fvcore's convention); elementwise work (softmax, QK-norm) has 0 MACs.

Parts, for ``T_q = seq_len`` new tokens at positions ``past .. past + T_q - 1`` attending to ``T_k = past + T_q``
keys, ``H`` heads and ``batch`` sequences:

- ``query_features[l]``, ``key_features[l]``: the two sides ``L_l``, ``R_l`` of level ``l``'s split
  ``W_l = L_l^T R_l`` (:func:`structmat.bilinear_split`) applied to the ``T_q`` new tokens, costed by structmat
  (``op.cost(batch * T_q)``; a side shared by the heads counts once; an identity side is free). Keys of cached tokens
  were paid for when they were new.
- ``qk_norm`` (only with QK-norm): 5 FLOPs per feature element normalized (mean, centre, square-sum, scale, divide).
- ``value_projection``: the value stack on the new tokens.
- ``scores[l]``: ``r_l`` MACs per head for every (query, key) pair level ``l`` joins: ``T_q · T_k`` for a global
  level, ``Σ_blocks (queries in block)·(keys in block)`` for a blocked level (``T_l`` keys per query when the
  blocks divide ``T``: MLR scores cost ``Σ_l r_l · T_l`` per query per head), the pairs with ``|i - j| < w`` for a
  window ``w``. Pairs are counted before the causal mask (the layer computes them all, then masks).
- ``softmax``: over the ``(T_q, T_k')`` score matrix per head the layer holds: 5 FLOPs per entry (the logit scale's
  multiply, subtract the row max, exp, add to the row sum, divide by it; the max's comparisons are not counted), 0 MACs.
  ``T_k'`` is ``T_k`` except in a decoding step (``past > 0``) of a layer whose KV cache drops the tokens no query
  can see any more (no global level, unjoined pairs masked): then only the keys it still holds count.
- ``attention_values``: ``P @ V``, ``T_q · T_k' · d_v`` MACs per head.
- ``output_projection``: the output operator on the new tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from structmat.checks import check_int

__all__ = ["CostPart", "AttentionCost", "pairs_joined"]


@dataclass(frozen=True)
class CostPart:
    """One part of a layer's forward cost.

    Attributes:
        name: e.g. ``"scores[1]"``.
        flops: a multiply-add counts 2.
        macs: one per multiply-add.
    """

    name: str
    flops: int
    macs: int


@dataclass(frozen=True)
class AttentionCost:
    """Forward cost of an attention layer on ``batch`` sequences of ``seq_len`` new tokens after ``past`` cached ones.

    Attributes:
        seq_len: new tokens (queries) per sequence, ``T_q``.
        batch: sequences.
        past: cached tokens before them; keys ``T_k = past + seq_len``.
        heads: attention heads.
        parts: the entries, in execution order (see the module doc for each one's convention).
        method: the attention path the layer's forward runs for these sizes (``"pieces"``, ``"sdpa"``,
            ``"scores"`` or ``"streamed"``; see :func:`structmat_attention.functional.attention_path`), or None
            when not known. The parts count the mathematical work (pairs joined), whatever the path.

    Example:
        >>> from structmat_attention import CostPart, AttentionCost
        >>> c = AttentionCost(4, 1, 0, 2, (CostPart("scores[0]", 64, 32), CostPart("softmax", 160, 0)))
        >>> c.flops, c.macs, c["softmax"].flops
        (224, 32, 160)
    """

    seq_len: int
    batch: int
    past: int
    heads: int
    parts: tuple[CostPart, ...]
    method: str | None = None

    @property
    def flops(self) -> int:
        """Total FLOPs (a multiply-add counts 2)."""
        return sum(p.flops for p in self.parts)

    @property
    def macs(self) -> int:
        """Total multiply-adds (the paper's convention)."""
        return sum(p.macs for p in self.parts)

    def total(self, prefix: str) -> CostPart:
        """The sum of the parts whose names start with ``prefix``, e.g. ``"scores"`` for every level's scores."""
        chosen = [p for p in self.parts if p.name.startswith(prefix)]
        if not chosen:
            raise KeyError(f"AttentionCost: no part starts with {prefix!r}; parts are {[p.name for p in self.parts]}")
        return CostPart(prefix, sum(p.flops for p in chosen), sum(p.macs for p in chosen))

    def __getitem__(self, name: str) -> CostPart:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(f"AttentionCost: no part {name!r}; parts are {[p.name for p in self.parts]}")

    def __iter__(self) -> Iterator[CostPart]:
        return iter(self.parts)

    def __str__(self) -> str:
        width = max((len(p.name) for p in self.parts), default=4)
        path = f", path {self.method}" if self.method is not None else ""
        lines = [
            f"  Attention cost: batch {self.batch}, {self.seq_len} new tokens after {self.past}, {self.heads} heads"
            + path,
            f"  {'part':<{width}}  {'FLOPs (mul-add = 2)':>20}  {'MACs':>16}",
        ]
        lines += [f"  {p.name:<{width}}  {p.flops:>20,}  {p.macs:>16,}" for p in self.parts]
        lines.append(f"  {'total':<{width}}  {self.flops:>20,}  {self.macs:>16,}")
        return "\n".join(lines)


def pairs_joined(block_size: int | None, window: int | None, t_q: int, t_k: int, q_offset: int = 0) -> int:
    """How many (query, key) pairs a level joins: queries at ``q_offset ..``, keys at ``0 .. t_k - 1``.

    Args:
        block_size: the level's block size (None: global or windowed).
        window: the level's window (pairs with ``|i - j| < window``), or None.
        t_q: queries.
        t_k: keys.
        q_offset: absolute position of the first query.

    Returns:
        The number of pairs (causal masking not applied).

    Example:
        >>> pairs_joined(None, None, 5, 5), pairs_joined(2, None, 5, 5), pairs_joined(None, 2, 5, 5)
        (25, 9, 13)
    """
    block_size = check_int("pairs_joined", "block_size", block_size, optional=True)
    window = check_int("pairs_joined", "window", window, optional=True)
    if block_size is not None and window is not None:
        raise ValueError(f"pairs_joined: give block_size={block_size} or window={window}, not both")
    t_q = check_int("pairs_joined", "t_q", t_q, 0)
    t_k = check_int("pairs_joined", "t_k", t_k, 0)
    q_offset = check_int("pairs_joined", "q_offset", q_offset, 0)
    if block_size is not None:
        total = 0
        q_end = q_offset + t_q
        for u in range(q_offset // block_size, (q_end - 1) // block_size + 1):
            lo, hi = u * block_size, (u + 1) * block_size
            n_q = min(hi, q_end) - max(lo, q_offset)
            n_k = max(min(hi, t_k) - lo, 0)
            total += n_q * n_k
        return total
    if window is not None:
        return sum(max(min(i + window, t_k) - max(i - window + 1, 0), 0) for i in range(q_offset, q_offset + t_q))
    return t_q * t_k
