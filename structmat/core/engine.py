"""The execution engine of a single tensor network: its planned pairwise path as a short list of GEMMs on views.

A :class:`~structmat.core.nodes.NetNode` plans one contraction path per batch size
(:func:`structmat.core.paths.best_path`).
``torch.einsum`` runs such a path step by step too, but it keeps every intermediate in the order its labels come
out of the previous step, which often leaves the batch label innermost: the next batched GEMM then has no unit
stride, and ATen copies every slice of the activations before multiplying. This module compiles the same path, once
per ``(batch, per_head)``, into a :class:`Program` that chooses, for every step,

- which labels form the GEMM's batch, row, contraction and column groups, and in which order within each group, so
  that both operands are *views* of the tensors they come from (no copy) whenever the layouts allow it; a step whose
  operands share no label to batch over may batch over a leading run of one operand's labels instead, the other
  operand broadcast (e.g. the second factor of a Kronecker product, applied to every row);
- the memory order of the step's output (batch, rows, columns in any order that keeps a unit stride in every matrix),
  written directly by the GEMM (``out=``), so that the next step reads views and the last step writes the network's
  output contiguous in the input's layout ``(B, m)`` / ``(B, H, m)``;
- the kernel: ``linear`` for a dense factor applied to ``(B, n)``, else ``mm``/``bmm`` with ``out=`` the step's
  buffer (ATen's ``bmm`` without ``out=`` measured 2.6x slower on 32 x (4096 x 32 · 32 x 128); with a strided
  ``out=`` it multiplies slice by slice in C++, as fast as a loop of ``mm``).

Every GEMM step runs inside :class:`_Gemm`, a custom autograd function that takes the operands' views itself and
whose backward writes each gradient as one GEMM directly in the layout of the operand's source tensor (a whole tensor
comes back, no copy, no autograd view nodes); a broadcast operand's gradient is one GEMM with the batch folded into
the contraction where the layouts allow, else a batched GEMM and a sum; an incoming gradient BLAS cannot read is
copied into the nearest layout it can. Under ``create_graph`` the backward is made of differentiable torch ops
(double backward).

Networks the engine does not take (no factor, a label repeated within one operand) keep the einsum reference; so
does tracing by ``torch.compile``, which sees one ``aten.einsum`` with its planned path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

__all__ = ["Program", "compile_program"]

_BEAM = 24  # partial programs kept per step of the search (after merging those that leave the same layouts)


# -- the program ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Read:
    """How a step reads one operand: ``t.sum(sum_dims).permute(perm).reshape(shape)``, then broadcast to ``expand``
    matrices when ``expand`` > 0 (an operand without the batch labels)."""

    index: int  # position in the list of live tensors
    perm: tuple[int, ...] | None  # None: no permutation
    shape: tuple[int, ...]  # (rows, cols), or (batch, rows, cols)
    expand: int
    sum_dims: tuple[int, ...]  # labels only this operand has (size > 1), summed first
    weight: bool = False  # no batch label: a factor (or a product of factors), its gradient written wide


@dataclass(frozen=True)
class _Step:
    a: _Read
    b: _Read
    kernel: str  # "mm" | "bmm" | "linear" (F.linear(a, b): b read as (cols, k))
    into: tuple[tuple[int, ...], tuple[int, ...]] | None  # (buffer shape, its permutation to ([batch,] m, n))
    out_shape: tuple[int, ...]  # the result split into its labels (batch, rows, cols)


@dataclass(frozen=True)
class _SumStep:
    """A path step that sums the labels only one operand has (opt_einsum's single-operand steps)."""

    index: int
    dims: tuple[int, ...]


@dataclass(frozen=True)
class _MulStep:
    """A step that sums nothing: ``big * small`` broadcast, ``small`` permuted to ``big``'s dims and reshaped with
    ones where it lacks a label (``flip``: the big operand is the second one)."""

    i: int
    j: int
    flip: bool
    perm: tuple[int, ...] | None
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Program:
    """A compiled pairwise contraction: steps on the live tensors (the operands, then each step's result), and the
    final permutation and reshape to the network's output layout."""

    steps: tuple[_Step | _SumStep | _MulStep, ...]
    final_perm: tuple[int, ...] | None
    copies: int  # weighted elements the program copies (see _moved; for tests and the benchmark notes)

    @property
    def linear(self) -> bool:
        """The whole program is ``F.linear(x, factor)`` on the operands as given (a dense matrix on ``(B, n)``)."""
        if len(self.steps) != 1 or self.final_perm is not None:
            return False
        st = self.steps[0]
        return (
            type(st) is _Step
            and st.kernel == "linear"
            and st.a.perm is None
            and not st.a.sum_dims
            and st.b.perm is None
            and len(st.out_shape) == 2
        )

    def run(self, operands: list[torch.Tensor], out_shape: tuple[int, ...]) -> torch.Tensor:
        """Contract ``operands`` (the input first, then the factors, in the equation's order)."""
        live = list(operands)
        for st in self.steps:
            if type(st) is _SumStep:
                live.append(live.pop(st.index).sum(st.dims))
                continue
            if type(st) is _MulStep:
                big, small = (live[st.j], live[st.i]) if st.flip else (live[st.i], live[st.j])
                if st.perm is not None:
                    small = small.permute(st.perm)
                del live[st.j]
                del live[st.i]
                live.append(big * small.reshape(st.shape))
                continue
            ra, rb = st.a, st.b
            sa, sb = live[ra.index], live[rb.index]
            del live[rb.index]  # the path lists a step's operands in increasing order
            del live[ra.index]
            if st.kernel == "linear":
                c = F.linear(_read(sa, ra), _read(sb, rb))
                live.append(c.view(st.out_shape))
                continue
            if sa.dtype != sb.dtype:  # only under autocast (the operator checks dtypes otherwise)
                dtype = torch.promote_types(sa.dtype, sb.dtype)
                sa, sb = sa.to(dtype), sb.to(dtype)
            if torch.is_grad_enabled() and (sa.requires_grad or sb.requires_grad):
                # the operands' views taken inside the function: their gradients come back as whole tensors in
                # their own layouts (no autograd view nodes; accumulated in place where a tensor is used twice)
                va, vb = _view_spec(sa, ra), _view_spec(sb, rb)
                a = sa if va is not None else _read(sa, ra)
                b = sb if vb is not None else _read(sb, rb)
                c = _Gemm.apply(a, b, st.into, ra.expand, rb.expand, (ra.weight, rb.weight), va, vb)
            else:
                c = _product(_read(sa, ra), _read(sb, rb), st.into, ra.expand, rb.expand)
            live.append(c.view(st.out_shape))
        y = live[0]
        if self.final_perm is not None:
            y = y.permute(self.final_perm)
        return y.reshape(out_shape)


def _read(t: torch.Tensor, r: _Read) -> torch.Tensor:
    if r.sum_dims:
        t = t.sum(r.sum_dims)
    if r.perm is not None:
        t = t.permute(r.perm)
    t = t.reshape(r.shape)
    if r.expand:  # (1, rows, cols): broadcast by the kernel
        return t
    if t.ndim == 3 and not _blas_ok(t):  # ATen would copy it slice by slice; one copy of the whole is cheaper
        t = t.contiguous()
    return t


_View = tuple[tuple[int, ...], tuple[int, ...]]  # (permutation, shape) of a read that is a view


def _view_spec(t: torch.Tensor, r: _Read) -> _View | None:
    """The read ``r`` of ``t`` as (permutation, shape) when it is a view BLAS takes as it is, else None."""
    if r.sum_dims:
        return None
    perm = r.perm if r.perm is not None else tuple(range(t.ndim))
    v = _as_view(t, (perm, r.shape))
    if v is None or (v.ndim == 3 and not r.expand and not _blas_ok(v)):
        return None
    return perm, r.shape


def _as_view(t: torch.Tensor, view: _View) -> torch.Tensor | None:
    perm, shape = view
    try:
        return t.permute(perm).view(shape)
    except RuntimeError:  # not expressible as a view of t
        return None


def _back_to(g: torch.Tensor, t: torch.Tensor, view: _View) -> torch.Tensor:
    """The gradient ``g`` of the read ``view`` of ``t``, as a gradient of ``t`` (reshape and inverse permutation)."""
    perm, _ = view
    g = g.reshape([t.shape[d] for d in perm])
    return g.permute([perm.index(d) for d in range(len(perm))])


def _blas_ok(t: torch.Tensor) -> bool:
    """Each matrix of a batch has a unit stride (rows or columns) and a leading dimension BLAS accepts."""
    _, r, c = t.shape
    sr, sc = t.stride(1), t.stride(2)
    return ((sc == 1 or c == 1) and sr >= max(c, 1)) or ((sr == 1 or r == 1) and sc >= max(r, 1))


_MANY = 256  # a batch of this many matrices or more: MKL's batched GEMM, fast only into a contiguous output


def _mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``a @ b`` written into ``out`` (2-D, or a batch with matching or broadcast (stride 0) batches); ``out`` has a
    unit stride in each matrix. A column-major ``out`` is computed as ``(b^T a^T)`` into its row-major transpose;
    many small products with ``out`` in another order go through a contiguous buffer (ATen's batched GEMM writes
    those slice by slice, measured 2x slower than the GEMM plus one copy)."""
    if out.ndim == 2:
        if out.stride(1) != 1 and out.stride(0) == 1:
            torch.mm(b.mT, a.mT, out=out.mT)
        else:
            torch.mm(a, b, out=out)
        return out
    if out.is_contiguous():
        torch.bmm(a, b, out=out)
    elif out.mT.is_contiguous():
        torch.bmm(b.mT, a.mT, out=out.mT)
    elif out.shape[0] >= _MANY:
        out.copy_(torch.bmm(a, b, out=a.new_empty(out.shape)))
    else:
        torch.bmm(a, b, out=out)
    return out


def _product(
    a: torch.Tensor, b: torch.Tensor, into: tuple[tuple[int, ...], tuple[int, ...]], ea: int, eb: int
) -> torch.Tensor:
    """``a @ b`` into a new buffer of the memory order ``into``; ``ea``/``eb`` > 0: that operand is one matrix
    ``(1, rows, cols)`` broadcast to ``ea``/``eb`` matrices."""
    if ea:
        a = a.expand(ea, *a.shape[1:])
    if eb:
        b = b.expand(eb, *b.shape[1:])
    shape, perm = into
    return _mm_into(a, b, a.new_empty(shape).permute(perm))


def _sum_of_products(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``sum_z p[z] @ q[z]`` as ``(1, m, k)``: one GEMM with the batch folded into the contraction when both fold
    as views (``p`` as ``(m, z j)``, ``q`` as ``(z j, k)``), else a batched GEMM and a sum over the batch."""
    nb, m, j = p.shape
    k = q.shape[2]
    try:
        pf = p.transpose(0, 1).view(m, nb * j)
        qf = q.view(nb * j, k)
    except RuntimeError:
        pf = qf = None
    if pf is not None and qf is not None and 1 in pf.stride() and 1 in qf.stride():
        return torch.mm(pf, qf).unsqueeze(0)
    return torch.bmm(p, q, out=p.new_empty(nb, m, k)).sum(0, keepdim=True)


def _blas_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` (a matrix or a batch of them) as BLAS reads it without a copy: itself when it is, else copied into the
    nearest memory order that is (the batch moved from innermost to just above the innermost dim: a copy of small
    transposes that stays in cache, where ``.contiguous()`` could move the batch from innermost to outermost,
    measured 15x slower)."""
    if t.ndim == 2:
        return t if 1 in t.stride() else t.contiguous()
    if _blas_ok(t):
        return t
    order = sorted(range(3), key=lambda d: t.stride(d), reverse=True)  # memory order, outermost first
    if order[-1] == 0 and t.shape[0] > 1:
        order = [*order[:-2], 0, order[-2]]
        buf = t.new_empty([t.shape[d] for d in order]).permute([order.index(d) for d in range(3)])
        if _blas_ok(buf):
            return buf.copy_(t)
    return t.contiguous()


def _grad_buffer(t: torch.Tensor, wide: bool) -> torch.Tensor:
    """An empty tensor laid out as ``t`` (when ``t`` is dense; contiguous otherwise): a gradient written there flows
    back through the views ``t`` was read by without a copy. ``wide``: a factor's matrix is written wide in memory
    (fewer rows than columns), the orientation MKL's GEMM writes faster (measured 5-25% on (1024 x 4096) ·
    (4096 x 64)); its gradient then costs one small transposing copy when it is accumulated."""
    if wide and t.ndim == 2:
        rows, cols = t.shape
        if t.stride(1) == 1 and rows > cols:
            return t.new_empty(cols, rows).mT
        if t.stride(0) == 1 and t.stride(1) != 1 and cols > rows:
            return t.new_empty(rows, cols)
    return torch.empty_like(t, memory_format=torch.preserve_format)


class _Gemm(torch.autograd.Function):
    """``a @ b`` (2-D or batched, an operand possibly broadcast) written into a buffer of a chosen memory order.

    Backward: each operand's gradient is one GEMM written directly in that operand's layout (so that it flows back
    through its views and into the step that produced it without a copy); a broadcast operand's gradient is the sum
    over the batch, folded into the GEMM's contraction where the layouts allow. Under ``create_graph`` the backward
    is made of differentiable torch ops instead (double backward)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        a: torch.Tensor,
        b: torch.Tensor,
        into: tuple[tuple[int, ...], tuple[int, ...]],
        ea: int,
        eb: int,
        wide: tuple[bool, bool],
        va: _View | None = None,
        vb: _View | None = None,
    ) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        ctx.spec = (ea, eb, wide, va, vb)
        ra = a if va is None else _as_view(a, va)
        rb = b if vb is None else _as_view(b, vb)
        return _product(ra, rb, into, ea, eb)  # type: ignore[arg-type]

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        sa, sb = ctx.saved_tensors
        ea, eb, wide, va, vb = ctx.spec
        need_a, need_b = ctx.needs_input_grad[:2]
        a = sa if va is None else sa.permute(va[0]).reshape(va[1])
        b = sb if vb is None else sb.permute(vb[0]).reshape(vb[1])
        A = a.expand(ea, *a.shape[1:]) if ea else a
        B = b.expand(eb, *b.shape[1:]) if eb else b
        ga = gb = None
        if torch.is_grad_enabled():  # double backward: the same products as differentiable ops
            if need_a:
                ga = torch.matmul(g, B.mT)
                ga = ga.sum(0, keepdim=True) if ea else ga
                ga = ga if va is None else _back_to(ga, sa, va)
            if need_b:
                gb = torch.matmul(A.mT, g)
                gb = gb.sum(0, keepdim=True) if eb else gb
                gb = gb if vb is None else _back_to(gb, sb, vb)
            return ga, gb, None, None, None, None, None, None
        g = _blas_layout(g)
        if need_a:
            ga = _gradient(g, B.mT, sa, a, ea, wide[0], va)
        if need_b:
            gb = _gradient(A.mT, g, sb, b, eb, wide[1], vb)
        return ga, gb, None, None, None, None, None, None


def _gradient(
    p: torch.Tensor,
    q: torch.Tensor,
    src: torch.Tensor,
    read: torch.Tensor,
    expanded: int,
    wide: bool,
    view: _View | None,
) -> torch.Tensor:
    """The gradient ``p @ q`` of one operand: written into a buffer laid out as its source tensor, through the same
    view the forward read (a whole tensor comes back); a broadcast operand's is summed over the batch."""
    if expanded:
        g = _sum_of_products(p, q)
        return g if view is None else _back_to(g, src, view)
    if view is None:
        return _mm_into(p, q, _grad_buffer(read, wide))
    buf = _grad_buffer(src, wide)
    out = _as_view(buf, view)
    if out is None or (out.ndim == 3 and not _blas_ok(out)):
        return _back_to(_mm_into(p, q, _grad_buffer(read, wide)), src, view)
    _mm_into(p, q, out)
    return buf


# -- compiling a path ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layout:
    """A live tensor during planning: its dims (labels, in the order the tensor has them) and its memory order
    (labels from outermost to innermost; the tensor is assumed dense in that order)."""

    dims: tuple[str, ...]
    memory: tuple[str, ...]


def compile_program(equation: str, shapes: list[tuple[int, ...]], path: list[tuple[int, ...]]) -> Program | None:
    """The program for ``equation`` (operand 0 the input) along ``path`` (opt_einsum's format), or None when the
    engine does not take the network (then the einsum runs)."""
    lhs, out = equation.split("->")
    terms = lhs.split(",")
    if len(terms) < 2 or any(len(set(t)) != len(t) for t in [*terms, out]):
        return None
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, shapes):
        sizes.update(zip(term, (int(s) for s in shape)))
    start = tuple(_Layout(tuple(t), tuple(t)) for t in terms)
    beam: list[tuple[float, float, tuple[_Layout, ...], tuple[Any, ...]]] = [(0.0, 0.0, start, ())]
    for step in path:
        grown: dict[tuple[_Layout, ...], tuple[float, float, tuple[_Layout, ...], tuple[Any, ...]]] = {}
        for cost, real, live, steps in beam:
            for extra, copied, st, layout in _options(live, step, out, sizes):
                rest = tuple(t for k, t in enumerate(live) if k not in step) + (layout,)
                total = cost + extra
                key = rest
                if key not in grown or grown[key][0] > total:
                    grown[key] = (total, real + copied, rest, (*steps, st))
        beam = sorted(grown.values(), key=lambda e: e[0])[:_BEAM]
    best = None
    for cost, real, live, steps in beam:
        if len(live) != 1 or set(live[0].dims) != set(out):
            return None
        y = live[0]
        kept = [c for c in y.memory if sizes[c] > 1]
        want = [c for c in out if sizes[c] > 1]
        last = 0.0 if kept == want else _moved(kept, want, sizes, out[0])
        final = cost + last
        if best is None or final < best[0]:
            perm = tuple(y.dims.index(c) for c in out)
            best = (final, real + last, steps, None if perm == tuple(range(len(perm))) else perm)
    if best is None:
        return None
    _, copies, steps, perm = best
    return Program(steps, perm, int(copies))


def _options(
    live: tuple[_Layout, ...], step: tuple[int, ...], out: str, sizes: dict[str, int]
) -> list[tuple[float, float, _Step | _SumStep | _MulStep, _Layout]]:
    """Every way the engine can run one step of the path: (elements copied, step, result layout)."""
    others = [t for k, t in enumerate(live) if k not in step]
    kept = set(out).union(*(t.dims for t in others))
    if len(step) == 1:  # a step summing the labels only this operand has
        (i,) = step
        t = live[i]
        summed = tuple(k for k, c in enumerate(t.dims) if c not in kept)
        dims = tuple(c for c in t.dims if c in kept)
        return [(float(_numel(dims, sizes)),) * 2 + (_SumStep(i, summed), _Layout(dims, dims))]
    i, j = sorted(step)
    A, B = live[i], live[j]
    own_a = tuple(k for k, c in enumerate(A.dims) if c not in B.dims and c not in kept and sizes[c] > 1)
    own_b = tuple(k for k, c in enumerate(B.dims) if c not in A.dims and c not in kept and sizes[c] > 1)
    pre = float(_numel(A.dims, sizes) if own_a else 0) + float(_numel(B.dims, sizes) if own_b else 0)
    if own_a:  # summed first: the operand is then its remaining dims, dense
        rest = tuple(c for k, c in enumerate(A.dims) if k not in own_a)
        A = _Layout(rest, rest)
    if own_b:
        rest = tuple(c for k, c in enumerate(B.dims) if k not in own_b)
        B = _Layout(rest, rest)
    sa, sb = set(A.dims), set(B.dims)
    batch = [c for c in A.memory if c in sb and c in kept]
    contracted = [c for c in A.memory if c in sb and c not in kept]
    rows = [c for c in A.memory if c not in sb and c in kept]
    cols = [c for c in B.memory if c not in sa and c in kept]
    ones_a = [c for c in A.dims if c not in sb and c not in kept]  # size-1 labels only A has: dropped by reshape
    ones_b = [c for c in B.dims if c not in sa and c not in kept]
    # batch over the shared labels; or, when there are none, over a leading run of one operand's own labels (the
    # other operand broadcast)
    groupings: list[tuple[list[str], list[str], list[str], int]] = [
        (bo, rows, cols, 0) for bo in _orders(batch, A.memory, B.memory)
    ]
    if not batch:
        for side, mem, own in ((1, A.memory, rows), (2, B.memory, cols)):
            run: list[str] = []
            for c in mem:
                if c not in own:
                    break
                run.append(c)
                rest_own = [x for x in own if x not in run]
                if sizes[c] > 1 and rest_own:
                    groupings.append(
                        (list(run), rest_own if side == 1 else rows, cols if side == 1 else rest_own, side)
                    )
    found: list[tuple[float, float, _Step | _SumStep | _MulStep, _Layout]] = []
    if not contracted and not own_a and not own_b and not ones_a and not ones_b and (not rows or not cols):
        # nothing summed and one operand's labels within the other's (a diagonal, a scale per block): a broadcast
        # elementwise product, in the layout of the larger operand
        big, small, flip = (A, B, False) if not cols else (B, A, True)
        dims = big.dims
        perm = tuple(small.dims.index(c) for c in dims if c in small.dims)
        shape = tuple(sizes[c] if c in small.dims else 1 for c in dims)
        mul = _MulStep(i, j, flip, None if perm == tuple(range(len(perm))) else perm, shape)
        found.append((0.0, 0.0, mul, _Layout(dims, big.memory)))
        return found
    for bo, ro, co, side in groupings:
        for ko in _orders(contracted, A.memory, B.memory):
            nb = _numel(bo, sizes)
            m, k, n = _numel(ro, sizes), _numel(ko, sizes), _numel(co, sizes)
            a_groups = ([] if side == 2 else bo, ro, ko)
            b_groups = ([] if side == 1 else bo, ko, co)
            copies = pre + _copy_cost(A, a_groups, sizes, out[0]) + _copy_cost(B, b_groups, sizes, out[0])
            dims = (*bo, *ro, *co)
            groups = {"b": bo, "m": ro, "n": co}
            reads = (
                _reader(i, A, own_a, a_groups, ones_a, m, k, nb, side == 2, out[0]),
                _reader(j, B, own_b, b_groups, ones_b, k, n, nb, side == 1, out[0]),
            )
            for order in _out_orders(nb > 1):
                memory = tuple(c for g in order for c in groups[g])
                st = _make_step(reads, B, b_groups, ones_b, (nb, m, k, n), order, tuple(sizes[c] for c in dims))
                tie = 0.0 if order[0] == "b" else 0.5  # a batch of matrices each written whole, when as good
                inner = [c for c in memory if sizes[c] > 1][-1:]
                if inner == [out[0]] and any(sizes[c] > 1 for c in (*ro, *co) if c != out[0]):
                    tie += _numel(dims, sizes)  # the batch innermost: GEMMs measured 2.5x slower writing it
                found.append((copies + tie, copies, st, _Layout(dims, memory)))
    return found


def _numel(labels: Any, sizes: dict[str, int]) -> int:
    return math.prod(sizes[c] for c in labels)


def _orders(labels: list[str], mem_a: tuple[str, ...], mem_b: tuple[str, ...]) -> list[list[str]]:
    """Orders of a group both operands hold to try: as either operand holds it in memory."""
    first = [c for c in mem_a if c in labels]
    second = [c for c in mem_b if c in labels]
    return [first] if first == second else [first, second]


def _out_orders(batched: bool) -> list[tuple[str, ...]]:
    """Memory orders of a step's output (outermost first) that keep a unit stride in every matrix."""
    if not batched:
        return [("b", "m", "n"), ("b", "n", "m")]
    return [("b", "m", "n"), ("b", "n", "m"), ("m", "b", "n"), ("n", "b", "m")]


def _copy_cost(t: _Layout, groups: tuple[list[str], ...], sizes: dict[str, int], batch: str) -> float:
    """What reading ``t`` as ``(batch, rows, cols)`` from these label groups copies: 0 for a view that BLAS takes
    (every group consecutive in memory and in order, a unit stride in the matrix), else the weighted size of ``t``
    (see :func:`_moved`)."""
    strides: dict[str, int] = {}
    s = 1
    for c in reversed(t.memory):
        strides[c] = s
        s *= sizes[c]
    order = [c for g in groups for c in g]
    inner = []
    for g in groups:
        g = [c for c in g if sizes[c] > 1]
        for x, y in zip(g, g[1:]):
            if strides[x] != strides[y] * sizes[y]:
                return _moved([c for c in t.memory if sizes[c] > 1], order, sizes, batch)
        inner.append(strides[g[-1]] if g else None)
    matrix = [s for s in inner[1:] if s is not None]
    if matrix and 1 not in matrix:
        return _moved([c for c in t.memory if sizes[c] > 1], order, sizes, batch)
    return 0.0


def _moved(memory: list[str], order: Any, sizes: dict[str, int], batch: str) -> float:
    """The cost of copying a tensor from ``memory`` order into ``order``, in elements weighted by what was measured
    (4096 x 32 x 32 floats, one thread): a copy that keeps the innermost label 1 (2.2 ms), one that moves it 4
    (8.5 ms), one that moves the batch label from innermost 16 (57 ms)."""
    new = [c for c in order if sizes[c] > 1]
    numel = _numel(memory, sizes)
    if not memory or not new or memory[-1] == new[-1]:
        return float(numel)
    return float(numel) * (16.0 if memory[-1] == batch else 4.0)


def _reader(
    index: int,
    t: _Layout,
    own: tuple[int, ...],
    groups: tuple[list[str], ...],
    ones: list[str],
    rows: int,
    cols: int,
    nb: int,
    expanded: bool,
    batch: str,
) -> _Read:
    flat = [c for g in groups for c in g] + ones
    perm = tuple(t.dims.index(c) for c in flat)
    shape: tuple[int, ...] = (rows, cols) if nb == 1 else (1 if expanded else nb, rows, cols)
    perm_ = None if perm == tuple(range(len(perm))) else perm
    return _Read(index, perm_, shape, nb if expanded else 0, own, batch not in t.dims)


def _make_step(
    reads: tuple[_Read, _Read],
    B: _Layout,
    b_groups: tuple[list[str], ...],
    ones_b: list[str],
    dims4: tuple[int, int, int, int],
    order: tuple[str, ...],
    out_shape: tuple[int, ...],
) -> _Step:
    nb, m, k, n = dims4
    ra, rb = reads
    if nb == 1:
        if order == ("b", "m", "n"):
            flat = [*b_groups[2], *b_groups[1], *ones_b]  # b read as (cols, k): F.linear's weight
            perm = tuple(B.dims.index(c) for c in flat)
            if perm == tuple(range(len(perm))) and not rb.sum_dims:
                return _Step(ra, _Read(rb.index, None, (n, k), 0, ()), "linear", None, out_shape)
            return _Step(ra, rb, "mm", ((m, n), (0, 1)), out_shape)
        return _Step(ra, rb, "mm", ((n, m), (1, 0)), out_shape)
    dim_of = {"b": nb, "m": m, "n": n}
    shape = tuple(dim_of[g] for g in order)
    return _Step(ra, rb, "bmm", (shape, tuple(order.index(g) for g in "bmn")), out_shape)
