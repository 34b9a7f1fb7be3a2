"""The "streamed" path: an online softmax over key blocks, forward and backward (private).

Never more than one ``(T_q, key_block)`` tile of scores per head is held; the backward recomputes each tile from
the features and the saved log-sum-exp.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ._scores import _mask_scores, _reduce_to
from .levels import Level

__all__: list[str] = []


def _level_rows(lv: Level, t_q: int, k0: int, k1: int, q_offset: int) -> tuple[int, int]:
    """The query rows ``a .. b - 1`` that level ``lv`` may join with keys ``k0 .. k1 - 1`` (all for a global one)."""
    if lv.block_size is not None:
        lo, hi = k0 // lv.block_size * lv.block_size, -(-k1 // lv.block_size) * lv.block_size
    elif lv.window is not None:
        lo, hi = k0 - lv.window + 1, k1 + lv.window - 1
    else:
        return 0, t_q
    return min(max(lo - q_offset, 0), t_q), min(max(hi - q_offset, 0), t_q)


def _visible_tiles(
    feats: list, t_q: int, t_k: int, kb: int, causal: bool, mask: torch.Tensor | None, q_offset: int, masked: bool
) -> Iterator[tuple[int, int, int, int, torch.Tensor, list]]:
    """``(k0, k1, r0, r1, scores, parts)`` of every key block of ``kb`` keys, for the query rows ``r0 .. r1`` that may
    see it (skipped when none may): the tiles the forward and the backward both visit."""
    levels = [f[0] for f in feats]
    for k0 in range(0, t_k, kb):
        k1 = min(k0 + kb, t_k)
        r0, r1 = _tile_rows(levels, t_q, k0, k1, causal, q_offset, masked)
        if r0 < r1:
            s, parts = _block_scores(feats, (r0, r1), k0, k1, causal, mask, q_offset, masked)
            yield k0, k1, r0, r1, s, parts


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
        for k0, k1, r0, r1, s, _ in _visible_tiles(feats, t_q, t_k, kb, causal, mask, q_offset, masked):
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
        for k0, k1, r0, r1, s, parts in _visible_tiles(feats, t_q, t_k, kb, causal, mask, q_offset, masked):
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
