"""The "sdpa" path: torch's fused ``scaled_dot_product_attention`` on block-expanded features (private).

A blocked level spreads its ``r_l`` features over one slot per block (``q ⊗ e_block(i)``), so that the plain dot
product of the expanded features is the multi-level score: no score matrix is held. Windowed levels have no such
form.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .levels import Level

__all__: list[str] = []


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
