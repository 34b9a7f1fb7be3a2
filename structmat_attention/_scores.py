"""The "scores" path: every level accumulated, in place, into one ``(T_q, T_k)`` score matrix per head (private).

A global level is one matmul; a blocked level touches only its diagonal blocks and a windowed level only the tiles
near the diagonal (:class:`_AddTiles`, whose backward reads the tiles of the incoming gradient directly).
"""

from __future__ import annotations

import math

import torch

from .levels import Level

__all__: list[str] = []


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
