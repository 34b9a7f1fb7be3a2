"""Execution nodes: what an operator lowers to.

An operator lowers once (its structure is fixed) to a small tree of nodes. Each node maps ``(B, n) -> (B, m)`` and
answers ``cost(batch)`` and ``rank()`` from shapes alone:

- :class:`NetNode` — one tensor network, run as one einsum with a path planned once per batch size;
- :class:`SumNode` — a sum of nodes, each reading a slice of the input and adding into a slice of the output
  (a plain sum uses the full slices; a block-diagonal uses disjoint ones);
- :class:`ChainNode` — a product that could not fuse into one network: apply right to left;
- :class:`KronNode` — a Kronecker product of nodes that are not all single networks;
- :class:`GatherNode` — a general permutation of the coordinates.

The combinators build nodes through :func:`compose`, :func:`add`, :func:`kron` and :func:`block_diag`, which fuse
networks wherever the design allows (products whose mode splits refine, Kroneckers of networks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import opt_einsum as oe
import torch
import torch.nn.functional as F  # noqa: N812

from . import freeze as _freeze
from .cost import Contraction, Cost, Rank
from .engine import Program, compile_program
from .network import MAX_LABELS, Network, fuse, kron_networks
from .paths import best_path

__all__ = [
    "Node",
    "NetNode",
    "SumNode",
    "ChainNode",
    "KronNode",
    "GatherNode",
    "compose",
    "add",
    "kron",
    "block_diag",
]

_PLAN_CACHE_SIZE = 64
#: Run networks by the compiled GEMM programs of :mod:`structmat.core.engine` (False: the einsum reference).
USE_ENGINE = True
#: Below this many flops (at the planned batch) a program of several steps leaves the work to the einsum: its Python
#: steps cost ~5-10 µs each, more than the copies they save on such small tensors (measured on 2 cores: a low-rank
#: 64/8/64 at batch 8, 16 kflop, 24 µs against 19 µs for the einsum, 107 against 90 with its backward; BTT(256, 256)
#: at batch 8, 262 kflop, 91 against 54; from ~1 Mflop on the two tie, and above the engine wins up to 2x). A program
#: of one step (a single GEMM) always runs.
ENGINE_MIN_FLOPS = 1 << 19
_einsum = torch.ops.aten.einsum.default  # the op behind torch.einsum; it takes a path, and torch.compile traces it


class Node:
    """Base of the execution nodes (internal; not part of the public API).

    ``apply`` takes ``x`` of shape ``(B, n)`` (one input for all heads) or ``(B, H, n)`` (one per head) and returns
    ``(B, m)``, or ``(B, H, m)`` when the input or the node is a stack of heads. ``cost(batch, h)`` mirrors it:
    ``h`` is the number of heads of the input (0 for ``(B, n)``).
    """

    m: int
    n: int
    heads: int | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # abstract

    def cost(self, batch: int, h: int = 0) -> Cost:
        raise NotImplementedError  # abstract

    def rank(self) -> Rank:
        raise NotImplementedError  # abstract

    def transpose(self) -> Node:
        raise NotImplementedError  # abstract

    def scaled(self, c: float) -> Node:
        raise NotImplementedError  # abstract

    def networks(self) -> list[Network]:
        raise NotImplementedError  # abstract

    def out_heads(self, h: int) -> int:
        """Heads of the output for an input with ``h`` heads (0: none)."""
        return h or (self.heads or 0)


def _common_heads(nodes: list[Node]) -> int | None:
    stacked = {nd.heads for nd in nodes if nd.heads is not None}
    if len(stacked) > 1:
        raise ValueError(f"stacks of {sorted(stacked)} heads cannot be combined")
    return stacked.pop() if stacked else None


def _combine(shape: tuple[int, int], batch: int, parts: list[Cost], flops: int = 0, inter: int = 0) -> Cost:
    return Cost(
        shape=shape,
        batch=batch,
        flops=sum(p.flops for p in parts) + flops,
        macs=sum(p.macs for p in parts),
        largest_intermediate=max([inter, *(p.largest_intermediate for p in parts)]),
        contractions=tuple(c for p in parts for c in p.contractions),
    )


@dataclass
class _Plan:
    equation: str
    path: list[int] | None  # flattened pairs for torch's einsum
    contraction: Contraction
    expression: Any = None  # opt_einsum's compiled contraction, for paths torch's einsum does not take
    scale_at: int = -1  # the operand multiplied by the network's scale (a factor, k >= 1), or -1: the output
    program: Program | None = None  # the same path as GEMMs on views (see _exec), None: the einsum runs
    chain: tuple[tuple[int, bool], ...] | None = None  # a chain of matrices run as F.linear calls (see _linear_chain)


class NetNode(Node):
    """One tensor network, contracted by one einsum along a path planned once per batch size."""

    parts: tuple[int, ...] = ()  # a fused product: factors of each network, in factor order (see _paths.best_path)
    frozen: bool = False  # marked by LinearOperator.freeze(): constant-aware execution in every mode (see _freeze)

    def __init__(self, network: Network) -> None:
        count = len(network.labels())
        if count > MAX_LABELS:
            raise ValueError(
                f"its tensor network has {count} labels; one einsum takes at most {MAX_LABELS} (besides the batch)"
            )
        self.network = network
        self.m, self.n = network.m, network.n
        self.heads = network.head[1] if network.head is not None else None
        self._in_shape = tuple(s for _, s in network.in_modes)
        self._plans: dict[tuple[int, bool], _Plan] = {}

    def networks(self) -> list[Network]:
        return [self.network]

    def _plan(self, batch: int, per_head: bool) -> _Plan:
        key = (batch, per_head)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _PLAN_CACHE_SIZE:
                self._plans.pop(next(iter(self._plans)))
            plan = self._plans[key] = self._make_plan(batch, per_head)
        return plan

    def _make_plan(self, batch: int, per_head: bool) -> _Plan:
        eq, fshapes, _ = self.network.equation(per_head)
        xshape = (batch, self.heads, *self._in_shape) if per_head else (batch, *self._in_shape)
        shapes = [xshape, *fshapes]
        out_size = batch * (self.heads or 1) * self.m
        lhs, rhs = eq.split("->")
        scale_at, scale_flops = _scale_choice(self.network.scale, fshapes, out_size)
        if len(shapes) == 1:  # no factor: a relabelling (permutation), plus sums over dropped labels
            summed = set(lhs) - set(rhs)
            flops = (math.prod(xshape) if summed else 0) + scale_flops
            return _Plan(eq, None, Contraction(eq, tuple(shapes), ((0,),), flops, scale_flops, out_size))
        path, info = best_path(eq, shapes, self.parts)
        size = dict(info.size_dict)
        macs = 0
        for step in info.contraction_list:
            inds, einsum_str = step[0], step[2]
            letters = set(einsum_str.split("->")[0].replace(",", ""))
            macs += math.prod(size[c] for c in letters) * max(1, len(inds) - 1)
        contraction = Contraction(
            eq,
            tuple(tuple(s) for s in shapes),
            tuple(tuple(p) for p in path),
            int(info.opt_cost) + scale_flops,
            macs + scale_flops,  # one multiply per element scaled
            int(info.largest_intermediate),
        )
        program = compile_program(eq, [tuple(s) for s in shapes], [tuple(step) for step in path])
        chain = None
        if self.heads is None and not per_head and len(self._in_shape) == 1:
            chain = _linear_chain(eq, shapes, contraction.flops - scale_flops)
        if len(shapes) > 2 and all(len(step) == 2 for step in path):
            return _Plan(
                eq, [i for pair in path for i in pair], contraction, scale_at=scale_at, program=program, chain=chain
            )
        if len(shapes) > 2:  # a path with single-operand steps (sums over a label only one operand has)
            expression = oe.contract_expression(eq, *shapes, optimize=path)
            return _Plan(eq, None, contraction, expression, scale_at, program)
        return _Plan(eq, None, contraction, scale_at=scale_at, program=program, chain=chain)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        compiling = torch.compiler.is_compiling()  # first: dynamo cannot trace is_inference_mode_enabled
        if not compiling and (self.frozen or torch.is_inference_mode_enabled()):
            y = _freeze.try_frozen(self, x)  # None: the ordinary plan is cheaper, or gradients are needed
            if y is not None:
                return y
        batch = x.shape[0]
        plan = None
        # the common case of a dense matrix or a chain of them: F.linear calls, nothing else (never while tracing:
        # the batch may be symbolic, and looking it up would specialize the graph to it)
        if x.ndim == 2 and USE_ENGINE and not compiling:
            plan = self._plan(batch, False)
            if plan.chain is not None:
                factors = self.network.factors
                scale = self.network.scale
                for k, transposed in plan.chain:
                    w = factors[k - 1].fetch()
                    if w.dtype != x.dtype:  # only under autocast (the operator checks dtypes otherwise)
                        w = w.to(x.dtype)
                    if scale != 1.0 and k == plan.scale_at:
                        w = w * scale
                    x = F.linear(x, w.mT if transposed else w)
                return x * scale if scale != 1.0 and plan.scale_at < 0 else x
        if x.ndim == 3 and self.heads is None:  # one operator for every head: fold the heads into the batch
            return self.apply(x.reshape(-1, self.n)).reshape(batch, x.shape[1], self.m)
        per_head = x.ndim == 3
        if plan is None:
            plan, scale = _plan_of(self, batch, per_head)
        else:  # looked up above (not tracing, (B, n) input): the same plan
            scale = self.network.scale
        operands = [x if len(self._in_shape) == 1 else x.reshape(*x.shape[:-1], *self._in_shape)]
        for fa in self.network.factors:
            t = fa.fetch()
            if t.dtype != x.dtype:  # only reachable under autocast: the operator checks dtypes otherwise
                t = t.to(x.dtype)
            operands.append(t)
        if scale != 1.0 and plan.scale_at > 0:
            operands[plan.scale_at] = operands[plan.scale_at] * scale
        program = plan.program
        if (
            program is not None
            and USE_ENGINE
            and (len(program.steps) == 1 or plan.contraction.flops >= ENGINE_MIN_FLOPS)
        ):
            shape = (batch, self.heads, self.m) if self.heads is not None else (batch, self.m)
            y = program.run(operands, shape)
            return y * scale if scale != 1.0 and plan.scale_at < 0 else y
        if plan.path is not None:
            y = _einsum(plan.equation, operands, path=plan.path)
        elif plan.expression is not None:
            y = plan.expression(*operands, backend="torch")
        else:  # one or two operands: nothing to order
            y = _einsum(plan.equation, operands)
        if scale != 1.0 and plan.scale_at < 0:
            y = y * scale
        if y.ndim != 2 + (self.heads is not None):  # not yet (B, [H,] m)
            y = y.reshape(batch, self.heads, self.m) if self.heads is not None else y.reshape(batch, self.m)
        return y.contiguous()  # einsum may leave the batch innermost; the next layer would pay the copy

    def cost(self, batch: int, h: int = 0) -> Cost:
        if self.frozen:
            return _freeze.frozen_cost(self, batch, h)
        if h and self.heads is None:
            c = self._plan(batch * h, False).contraction
        else:
            c = self._plan(batch, bool(h)).contraction
        return Cost((self.m, self.n), batch, c.flops, c.macs, c.largest_intermediate, (c,))

    def rank(self) -> Rank:
        bound, exact = self.network.rank_bound()
        return Rank(bound, exact)

    def transpose(self) -> Node:
        return _with_parts(NetNode(self.network.transpose()), self.parts)

    def scaled(self, c: float) -> Node:
        return _with_parts(NetNode(self.network.scaled(c)), self.parts)


def _linear_chain(equation: str, shapes: list[tuple[int, ...]], flops: int) -> tuple[tuple[int, bool], ...] | None:
    """``(operand, transposed)`` in the order a chain of matrices applies to ``x`` (``x`` first), when the network
    is one (``x`` with one mode, every factor a matrix joined to the next by one label) and that order costs no
    more than the planned path's ``flops``: it then runs as F.linear calls, the way one writes it by hand (one
    C++ call per matrix; the einsum costs ~10 µs of dispatch more at small sizes). Else None."""
    lhs, rhs = equation.split("->")
    ops = lhs.split(",")
    if len(ops[0]) != 2 or len(rhs) != 2 or rhs[0] != ops[0][0] or any(len(o) != 2 for o in ops[1:]):
        return None
    cur, rows = ops[0][1], shapes[0][0]
    left, order, cost = set(range(1, len(ops))), [], 0
    while left:
        hits = [k for k in left if cur in ops[k]]
        if len(hits) != 1 or ops[hits[0]][0] == ops[hits[0]][1]:
            return None
        k = hits[0]
        transposed = ops[k][0] == cur  # stored (in, out); F.linear takes (out, in)
        cur = ops[k][0] if not transposed else ops[k][1]
        cost += 2 * rows * shapes[k][0] * shapes[k][1]
        order.append((k, transposed))
        left.remove(k)
    if cur != rhs[1] or cost > flops:
        return None
    return tuple(order)


_COMPILE_BATCH = 1024  # the batch a traced plan is made for (see _plan_of)


def _scale_choice(scale: float, factor_shapes: list[tuple[int, ...]], out_size: int) -> tuple[int, int]:
    """Where a network's scale is applied, and its multiplies: the smallest factor (operand ``k + 1``) when it has
    fewer elements than the output at this batch, else the output (-1)."""
    if scale == 1.0:
        return -1, 0
    sizes = [math.prod(s) for s in factor_shapes]
    k = min(range(len(sizes)), key=sizes.__getitem__, default=-1)
    if k >= 0 and sizes[k] < out_size:
        return k + 1, sizes[k]
    return -1, out_size


def _plan_of(node: NetNode, batch: int, per_head: bool) -> tuple[_Plan, float]:
    """The cached plan for ``batch`` rows (planned on first use), and the network's scale.

    Under torch.compile the batch may be symbolic (``dynamic=None`` after a second shape, or ``dynamic=True``), and
    reading its value would specialize the graph to it. The equation does not depend on the batch and any path is
    valid for every batch (only its optimality does), so a traced plan is made for a fixed representative batch,
    :data:`_COMPILE_BATCH` (large: a path planned too large costs a batch-independent amount at small batches, one
    planned too small costs more with every row), and the batch is never read: one graph serves every batch size.
    The scale comes back from the same constant call: read as an attribute, dynamo would make the float an input
    of the graph and restart the analysis to specialize it.
    """
    if torch.compiler.is_compiling():
        equation, path, scale = _traced_plan(node, _COMPILE_BATCH, per_head)
        return _Plan(equation, list(path) if path is not None else None, None), scale  # type: ignore[arg-type]
    return node._plan(batch, per_head), node.network.scale


def _traced_plan(node: NetNode, batch: int, per_head: bool) -> tuple[str, Any, float]:
    """The equation, flat path and scale, as plain constants that torch.compile can bake into the graph (every
    argument is a constant: ``batch`` is :data:`_COMPILE_BATCH`, never the traced input's). The node's own cached
    plan, so it is planned once for all compilations."""
    plan = node._plan(batch, per_head)
    return plan.equation, tuple(plan.path) if plan.path is not None else None, node.network.scale


def _traced_scale(node: GatherNode) -> float:
    """A gather's scale as a constant of the traced graph (see :func:`_plan_of`)."""
    return node.scale


# what torch._dynamo.assume_constant_result does, without importing torch._dynamo (~0.8 s) with structmat
_traced_plan._dynamo_marked_constant = True  # type: ignore[attr-defined]
_traced_scale._dynamo_marked_constant = True  # type: ignore[attr-defined]


Slice = tuple[int, int]


def _disjoint(slices: tuple[Slice, ...]) -> bool:
    ordered = sorted(slices)
    return all(a[1] <= b[0] for a, b in zip(ordered, ordered[1:]))


def _with_heads(y: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, m) -> (B, heads, m)`` by broadcasting; a ``(B, H, m)`` passes through."""
    return y if y.ndim == 3 else y.unsqueeze(1).expand(y.shape[0], heads, y.shape[1])


class SumNode(Node):
    """``y[out_k] += child_k(x[in_k])`` for every child: a sum (full slices) or a block-diagonal (disjoint)."""

    def __init__(
        self,
        children: list[Node],
        m: int,
        n: int,
        in_slices: list[Slice] | None = None,
        out_slices: list[Slice] | None = None,
    ) -> None:
        self.children = list(children)
        self.m, self.n = m, n
        self.heads = _common_heads(self.children)
        self.in_slices = tuple(in_slices or [(0, n)] * len(children))
        self.out_slices = tuple(out_slices or [(0, m)] * len(children))
        self.full = all(s == (0, n) for s in self.in_slices) and all(s == (0, m) for s in self.out_slices)
        order = sorted(range(len(children)), key=lambda k: self.out_slices[k])
        tiles = [self.out_slices[k] for k in order]
        self._cat_order = (
            order
            if tiles and tiles[0][0] == 0 and tiles[-1][1] == m and all(a[1] == b[0] for a, b in zip(tiles, tiles[1:]))
            else None
        )

    def networks(self) -> list[Network]:
        return [net for c in self.children for net in c.networks()]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        heads = x.shape[1] if x.ndim == 3 else self.heads
        if self.full:
            outs = [c.apply(x) for c in self.children]
        else:
            outs = [
                c.apply(x[..., a:b] if (a, b) != (0, self.n) else x) for c, (a, b) in zip(self.children, self.in_slices)
            ]
        if heads is not None and any(o.ndim == 2 for o in outs):
            outs = [_with_heads(o, heads) for o in outs]
        if self.full:
            y = outs[0]
            for out in outs[1:]:
                y = y + out
            return y
        if self._cat_order is not None:
            return torch.cat([outs[k] for k in self._cat_order], dim=-1)
        y = x.new_zeros(*outs[0].shape[:-1], self.m)
        for out, (a, b) in zip(outs, self.out_slices):
            y[..., a:b] += out
        return y

    def cost(self, batch: int, h: int = 0) -> Cost:
        parts = [c.cost(batch, h) for c in self.children]
        rows = batch * max(1, self.out_heads(h))
        adds = (sum(b - a for a, b in self.out_slices) - _union_size(self.out_slices)) * rows
        return _combine((self.m, self.n), batch, parts, adds, rows * self.m)

    def rank(self) -> Rank:
        ranks = [c.rank() for c in self.children]
        if len(ranks) == 1:
            return ranks[0]
        total = sum(r.bound for r in ranks)
        if total == 0:  # every term is zero for every value
            return Rank(0, True)
        if _disjoint(self.in_slices) and _disjoint(self.out_slices):  # block-diagonal: the ranks add
            return Rank(total, all(r.exact for r in ranks))
        return Rank(min(total, self.m, self.n), False)

    def transpose(self) -> Node:
        return SumNode(
            [c.transpose() for c in self.children], self.n, self.m, list(self.out_slices), list(self.in_slices)
        )

    def scaled(self, c: float) -> Node:
        return SumNode(
            [ch.scaled(c) for ch in self.children], self.m, self.n, list(self.in_slices), list(self.out_slices)
        )


def _union_size(slices: tuple[Slice, ...]) -> int:
    total, end = 0, -1
    for a, b in sorted(slices):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


class ChainNode(Node):
    """A product that does not fuse into one network: ``children[0] @ ... @ children[-1]``, applied right to left."""

    def __init__(self, children: list[Node]) -> None:
        self.children = list(children)
        self.m, self.n = children[0].m, children[-1].n
        self.heads = _common_heads(self.children)

    def networks(self) -> list[Network]:
        return [net for c in self.children for net in c.networks()]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        for c in reversed(self.children):
            x = c.apply(x)
        return x

    def cost(self, batch: int, h: int = 0) -> Cost:
        parts = []
        inter = 0
        for c in reversed(self.children):
            parts.append(c.cost(batch, h))
            h = c.out_heads(h)
            inter = max(inter, batch * max(1, h) * c.m)
        return _combine((self.m, self.n), batch, parts, 0, inter)

    def rank(self) -> Rank:
        """At most the smallest rank; exactly the rank of one child when every child left of it is injective and
        every child right of it surjective (generically: exact, of full column or row rank)."""
        ranks = [c.rank() for c in self.children]
        bound = min(r.bound for r in ranks)
        if bound == 0:
            return Rank(0, True)
        injective = [r.exact and r.bound == c.n for r, c in zip(ranks, self.children)]
        surjective = [r.exact and r.bound == c.m for r, c in zip(ranks, self.children)]
        for j, r in enumerate(ranks):
            if all(injective[:j]) and all(surjective[j + 1 :]):
                return Rank(bound, r.exact)
        return Rank(bound, False)

    def transpose(self) -> Node:
        return ChainNode([c.transpose() for c in reversed(self.children)])

    def scaled(self, c: float) -> Node:
        return ChainNode([*self.children[:-1], self.children[-1].scaled(c)])


class KronNode(Node):
    """``children[0] ⊗ children[1] ⊗ ...``, applied one factor at a time, the last one first.

    Used only when the parts are not all single networks (those fuse into one network, stacks included); its
    parts are then single operators, not stacks.
    """

    def __init__(self, children: list[Node]) -> None:
        if _common_heads(children) is not None:
            raise ValueError(
                "Kronecker: a stack of heads can be combined by kron only with single networks; "
                "kron each head's operators instead"
            )
        self.children = list(children)
        self.m = math.prod(c.m for c in children)
        self.n = math.prod(c.n for c in children)
        self._order = []  # (left, part, right), the last part first: structure, so computed once
        for k in reversed(range(len(self.children))):
            left = math.prod(c.n for c in self.children[:k])
            right = math.prod(c.m for c in self.children[k + 1 :])
            self._order.append((left, self.children[k], right))

    def networks(self) -> list[Network]:
        return [net for c in self.children for net in c.networks()]

    def _steps(self) -> list[tuple[int, Node, int]]:
        return self._order

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = math.prod(lead)
        for left, child, right in self._steps():
            if right == 1:
                x = child.apply(x.reshape(rows * left, child.n)).reshape(rows, -1)
                continue
            x = x.reshape(rows, left, child.n, right).transpose(2, 3).reshape(-1, child.n)
            x = child.apply(x).reshape(rows, left, right, child.m).transpose(2, 3).reshape(rows, -1)
        return x.reshape(*lead, self.m)

    def cost(self, batch: int, h: int = 0) -> Cost:
        rows = batch * max(1, h)
        parts = [child.cost(rows * left * right) for left, child, right in self._steps()]
        inter = max(rows * left * child.m * right for left, child, right in self._steps())
        return _combine((self.m, self.n), batch, parts, 0, inter)

    def rank(self) -> Rank:
        ranks = [c.rank() for c in self.children]
        bound = math.prod(r.bound for r in ranks)  # rank(A ⊗ B) = rank A · rank B
        return Rank(bound, bound == 0 or all(r.exact for r in ranks))

    def transpose(self) -> Node:
        return KronNode([c.transpose() for c in self.children])

    def scaled(self, c: float) -> Node:
        return KronNode([self.children[0].scaled(c), *self.children[1:]])


class GatherNode(Node):
    """``y[..., k] = scale * x[..., perm[k]]``: a general permutation (no flops unless scaled)."""

    def __init__(self, perm: tuple[int, ...], scale: float = 1.0) -> None:
        self.perm = perm
        self.scale = scale
        self.m = self.n = len(perm)
        self._index: dict[torch.device, torch.Tensor] = {}

    def networks(self) -> list[Network]:
        return []

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # constants of the graph: filling the cache would guard on it
            idx = torch.tensor(self.perm, dtype=torch.long, device=x.device)
            scale = _traced_scale(self)
        else:
            idx = self._index.get(x.device)
            if idx is None:
                idx = self._index[x.device] = torch.tensor(self.perm, dtype=torch.long, device=x.device)
            scale = self.scale
        y = x.index_select(-1, idx)
        return y * scale if scale != 1.0 else y

    def cost(self, batch: int, h: int = 0) -> Cost:
        rows = batch * max(1, h)
        flops = rows * self.n if self.scale != 1.0 else 0
        return Cost((self.m, self.n), batch, flops, flops, rows * self.n, ())

    def rank(self) -> Rank:
        return Rank(0 if self.scale == 0 else self.n, True)

    def transpose(self) -> Node:
        inv = [0] * self.n
        for k, p in enumerate(self.perm):
            inv[p] = k
        return GatherNode(tuple(inv), self.scale)

    def scaled(self, c: float) -> Node:
        return GatherNode(self.perm, self.scale * c)


# -- builders used by the combinators ---------------------------------------------------------------------------------
def compose(nodes: list[Node]) -> Node:
    """``nodes[0] @ nodes[1] @ ...``: flatten chains and fuse neighbouring networks whose mode splits refine."""
    flat: list[Node] = []
    for node in nodes:
        flat.extend(node.children if isinstance(node, ChainNode) else [node])
    out: list[Node] = []
    for node in flat:
        if out and isinstance(out[-1], NetNode) and isinstance(node, NetNode):
            fused = fuse(out[-1].network, node.network)
            if fused is not None and len(fused.labels()) <= MAX_LABELS:  # else: chain
                # the parts are kept so that its path is never worse than applying them one at a time
                out[-1] = _with_parts(NetNode(fused), _parts_of(out[-1]) + _parts_of(node))
                continue
        out.append(node)
    return out[0] if len(out) == 1 else ChainNode(out)


def _parts_of(node: NetNode) -> tuple[int, ...]:
    return node.parts or (len(node.network.factors),)


def _with_parts(node: NetNode, parts: tuple[int, ...]) -> NetNode:
    node.parts = parts
    return node


def add(nodes: list[Node]) -> Node:
    """``nodes[0] + nodes[1] + ...``; nested plain sums flatten."""
    flat: list[Node] = []
    for node in nodes:
        flat.extend(node.children if isinstance(node, SumNode) and node.full else [node])
    return flat[0] if len(flat) == 1 else SumNode(flat, flat[0].m, flat[0].n)


def kron(nodes: list[Node]) -> Node:
    """``nodes[0] ⊗ nodes[1] ⊗ ...``: one network when every part is one, else a :class:`KronNode`."""
    if all(isinstance(nd, NetNode) for nd in nodes):
        net = kron_networks([nd.network for nd in nodes])  # type: ignore[attr-defined]
        if len(net.labels()) <= MAX_LABELS:
            return NetNode(net)
    flat: list[Node] = []
    for node in nodes:
        flat.extend(node.children if isinstance(node, KronNode) else [node])
    return KronNode(flat)


def stack_blocks(node: Node, keep: int | None = None) -> Node:
    """The block-diagonal matrix whose blocks are the operators of a stack.

    With ``keep=None`` the H heads become H diagonal blocks (block j = head j). With ``keep=K`` (K dividing H) the
    result is a stack of K block-diagonals of ``H / K`` blocks each: head ``k`` holds the stacked operators
    ``k * (H/K) .. (k+1) * (H/K) - 1``.

    A stacked network turns (part of) its head label into a diagonal mode; sums and chains of stacks map over their
    parts (the block-diagonal of a sum is the sum of the block-diagonals, likewise for products); a part that is not
    a stack is the same block everywhere, ``I ⊗ part``.
    """
    heads = node.heads
    if heads is None:
        raise ValueError("stack_blocks: the operator is not a stack of heads")
    keep = keep or 1
    if heads % keep:
        raise ValueError(f"stack_blocks: {keep} heads do not divide a stack of {heads}")
    return _blocks(node, heads // keep, keep if keep > 1 else None)


def _blocks(node: Node, nblocks: int, keep: int | None) -> Node:
    if isinstance(node, NetNode):
        net = node.network
        if net.head is None:
            return NetNode(net.padded(nblocks, 1))
        lab = net.head[0]
        if keep is None:
            block = net.head
            return NetNode(
                Network(net.factors, (block, *net.in_modes), (block, *net.out_modes), net.scale, None, net.vouched)
            )
        nxt = net.max_label() + 1
        net = net.split(lab, (keep, nblocks), (nxt, nxt + 1))
        block = (nxt + 1, nblocks)
        return NetNode(
            Network(net.factors, (block, *net.in_modes), (block, *net.out_modes), net.scale, (nxt, keep), net.vouched)
        )
    if isinstance(node, SumNode) and node.full:
        return SumNode([_blocks(c, nblocks, keep) for c in node.children], node.m * nblocks, node.n * nblocks)
    if isinstance(node, ChainNode):
        return ChainNode([_blocks(c, nblocks, keep) for c in node.children])
    if node.heads is None:
        return KronNode([NetNode(Network((), ((0, nblocks),), ((0, nblocks),))), node])
    raise ValueError(f"stack_blocks: cannot lay out a stacked {type(node).__name__} as blocks")


def block_diag(nodes: list[Node]) -> Node:
    """The block-diagonal of ``nodes``: each block reads and writes its own contiguous slice."""
    if len(nodes) == 1:
        return nodes[0]
    ins, outs = [], []
    i = o = 0
    for nd in nodes:
        ins.append((i, i + nd.n))
        outs.append((o, o + nd.m))
        i += nd.n
        o += nd.m
    return SumNode(list(nodes), o, i, ins, outs)
