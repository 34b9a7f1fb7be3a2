"""Exact multi-level attention as fused attention calls on pieces, merged by their log-sum-exp.

Levels are ordered coarse to fine: depth 0 holds the global levels (and blocks as long as the sequence), depth
``i >= 1`` the block levels of the ``i``-th largest block size ``B_i`` (``B_1 > B_2 > ... > B_m``, each dividing the
one before: nested). The features are concatenated in that order (each level's query side multiplied by its constant),
so depth ``i``'s levels fill columns ``w_{i-1} .. w_i`` (prefix widths ``w_i``). A query and a key whose finest common
block is at depth ``i`` score with the prefix ``0 .. w_i`` only: the deeper levels do not join them.

So every (query, key) pair falls into exactly one piece:

- transition ``i -> i + 1`` (parents of ``B_i`` tokens, ``B_0`` = the whole padded sequence; children of
  ``B_{i+1}``, ``k = B_i / B_{i+1}`` per parent): for each child ``a``, its queries attend to the keys of the
  earlier siblings ``0 .. a - 1`` (and, without causality, of the later ones ``a + 1 .. k - 1``) with the prefix
  features ``w_i`` (the query's other columns zeroed): one non-causal fused call per ``a``, batched over the parents.
  With no global level and unjoined pairs masked, transition 0 joins nothing and is skipped; with ``unjoined="zero"``
  it runs with zero features (score 0).
- the finest blocks ``B_m`` attend to themselves with all features (causal within the block, or full): one call
  batched over the blocks.

The pieces' outputs are merged exactly by their log-sum-exp. The kernel is torch's CPU flash attention
(``aten._scaled_dot_product_flash_attention_for_cpu``), which returns the log-sum-exp and needs one head width for
q, k and v: the features and values are zero-padded to ``D = max(Σ_l r_l, d_v)``. Its backward, called once per piece
with the MERGED output and the GLOBAL log-sum-exp, gives exactly that piece's share of dq, dk and dv, so the autograd
function below saves only its inputs, the merged output and the log-sum-exp (memory ``O(T · D)``).

Two refinements, both exact:

- the leaf: blocks of at most :data:`LEAF` tokens (the first depth that small, and every depth below it inside them)
  are computed with explicit scores in batched matmuls, ``(T / L, L, L)`` per head, whose probabilities are kept for
  the backward (``O(T · L)``): the fused kernel's per-call overhead dominates on small blocks;
- virtual depths: causally, finest blocks larger than the leaf are split further (by their smallest prime factor),
  with no features of their own, so that their halves attend to each other non-causally (the kernel's fast case)
  and only the small diagonal blocks are causal.

The query and key buffers are ``2 D`` wide: the features sit in columns ``D - w_m .. D - 1`` (coarse levels last),
zeros elsewhere, so depth ``i``'s prefix is the column window ``D - w_i .. 2 D - w_i - 1`` of both buffers: a view,
no copy per depth.

A sequence whose length is not a multiple of ``B_1`` is padded with zero tokens at the end. Causally, a padded key
is only seen by padded queries (their output is cut off, their output gradient is 0, so they add nothing). Without
causality, the pieces that hold padded keys get an additive mask of ``-1e30`` on them (finite: the kernel returns
``lse = 0`` for a row with every key at ``-inf``; ``exp(-1e30 - lse)`` is exactly 0 in float32 and float64).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

__all__: list[str] = []  # private: used through structmat_attention.functional (method="pieces")

_NEG = -1.0e30  # the additive mask of a padded key (finite, see the module doc)
_DTYPES = (torch.float32, torch.float64)


def _kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
        torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward"
    )


@dataclass(frozen=True)
class PiecesPlan:
    """How a set of levels runs as pieces on ``t`` tokens (see the module doc).

    Attributes:
        t: tokens.
        t_pad: tokens after padding to a multiple of the coarsest block size ``sizes[1]``.
        order: the levels' indices, coarse to fine (global first, then by decreasing block size).
        sizes: ``(t_pad, B_1, ..., B_m)``: the block size of each depth (depth 0: the whole padded sequence).
        prefix: ``(w_0, ..., w_m)``: feature columns used by pairs whose finest common block is at each depth.
        width: the head width of the fused calls, ``max(w_m, d_v)``.
        top: whether transition 0 runs (False: no global level and unjoined pairs masked).
        causal: causal attention.
        leaf: the depth whose blocks are computed with explicit scores (every depth below it inside them), or
            None: then the finest blocks attend to themselves through the fused kernel.
    """

    t: int
    t_pad: int
    order: tuple[int, ...]
    sizes: tuple[int, ...]
    prefix: tuple[int, ...]
    width: int
    top: bool
    causal: bool
    leaf: int | None


def pieces_blocker(
    blocks: Sequence[int | None],
    windows: Sequence[int | None],
    t_q: int,
    t_k: int,
    q_offset: int,
    has_mask: bool,
    device: torch.device,
    dtype: torch.dtype,
    autocast: bool,
) -> str | None:
    """None when the pieces path applies to these levels and call, else why not (in words)."""
    if any(w is not None for w in windows):
        return "a sliding-window level"
    if q_offset != 0 or t_q != t_k:
        return f"not self-attention from position 0 (q_offset={q_offset}, T_q={t_q}, T_k={t_k}: decoding)"
    if t_k == 0:
        return "no keys"
    if has_mask:
        return "a user mask"
    sizes = sorted({b for b in blocks if b is not None and b < t_k}, reverse=True)
    for big, small in zip(sizes, sizes[1:]):
        if big % small:
            return f"block sizes {sizes} are not nested ({small} does not divide {big})"
    if device.type != "cpu":
        return f"the fused kernel with log-sum-exp is torch's CPU one, the tensors are on {device.type}"
    if dtype not in _DTYPES:
        return f"dtype {dtype} (the pieces merge in the inputs' dtype: float32 and float64 only)"
    if autocast:
        return "autocast is on"
    if not _kernel_available():
        return "this torch has no aten._scaled_dot_product_flash_attention_for_cpu"
    return None


#: Blocks of at most this many tokens are computed with explicit scores (batched matmuls) instead of the fused
#: kernel, whose per-block overhead dominates on small blocks (measured on CPU: a causal 8-token block costs
#: 15-25x the time per pair of a 512-token piece; 16 to 32 measured best on the configurations of
#: benchmarks/bench_attention.py). Causal blocks larger than this are split further ("virtual"
#: depths with no features of their own): their halves attend to each other non-causally, which the kernel does
#: at full speed, and only the small diagonal blocks are causal.
LEAF = 32


def _smallest_factor(n: int) -> int | None:
    """The smallest prime factor of ``n`` up to 7 (None: none)."""
    return next((p for p in (2, 3, 5, 7) if n % p == 0), None)


def plan_pieces(
    blocks: Sequence[int | None],
    widths: Sequence[int],
    t: int,
    d_v: int,
    causal: bool,
    masked: bool,
    leaf: int | None = None,
) -> PiecesPlan:
    """The plan for levels of these block sizes (None: global) and feature widths, on ``t`` tokens (checked by
    :func:`pieces_blocker` first). ``masked``: unjoined pairs are masked out (no global level). ``leaf``: blocks of
    at most this many tokens get explicit scores (default :data:`LEAF`; 0: never)."""
    leaf_max = LEAF if leaf is None else leaf
    depth_of = [None if b is None or b >= t else b for b in blocks]  # a block as long as the sequence is global
    sizes = sorted({b for b in depth_of if b is not None}, reverse=True)
    order = sorted(range(len(blocks)), key=lambda i: -math.inf if depth_of[i] is None else -depth_of[i])
    t_pad = -(-t // sizes[0]) * sizes[0] if sizes else t  # no block level: one piece, the whole sequence
    prefix = []
    for size in [None, *sizes]:
        prefix.append(sum(widths[i] for i in order if depth_of[i] == size) + (prefix[-1] if prefix else 0))
    sizes = [t_pad, *sizes]
    top = any(b is None for b in depth_of) or not masked
    if causal and leaf_max:  # virtual depths: split the finest causal blocks until they are small
        while sizes[-1] > leaf_max and (p := _smallest_factor(sizes[-1])) is not None:
            sizes.append(sizes[-1] // p)
            prefix.append(prefix[-1])
    first = 0 if top else 1
    leaf_depth = next((d for d in range(first, len(sizes)) if sizes[d] <= leaf_max), None)
    width = max(prefix[-1], d_v)
    return PiecesPlan(t, t_pad, tuple(order), tuple(sizes), tuple(prefix), width, top, causal, leaf_depth)


@dataclass(frozen=True)
class _Piece:
    """One fused call: the queries of child ``a`` attend to the keys of children ``b0 .. b1 - 1`` of every parent at
    ``depth``, with the prefix features of that depth (the finest blocks or the leaf are not pieces)."""

    depth: int
    a: int
    b0: int
    b1: int


def _pieces(plan: PiecesPlan) -> Iterator[_Piece]:
    m = len(plan.sizes) - 1 if plan.leaf is None else plan.leaf
    for depth in range(0 if plan.top else 1, m):
        k = plan.sizes[depth] // plan.sizes[depth + 1]
        for a in range(1, k):
            yield _Piece(depth, a, 0, a)
        if not plan.causal:
            for a in range(k - 1):
                yield _Piece(depth, a, a + 1, k)


def _rows(x: torch.Tensor, plan: PiecesPlan, depth: int, b0: int, b1: int) -> torch.Tensor:
    """``x`` (N, H, T_pad, ...) seen as (N, H, parents, children b0 .. b1 - 1, child size, ...): a view."""
    parent, child = plan.sizes[depth], plan.sizes[depth + 1]
    n, h = x.shape[:2]
    view = x.view(n, h, plan.t_pad // parent, parent // child, child, *x.shape[3:])
    return view[:, :, :, b0:b1]


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(N, H, parents, children, child size, ...) -> (N, H · parents, children · child size, ...): a view for the
    row slices :func:`_rows` gives (heads and parents merge: ``T_pad = parents · parent size``)."""
    n, h, p, c, s = x.shape[:5]
    return x.reshape(n, h * p, c * s, *x.shape[5:])


def _key_mask(plan: PiecesPlan, depth: int, b0: int, b1: int, heads: int, like: torch.Tensor) -> torch.Tensor | None:
    """Without causality, the additive mask of the padded keys among children ``b0 .. b1 - 1`` of every parent,
    ``(1, H · parents, 1, keys)``; None when no key there is padding."""
    if plan.causal or plan.t == plan.t_pad:
        return None
    if depth == len(plan.sizes) - 1:
        parent, child = plan.sizes[depth], plan.sizes[depth]
    else:
        parent, child = plan.sizes[depth], plan.sizes[depth + 1]
    parents = plan.t_pad // parent
    if plan.t_pad - parent + b1 * child <= plan.t:  # the last parent's keys are all real tokens
        return None
    pos = torch.arange(b0 * child, b1 * child, device=like.device)
    padded = pos[None, :] + parent * torch.arange(parents, device=like.device)[:, None] >= plan.t  # (parents, keys)
    mask = torch.zeros(padded.shape, dtype=like.dtype, device=like.device).masked_fill_(padded, _NEG)
    return mask.expand(heads, *mask.shape).reshape(1, heads * parents, 1, -1)


def _finest(x: torch.Tensor, plan: PiecesPlan) -> torch.Tensor:
    """(N, H, T_pad, ...) -> (N, H · blocks, finest block size, ...), a view."""
    n, h = x.shape[:2]
    return x.view(n, h * (plan.t_pad // plan.sizes[-1]), plan.sizes[-1], *x.shape[3:])


def _columns(plan: PiecesPlan, widths: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(level, c0, c1)``: where each level's features sit in the ``2 D`` wide buffers (see :func:`_buffers`)."""
    out = []
    end = plan.width  # coarse levels last: depth i's prefix is the column window [D - w_i, D)
    for i in plan.order:
        out.append((i, end - widths[i], end))
        end -= widths[i]
    return out


def _window(x: torch.Tensor, plan: PiecesPlan, depth: int) -> torch.Tensor:
    """The ``D`` columns of a ``2 D`` wide buffer whose dot products are depth ``depth``'s prefix scores: queries
    and keys in columns ``D - w_i .. D - 1`` (the prefix), then the zero half (a view)."""
    start = 0 if depth == len(plan.sizes) - 1 else plan.width - plan.prefix[depth]
    return x[..., start : start + plan.width]


def _reduce(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a gradient over the dims its input was broadcast along."""
    while grad.ndim > len(shape):
        grad = grad.sum(0)
    dims = [d for d, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1]
    return grad.sum(dims, keepdim=True) if dims else grad


def _buffers(
    plan: PiecesPlan, lead: torch.Size, consts: Sequence[float], v: torch.Tensor, qk: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries and keys ``(N, H, T_pad, 2 D)`` (features at their columns, constants folded into the queries, zeros
    elsewhere: padded rows, the pad columns before the finest level, the whole second half) and values
    ``(N, H, T_pad, D)`` (zero-padded)."""
    n_lead = len(lead)
    heads = lead[-1] if n_lead else 1
    n = math.prod(lead[:-1]) if n_lead else 1
    t, d, t_pad = plan.t, plan.width, plan.t_pad
    widths = [qk[2 * i].shape[-1] for i in range(len(consts))]
    like = qk[0]
    bufs = []
    for side in (0, 1):
        buf = like.new_empty(n, heads, t_pad, 2 * d)
        if t < t_pad:
            buf.zero_()
        else:  # every column but the features'
            buf[..., d:].zero_()
            if plan.prefix[-1] < d:
                buf[..., : d - plan.prefix[-1]].zero_()
        view = buf.view(*lead, t_pad, 2 * d)
        for i, c0, c1 in _columns(plan, widths):
            dst = view[..., :t, c0:c1]
            dst.copy_(qk[2 * i + side])
            if side == 0 and consts[i] != 1.0:
                dst.mul_(consts[i])
        bufs.append(buf)
    d_v = v.shape[-1]
    if t == t_pad and d == d_v:
        vb = v.expand(*lead, t, d_v).reshape(n, heads, t, d_v).contiguous()
    else:
        vb = v.new_zeros(n, heads, t_pad, d)
        vb.view(*lead, t_pad, d)[..., :t, :d_v].copy_(v)
    return bufs[0], bufs[1], vb


def _leaf_view(x: torch.Tensor, plan: PiecesPlan) -> torch.Tensor:
    """(N, H, T_pad, ...) -> (N · H · leaf blocks, leaf size, ...), a view."""
    size = plan.sizes[plan.leaf]  # type: ignore[index]
    return x.view(-1, size, *x.shape[3:])


def _leaf_parts(plan: PiecesPlan) -> list[tuple[int, int, int]]:
    """``(c0, c1, block)`` for each depth below the leaf that has features of its own."""
    d = plan.width
    out = []
    for depth in range(plan.leaf + 1, len(plan.sizes)):  # type: ignore[operator]
        c0, c1 = d - plan.prefix[depth], d - plan.prefix[depth - 1]
        if c1 > c0:
            out.append((c0, c1, plan.sizes[depth]))
    return out


def _leaf_scores(plan: PiecesPlan, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The scores inside every leaf block, ``(M, L, L)``: the leaf depth's prefix for every pair, plus each deeper
    depth's own features on its diagonal blocks; masked (causal: ``-inf`` above the diagonal; padded keys: -1e30)."""
    size, d, w = plan.sizes[plan.leaf], plan.width, plan.prefix[plan.leaf]  # type: ignore[index]
    qv, kv = _leaf_view(q, plan), _leaf_view(k, plan)
    m = qv.shape[0]
    if w:
        s = torch.bmm(qv[..., d - w : d], kv[..., d - w : d].mT)
    else:
        s = qv.new_zeros(m, size, size)
    for c0, c1, block in _leaf_parts(plan):
        g, r = size // block, c1 - c0
        part = torch.bmm(qv[..., c0:c1].reshape(m * g, block, r), kv[..., c0:c1].reshape(m * g, block, r).mT)
        s.view(m, g, block, g, block).diagonal(dim1=1, dim2=3).add_(part.view(m, g, block, block).permute(0, 2, 3, 1))
    if plan.causal:
        above = torch.ones(size, size, dtype=torch.bool, device=s.device).triu_(1)
        s.masked_fill_(above, float("-inf"))
    elif plan.t < plan.t_pad:
        padded = torch.arange(plan.t_pad, device=s.device).view(-1, 1, size) >= plan.t  # (leaf blocks, 1, L)
        s.view(-1, padded.shape[0], size, size).masked_fill_(padded, _NEG)
    return s


def _leaf_forward(plan: PiecesPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The leaf blocks' output and log-sum-exp ``(N, H, T_pad, ...)``, and their probabilities ``(M, L, L)`` (kept
    for the backward: ``O(T · L)``, cheaper than recomputing the scores)."""
    s = _leaf_scores(plan, q, k)
    top = s.amax(dim=-1, keepdim=True)  # finite: a row always sees its own key
    p = s.sub_(top).exp_()
    denom = p.sum(dim=-1, keepdim=True)
    p.div_(denom)
    n, h = q.shape[:2]
    out = torch.bmm(p, _leaf_view(v, plan))
    lse = (top + denom.log_()).view(n, h, plan.t_pad)
    return out.view(n, h, plan.t_pad, plan.width), lse, p


def _leaf_backward(
    plan: PiecesPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    p_leaf: torch.Tensor,
    lse_leaf: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leaf blocks' share of dq, dk, dv (``(N, H, T_pad, D)`` each), from the merged output and the global
    log-sum-exp: the global probabilities are the leaf's rescaled by ``exp(lse_leaf - lse)``."""
    size, d, w = plan.sizes[plan.leaf], plan.width, plan.prefix[plan.leaf]  # type: ignore[index]
    n, h = q.shape[:2]
    rescale = torch.exp(_leaf_view(lse_leaf, plan) - _leaf_view(lse, plan)).unsqueeze(-1)
    p = p_leaf * rescale
    do_l, v_l = _leaf_view(do, plan), _leaf_view(v, plan)
    dv = torch.bmm(p.mT, do_l).view(n, h, plan.t_pad, d)
    delta = (do_l * _leaf_view(out, plan)).sum(-1, keepdim=True)
    ds = p.mul_(torch.baddbmm(delta.neg_(), do_l, v_l.mT))  # p * (do v^T - delta)
    dq, dk = (q.new_empty(n, h, plan.t_pad, d) for _ in range(2))
    if plan.prefix[-1] < d:  # the pad columns before the finest level's features
        dq[..., : d - plan.prefix[-1]].zero_()
        dk[..., : d - plan.prefix[-1]].zero_()
    qv, kv, dq_l, dk_l = (_leaf_view(x, plan) for x in (q, k, dq, dk))
    m = qv.shape[0]
    if w:
        dq_l[..., d - w : d] = torch.bmm(ds, kv[..., d - w : d])
        dk_l[..., d - w : d] = torch.bmm(ds.mT, qv[..., d - w : d])
    for c0, c1, block in _leaf_parts(plan):
        g, r = size // block, c1 - c0
        ds_d = ds.view(m, g, block, g, block).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(m * g, block, block)
        dq_l[..., c0:c1] = torch.bmm(ds_d, kv[..., c0:c1].reshape(m * g, block, r)).view(m, size, r)
        dk_l[..., c0:c1] = torch.bmm(ds_d.mT, qv[..., c0:c1].reshape(m * g, block, r)).view(m, size, r)
    return dq, dk, dv


def _merge(out: torch.Tensor, lse: torch.Tensor, o_p: torch.Tensor, l_p: torch.Tensor) -> None:
    """Fold a piece's output and log-sum-exp into the running ones (views of the same rows), in place."""
    l_p = l_p.reshape(lse.shape)
    new = torch.logaddexp(lse, l_p)
    out.mul_(torch.exp(lse - new).unsqueeze(-1)).addcmul_(o_p.view(out.shape), torch.exp(l_p - new).unsqueeze(-1))
    lse.copy_(new)


class _PiecesAttention(torch.autograd.Function):
    """Attention over the pieces of a :class:`PiecesPlan`, forward and backward through the fused CPU kernel.

    Arguments after the plan: the output's batch dims (heads last), the levels' constants, the values and every
    level's query and key features (in the levels' order). Saved for the backward: the ``2 D`` wide query and key
    buffers, the padded values, the merged output and the log-sum-exp (``O(T · D)``).
    """

    @staticmethod
    def forward(ctx, plan, lead, consts, v, *qk):  # type: ignore[override]
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        q, k, vb = _buffers(plan, lead, consts, v, qk)
        n, h = q.shape[:2]
        m = len(plan.sizes) - 1
        if plan.leaf is not None:
            out, lse, p_leaf = _leaf_forward(plan, q, k, vb)
            leaf = (p_leaf, lse.clone())  # the merges below update lse in place
        else:
            out, lse = flash(
                _finest(_window(q, plan, m), plan), _finest(_window(k, plan, m), plan), _finest(vb, plan), 0.0,
                plan.causal, attn_mask=_key_mask(plan, m, 0, 1, h, q), scale=1.0,
            )  # fmt: skip
            out = out.view(n, h, plan.t_pad, plan.width)
            lse = lse.reshape(n, h, plan.t_pad)
        for pc in _pieces(plan):
            qa = _flat(_rows(_window(q, plan, pc.depth), plan, pc.depth, pc.a, pc.a + 1))
            ka = _flat(_rows(_window(k, plan, pc.depth), plan, pc.depth, pc.b0, pc.b1))
            va = _flat(_rows(vb, plan, pc.depth, pc.b0, pc.b1))
            mask = _key_mask(plan, pc.depth, pc.b0, pc.b1, h, q)
            o_p, l_p = flash(qa, ka, va, 0.0, False, attn_mask=mask, scale=1.0)
            _merge(*(_rows(x, plan, pc.depth, pc.a, pc.a + 1) for x in (out, lse)), o_p, l_p)
        ctx.setup = (plan, lead, consts, v.shape, [x.shape for x in qk])
        ctx.save_for_backward(q, k, vb, out, lse, *(leaf if plan.leaf is not None else ()))
        result = out[:, :, : plan.t, : v.shape[-1]]
        return result.reshape(*lead, plan.t, v.shape[-1])

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        plan, lead, consts, v_shape, qk_shapes = ctx.setup
        q, k, vb, out, lse, *leaf = ctx.saved_tensors
        n, h = q.shape[:2]
        t, d, d_v = plan.t, plan.width, v_shape[-1]
        if t == plan.t_pad and d == d_v:
            do = dout.reshape(n, h, t, d).contiguous()
        else:
            do = dout.new_zeros(n, h, plan.t_pad, d)
            do[:, :, :t, :d_v] = dout.reshape(n, h, t, d_v)
        m = len(plan.sizes) - 1
        if plan.leaf is not None:
            dq, dk, dv = _leaf_backward(plan, q, k, vb, do, out, lse, *leaf)
        else:
            dq, dk, dv = backward(
                _finest(do, plan), _finest(_window(q, plan, m), plan), _finest(_window(k, plan, m), plan),
                _finest(vb, plan), _finest(out, plan), _finest(lse, plan), 0.0, plan.causal,
                attn_mask=_key_mask(plan, m, 0, 1, h, q), scale=1.0,
            )  # fmt: skip
            dq, dk, dv = (x.reshape(n, h, plan.t_pad, d) for x in (dq, dk, dv))  # (the kernel gives (N, T, H, D))
        for pc in _pieces(plan):
            w = plan.prefix[pc.depth]
            qa = _flat(_rows(_window(q, plan, pc.depth), plan, pc.depth, pc.a, pc.a + 1))
            ka = _flat(_rows(_window(k, plan, pc.depth), plan, pc.depth, pc.b0, pc.b1))
            va = _flat(_rows(vb, plan, pc.depth, pc.b0, pc.b1))
            do_a, out_a, lse_a = (_flat(_rows(x, plan, pc.depth, pc.a, pc.a + 1)) for x in (do, out, lse))
            mask = _key_mask(plan, pc.depth, pc.b0, pc.b1, h, q)
            g_q, g_k, g_v = backward(do_a, qa, ka, va, out_a, lse_a, 0.0, False, attn_mask=mask, scale=1.0)
            if w:  # the window's first w columns are the prefix, at columns D - w .. D - 1
                rows = _rows(dq, plan, pc.depth, pc.a, pc.a + 1)[..., d - w :]
                rows += g_q.view(*rows.shape[:-1], d)[..., :w]
                rows = _rows(dk, plan, pc.depth, pc.b0, pc.b1)[..., d - w :]
                rows += g_k.view(*rows.shape[:-1], d)[..., :w]
            rows = _rows(dv, plan, pc.depth, pc.b0, pc.b1)
            rows += g_v.view(rows.shape)
        widths = [s[-1] for s in qk_shapes[::2]]
        grads: list[torch.Tensor | None] = [None] * len(qk_shapes)
        dq_l, dk_l = (x.view(*lead, plan.t_pad, d)[..., :t, :] for x in (dq, dk))
        for i, c0, c1 in _columns(plan, widths):
            if ctx.needs_input_grad[4 + 2 * i]:
                g = dq_l[..., c0:c1]
                grads[2 * i] = _reduce(g * consts[i] if consts[i] != 1.0 else g, qk_shapes[2 * i])
            if ctx.needs_input_grad[5 + 2 * i]:
                grads[2 * i + 1] = _reduce(dk_l[..., c0:c1], qk_shapes[2 * i + 1])
        gv = dv.view(*lead, plan.t_pad, d)[..., :t, :d_v] if ctx.needs_input_grad[3] else None
        gv = _reduce(gv, v_shape) if gv is not None else None
        return (None, None, None, gv, *grads)


def pieces_attention(plan: PiecesPlan, feats: list, v: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """Attention of the levels' features ``feats`` (``(level, q, k, c)`` in the levels' order) over values ``v``,
    by the pieces of ``plan``; ``lead`` is the output's batch dims (heads included). Returns ``(*lead, T, d_v)``."""
    consts = [float(f[3]) for f in feats]
    qk = [x for f in feats for x in (f[1], f[2])]
    return _PiecesAttention.apply(plan, tuple(lead), consts, v, *qk)
