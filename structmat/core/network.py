"""The tensor network: the one representation under every operator.

A :class:`Network` maps ``x`` of shape ``(B, n)`` to ``y`` of shape ``(B, m)`` by one einsum. The input dim ``n`` is
split row-major into labelled *input modes*, the output dim ``m`` into *output modes*; *factors* are tensors with one
label per axis. ``y[out] = scale * sum over every other label of (product of factors) * x[in]``.

A label that is both an input and an output mode is a *diagonal* mode (the block label of a block-diagonal matrix).
A *head* label (optional) stacks H independent operators of one structure: it is carried by the stacked factors and
by the output, ``(B, n) -> (B, H, m)``, and by the input too when each head gets its own ``(B, H, n)``.
Labels are small ints, private to one network; :meth:`Network.relabel` moves them apart before two networks meet.

Everything here works on shapes alone: no tensor data is read.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.nn.utils import prune

__all__ = ["Factor", "Network", "fuse", "kron_networks", "refine", "MAX_LABELS"]

MAX_LABELS = 51  # torch's einsum takes the 52 letters a-z, A-Z; one of them is the batch

Mode = tuple[int, int]  # (label, size)


@dataclass(frozen=True, eq=False)
class Factor:
    """One tensor of a network: where to fetch it, its labels and the shape it takes in the network.

    ``owner`` and ``name`` say where the tensor lives (``getattr(owner, name)``), so parameters are looked up at
    apply time and a replaced or moved parameter is always the one used. ``shape`` may refine the stored tensor's
    shape row-major (one axis split into several): the tensor is reshaped, never copied, when it is contiguous.
    """

    owner: torch.nn.Module
    name: str
    labels: tuple[int, ...]
    shape: tuple[int, ...]

    def fetch(self) -> torch.Tensor:
        """The tensor's current value, viewed in the network's shape.

        It is read through the owner (``getattr``), so a parametrization (``torch.nn.utils.parametrize``) computes
        it from the current original. A pruned tensor (``torch.nn.utils.prune``) is recomputed from
        ``<name>_orig`` and ``<name>_mask`` by the pruning method: the attribute ``<name>`` is refreshed only by a
        forward pre-hook, which never runs for an operator applied inside a composition.
        """
        owner = self.owner
        t = None
        if owner._forward_pre_hooks:
            for hook in owner._forward_pre_hooks.values():
                if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == self.name:
                    t = hook.apply_mask(owner)
        if t is None:
            t = getattr(owner, self.name)
        return t if tuple(t.shape) == self.shape else t.reshape(self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def key(self) -> tuple[int, str]:
        return (id(self.owner), self.name)


@dataclass(frozen=True, eq=False)
class Network:
    """A single tensor network: ``y[out_modes] = scale * contract(factors, x[in_modes])``."""

    factors: tuple[Factor, ...]
    in_modes: tuple[Mode, ...]
    out_modes: tuple[Mode, ...]
    scale: float = 1.0
    head: Mode | None = None  # (label, H) of a stack of H operators
    vouched: bool = False  # the family proves its cut bound is the generic rank (kept by relabel/transpose/scale)

    # -- shapes -----------------------------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return math.prod(s for _, s in self.in_modes)

    @property
    def m(self) -> int:
        return math.prod(s for _, s in self.out_modes)

    def sizes(self) -> dict[int, int]:
        """Size of every label (the constructor of each network checks they agree)."""
        out: dict[int, int] = {}
        for f in self.factors:
            out.update(zip(f.labels, f.shape))
        out.update(self.in_modes)
        out.update(self.out_modes)
        if self.head is not None:
            out[self.head[0]] = self.head[1]
        return out

    def labels(self) -> list[int]:
        seen: dict[int, None] = {}
        for lab, _ in self.in_modes:
            seen[lab] = None
        for f in self.factors:
            for lab in f.labels:
                seen[lab] = None
        for lab, _ in self.out_modes:
            seen[lab] = None
        if self.head is not None:
            seen[self.head[0]] = None
        return list(seen)

    def diagonal_labels(self) -> set[int]:
        return {lab for lab, _ in self.in_modes} & {lab for lab, _ in self.out_modes}

    def _per_head(self) -> set[int]:
        """Labels that don't take part in one head's structure: diagonal labels and the head label."""
        return self.diagonal_labels() | ({self.head[0]} if self.head is not None else set())

    # -- rewriting --------------------------------------------------------------------------------------------------
    def relabel(self, mapping: dict[int, int]) -> Network:
        def f(lab: int) -> int:
            return mapping.get(lab, lab)

        return Network(
            factors=tuple(replace(fa, labels=tuple(f(lab) for lab in fa.labels)) for fa in self.factors),
            in_modes=tuple((f(lab), s) for lab, s in self.in_modes),
            out_modes=tuple((f(lab), s) for lab, s in self.out_modes),
            scale=self.scale,
            head=None if self.head is None else (f(self.head[0]), self.head[1]),
            vouched=self.vouched,
        )

    def shifted(self, offset: int) -> Network:
        return self.relabel({lab: lab + offset for lab in self.labels()})

    def max_label(self) -> int:
        return max(self.labels(), default=-1)

    def transpose(self) -> Network:
        return Network(self.factors, self.out_modes, self.in_modes, self.scale, self.head, self.vouched)

    def scaled(self, c: float) -> Network:
        return replace(self, scale=self.scale * c)

    def squeeze(self) -> Network:
        """Drop size-1 modes from the input and output lists (a size-1 label left in a factor is summed, harmlessly)."""
        return replace(
            self,
            in_modes=tuple(md for md in self.in_modes if md[1] != 1),
            out_modes=tuple(md for md in self.out_modes if md[1] != 1),
        )

    def split(self, label: int, parts: tuple[int, ...], new_labels: tuple[int, ...]) -> Network:
        """Split ``label`` row-major into ``new_labels`` of sizes ``parts`` everywhere it appears."""

        def modes(ms: tuple[Mode, ...]) -> tuple[Mode, ...]:
            out: list[Mode] = []
            for lab, s in ms:
                out.extend(zip(new_labels, parts) if lab == label else [(lab, s)])
            return tuple(out)

        factors = []
        for fa in self.factors:
            labs: list[int] = []
            shape: list[int] = []
            for lab, s in zip(fa.labels, fa.shape):
                if lab == label:
                    labs.extend(new_labels)
                    shape.extend(parts)
                else:
                    labs.append(lab)
                    shape.append(s)
            factors.append(replace(fa, labels=tuple(labs), shape=tuple(shape)))
        # the same matrix with modes reshaped: a vouched cut bound stays the rank
        return Network(tuple(factors), modes(self.in_modes), modes(self.out_modes), self.scale, self.head, self.vouched)

    def padded(self, left: int, right: int) -> Network:
        """``I_left ⊗ self ⊗ I_right``: identity factors become diagonal modes (no tensor, no flops)."""
        nxt = self.max_label() + 1
        pre: tuple[Mode, ...] = ((nxt, left),) if left > 1 else ()
        post: tuple[Mode, ...] = ((nxt + 1, right),) if right > 1 else ()
        return Network(self.factors, pre + self.in_modes + post, pre + self.out_modes + post, self.scale, self.head)

    # -- einsum ------------------------------------------------------------------------------------------------------
    def equation(self, per_head: bool = False) -> tuple[str, list[tuple[int, ...]], int]:
        """The einsum equation with the batch as the first label of ``x`` and of the output (then the head label).

        ``per_head``: the input carries the head label too (``(B, H, n)``); only for a stacked network.
        Returns ``(equation, factor shapes, position of x among the operands)``; x is operand 0.
        """
        letters: dict[int, str] = {}
        alphabet = "abcdefghijklmnopqrstuvwxyABCDEFGHIJKLMNOPQRSTUVWXYZ"  # 'z' is the batch
        for lab in self.labels():
            if len(letters) == len(alphabet):
                raise ValueError(
                    f"Network with {len(self.labels())} labels: an einsum takes at most {len(alphabet)} labels"
                )
            letters[lab] = alphabet[len(letters)]
        h = letters[self.head[0]] if self.head is not None else ""
        xs = "z" + (h if per_head else "") + "".join(letters[lab] for lab, _ in self.in_modes)
        fs = ["".join(letters[lab] for lab in fa.labels) for fa in self.factors]
        ys = "z" + h + "".join(letters[lab] for lab, _ in self.out_modes)
        return ",".join([xs, *fs]) + "->" + ys, [fa.shape for fa in self.factors], 0

    # -- rank --------------------------------------------------------------------------------------------------------
    def min_cut(self) -> tuple[int, frozenset[int]]:
        """Smallest product of label sizes whose removal separates the input from the output.

        Diagonal labels are left out (they multiply the rank instead), and so is the head label (the bound is per
        head). Returns ``(product, labels cut)``.
        """
        edges = self._cut_graph()
        sizes = self.sizes()
        prod, cut, _ = _hyper_min_cut(edges, sizes)
        return prod, cut

    def _cut_graph(self) -> dict[int, set[Any]]:
        """Each label (diagonal and head labels aside) with the nodes it joins: factor indices, "S" (the input) and
        "T" (the output)."""
        diag = self._per_head()
        edges: dict[int, set[Any]] = {}
        for k, fa in enumerate(self.factors):
            for lab in fa.labels:
                if lab not in diag:
                    edges.setdefault(lab, set()).add(k)
        for lab, _ in self.in_modes:
            if lab not in diag:
                edges.setdefault(lab, set()).add("S")
        for lab, _ in self.out_modes:
            if lab not in diag:
                edges.setdefault(lab, set()).add("T")
        return edges

    def bilinear_split(self) -> tuple[Network, Network] | None:
        """Split at the minimal cut: ``W = L^T R`` with ``R`` (the input side) and ``L`` (the output side, read from
        the output modes) both mapping to the cut labels (with the diagonal labels kept as block labels).

        ``x_q^T W x_k = <L x_q, R x_k>`` then costs the cut width per pair. Returns ``(R, L)`` as networks whose output
        modes are ``diagonal labels + cut labels`` (in one order for both), or None when there is nothing to split
        (a network without factors). The scale rides on ``R``.
        """
        if not self.factors:
            return None
        edges = self._cut_graph()
        sizes = self.sizes()
        _, cut, source_side = _hyper_min_cut(edges, sizes)
        block = [lab for lab, _ in self.in_modes if lab in self.diagonal_labels()]
        feature = tuple((lab, sizes[lab]) for lab in (*block, *sorted(cut)))
        right = tuple(fa for k, fa in enumerate(self.factors) if k in source_side)
        left = tuple(fa for k, fa in enumerate(self.factors) if k not in source_side)

        def side(factors: tuple[Factor, ...], modes: tuple[Mode, ...], scale: float) -> Network:
            head = self.head
            if head is not None and not any(head[0] in fa.labels for fa in factors):
                head = None
            return Network(factors, modes, feature, scale, head)

        return side(right, self.in_modes, self.scale), side(left, self.out_modes, 1.0)

    def is_tree(self) -> bool:
        """True when the factors and the labels joining two or more of them form a forest (diagonal labels aside)."""
        diag = self._per_head()
        members: dict[int, set[int]] = {}
        for k, fa in enumerate(self.factors):
            for lab in fa.labels:
                if lab not in diag:
                    members.setdefault(lab, set()).add(k)
        for fa in self.factors:
            if len(set(fa.labels)) != len(fa.labels):
                return False
        hyper = [ms for ms in members.values() if len(ms) >= 2]
        nodes = len(self.factors) + len(hyper)
        n_edges = sum(len(ms) for ms in hyper)
        parent = list(range(nodes))

        def find(a: int) -> int:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        for h, ms in enumerate(hyper):
            for k in ms:
                ra, rb = find(len(self.factors) + h), find(k)
                if ra == rb:
                    return False
                parent[ra] = rb
        return n_edges == nodes - len({find(v) for v in range(nodes)})

    def rank_bound(self) -> tuple[int, bool]:
        if self.scale == 0:
            return 0, True
        diag = math.prod(s for lab, s in self.in_modes if lab in self.diagonal_labels())
        cut, _ = self.min_cut()
        bound = min(diag * cut, self.m, self.n)
        return bound, self.vouched or self.is_tree()

    # -- fans, for initialization ------------------------------------------------------------------------------------
    def factor_fans(self) -> list[tuple[int, int]]:
        """``(fan_in, fan_out)`` of every factor, as the factors are applied one at a time from the input.

        The tensor starts with the input modes. At each step the factor that reads the most from it is applied
        (ties: the one that writes least, then the first listed). For that factor a label it holds is

        - read (fan-in) when the current tensor has it and nothing later needs it (no factor to come, not an output);
        - a block (neither) when the current tensor has it and something later needs it (diagonal modes, BTT block
          modes) — the head label is a block everywhere;
        - written (fan-out) when the current tensor lacks it and something later needs it;
        - summed on its own (fan-in) when neither has it.

        Each summed label is read exactly once, so for independent zero-mean factors on a white input
        ``E[y^2] = prod_k fan_in_k * var_k``; for BTT this is Qiu et al.'s ``d_in = r_prev * m_k`` per core.
        """
        head = self.head[0] if self.head is not None else None
        sizes = self.sizes()
        outs = {lab for lab, _ in self.out_modes}
        current = {lab for lab, _ in self.in_modes}
        remaining = list(range(len(self.factors)))
        fans: list[tuple[int, int]] = [(1, 1)] * len(self.factors)

        def step(k: int) -> tuple[int, int, int, set[int], set[int]]:
            later = set(outs)
            for j in remaining:
                if j != k:
                    later.update(self.factors[j].labels)
            reads = alone = writes = 1
            read: set[int] = set()
            written: set[int] = set()
            for lab in dict.fromkeys(self.factors[k].labels):
                if lab == head:
                    continue
                if lab in current:
                    if lab not in later:
                        reads *= sizes[lab]
                        read.add(lab)
                elif lab in later:
                    writes *= sizes[lab]
                    written.add(lab)
                else:
                    alone *= sizes[lab]
            return reads, alone, writes, read, written

        while remaining:
            steps = {k: step(k) for k in remaining}
            k = min(remaining, key=lambda j: (-steps[j][0], steps[j][2], j))
            reads, alone, writes, read, written = steps[k]
            fans[k] = (reads * alone, writes)
            current = (current - read) | written
            remaining.remove(k)
        return fans


# -- combining networks -----------------------------------------------------------------------------------------------
def refine(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]] | None:
    """Common row-major refinement of two splits of the same size, or None when there is none.

    Returns, for each mode of ``a`` and of ``b``, the sizes of the pieces it splits into.

    >>> refine((4, 6), (2, 12))
    ([(2, 2), (6,)], [(2,), (2, 6)])
    >>> refine((4, 6), (6, 4)) is None
    True
    """
    cuts_a = _prefix_products(a)
    cuts_b = _prefix_products(b)
    cuts = sorted(set(cuts_a) | set(cuts_b))
    prev = 1
    for c in cuts:
        if c % prev:
            return None
        prev = c

    def pieces(split: tuple[int, ...]) -> list[tuple[int, ...]]:
        out = []
        lo = 1
        for s in split:
            hi = lo * s
            inner = [c for c in cuts if lo < c <= hi]
            parts = []
            last = lo
            for c in inner:
                parts.append(c // last)
                last = c
            out.append(tuple(parts) if parts else (1,))
            lo = hi
        return out

    return pieces(a), pieces(b)


def _prefix_products(split: tuple[int, ...]) -> list[int]:
    out, p = [], 1
    for s in split:
        p *= s
        out.append(p)
    return out


def fuse(a: Network, b: Network) -> Network | None:
    """The network of ``a @ b`` (b's outputs joined to a's inputs) when the splits refine; otherwise None."""
    # rank(A P D) = rank(A) for a permutation P times a generically nonzero diagonal D
    vouched = (_exact(a) and _scaled_permutation(b)) or (_exact(b) and _scaled_permutation(a))
    # rank(A B) = rank(B) when A is one-to-one, and rank(A) when B is onto; the fused cut bound is never below the
    # rank, so it is the rank when it equals that part's (exact) bound
    parts_exact = not vouched and _exact(a) and _exact(b)
    original = (a, b)
    a = a.squeeze()
    b = b.squeeze().shifted(a.max_label() + 1)
    plan = refine(tuple(s for _, s in b.out_modes), tuple(s for _, s in a.in_modes))
    if plan is None:
        return None
    if parts_exact:
        known = (original[0].rank_bound()[0], original[0].n, original[1].rank_bound()[0], original[1].m)
    pieces_b, pieces_a = plan
    nxt = max(a.max_label(), b.max_label()) + 1
    for (lab, _), parts in zip(list(b.out_modes), pieces_b):
        if len(parts) > 1:
            new = tuple(range(nxt, nxt + len(parts)))
            nxt += len(parts)
            b = b.split(lab, parts, new)
    for (lab, _), parts in zip(list(a.in_modes), pieces_a):
        if len(parts) > 1:
            new = tuple(range(nxt, nxt + len(parts)))
            nxt += len(parts)
            a = a.split(lab, parts, new)
    mapping = {la: lb for (la, _), (lb, _) in zip(a.in_modes, b.out_modes)}
    if a.head is not None and b.head is not None:
        mapping[a.head[0]] = b.head[0]
    a = a.relabel(mapping)
    fused = Network(a.factors + b.factors, b.in_modes, a.out_modes, a.scale * b.scale, _head(a, b), vouched)
    if parts_exact:
        rank_a, n_a, rank_b, m_b = known
        bound = fused.rank_bound()[0]
        if (rank_a == n_a and bound == rank_b) or (rank_b == m_b and bound == rank_a):
            fused = replace(fused, vouched=True)
    return fused


def _exact(net: Network) -> bool:
    """The network's cut bound is its generic rank (vouched by its family, or a tree)."""
    return net.vouched or net.is_tree()


def _scaled_permutation(net: Network) -> bool:
    """Every mode is diagonal and every factor holds diagonal (or head) labels only: a permutation of the
    coordinates times a diagonal, invertible for generic parameters."""
    diag = net._per_head()
    return {lab for lab, _ in net.in_modes} == {lab for lab, _ in net.out_modes} and all(
        set(fa.labels) <= diag for fa in net.factors
    )


def _head(a: Network, b: Network) -> Mode | None:
    if a.head is not None and b.head is not None and a.head[1] != b.head[1]:
        raise ValueError(f"stacks of {a.head[1]} and {b.head[1]} heads cannot be combined")
    return b.head if b.head is not None else a.head


def kron_networks(nets: list[Network]) -> Network:
    """The network of ``nets[0] ⊗ nets[1] ⊗ ...``: disjoint labels side by side.

    rank(A ⊗ B) = rank A · rank B, and the min cut of disjoint parts is the product of their cuts: the result's cut
    bound is its generic rank when every part's is.
    """
    vouched = all(_exact(net) for net in nets)
    out = nets[0]
    for net in nets[1:]:
        net = net.shifted(out.max_label() + 1)
        if out.head is not None and net.head is not None:
            net = net.relabel({net.head[0]: out.head[0]})
        out = Network(
            out.factors + net.factors,
            out.in_modes + net.in_modes,
            out.out_modes + net.out_modes,
            out.scale * net.scale,
            _head(out, net),
        )
    return replace(out, vouched=vouched)


# -- min cut on a hypergraph with multiplicative capacities ------------------------------------------------------------
def _hyper_min_cut(edges: dict[int, set[Any]], sizes: dict[int, int]) -> tuple[int, frozenset[int], frozenset[Any]]:
    """Min over S-T cuts of the product of the sizes of the hyperedges cut (max-flow on log sizes).

    Returns the product, the labels cut and the nodes on the source side.
    """
    graph: dict[Any, dict[Any, float]] = {"S": {}, "T": {}}

    def add(u: Any, v: Any, cap: float) -> None:
        graph.setdefault(u, {})
        graph.setdefault(v, {})
        graph[u][v] = graph[u].get(v, 0.0) + cap
        graph[v].setdefault(u, 0.0)

    for lab, ends in edges.items():
        if len(ends) < 2:
            continue
        ea, eb = ("in", lab), ("out", lab)
        add(ea, eb, math.log2(sizes[lab]) if sizes[lab] > 1 else 0.0)
        for v in ends:
            add(v, ea, math.inf)
            add(eb, v, math.inf)
    eps = 1e-9
    while True:  # Edmonds-Karp
        parent: dict[Any, Any] = {"S": None}
        queue: deque[Any] = deque(["S"])
        while queue and "T" not in parent:
            u = queue.popleft()
            for v, cap in graph[u].items():
                if cap > eps and v not in parent:
                    parent[v] = u
                    queue.append(v)
        if "T" not in parent:
            break
        path = []
        v = "T"
        while parent[v] is not None:
            path.append((parent[v], v))
            v = parent[v]
        push = min(graph[u][v] for u, v in path)
        if push == math.inf:  # an uncuttable path: only diagonal labels could do that, and those are removed
            raise ValueError("Network: input and output are joined by a path with no label to cut")
        for u, v in path:
            graph[u][v] -= push
            graph[v][u] += push
    reach = set(parent)
    side = {v for v in reach if not isinstance(v, tuple)}
    cut = frozenset(lab for lab, ends in edges.items() if len(ends) >= 2 and len({v in side for v in ends}) == 2)
    return math.prod(sizes[lab] for lab in cut), cut, frozenset(side)
