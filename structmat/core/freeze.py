"""Constant-aware planning: contract the weight-only parts of a network once, when that makes each call cheaper.

An ordinary plan (:class:`~structmat.core.nodes.NetNode`) contracts every factor with every call, as if the weights
changed between calls (in training they do). At inference they do not: a contraction among factors only can be done
once and kept. ``Dense(64, 16) @ Dense(16, 16) @ Dense(16, 64)`` costs ``2 * (64*16 + 16*16 + 16*64)`` flops per
row as planned, and ``2 * (64*16 + 16*64)`` with the two right factors contracted once into one ``16 x 64`` piece.

**The search** (:func:`constant_aware_path`). Every contraction tree of a network has one path from the input ``x``
to the root; the subtrees hanging off that path hold factors only (the *pieces*). A piece is computed once (free
per call); each step of the path joins the tensor holding ``x`` with one piece and is counted in opt_einsum's
convention (the size of the labels it joins, doubled when one is summed away: the project's "2 per multiply-add").
An exact dynamic program over the subsets of operands finds the tree of least per-call cost (ties: least one-time
cost), for networks of at most :data:`EXACT_OPERANDS` operands (``x`` included); larger networks keep the ordinary
plan. Every per-call step carries the batch label, so every per-call cost is proportional to the batch and **the
best tree does not depend on the batch**; what does is the comparison with the ordinary plan, whose factor-only
steps cost the same at every batch: a plan that pre-contracts factors at batch 1 to save per-row work pays them on
every call, and at a large batch the ordinary plan stops doing so and costs what the frozen tree costs.

**Memory limit.** A piece is kept for as long as the weights do not change, so a piece (any contraction of two
or more factors) may hold at most ``max(MEMORY_MULTIPLE * (elements of all factors), H * m * n)`` elements: four
times the operator's own factors, or its dense matrix (``H`` stacked ones for a stack of heads), whichever is
larger. A single factor is kept as it is (a view of the parameter, or its computed value for a parametrized or
pruned one). The one-time intermediates inside a piece are transient and not limited (the one-time cost they count
bounds them). Every per-call step joins a piece with a tensor carrying the batch, so it costs at least the piece's
size times the batch: a piece is never larger than the ordinary plan's per-row work, and the limit only binds for
networks that are expensive anyway.

**The decision** (per batch size and input layout, :attr:`FrozenPath.chosen`): the frozen execution runs when
its per-call flops are at most ``1 - MIN_SAVING`` (90 %) of the ordinary plan's (``node.cost(batch)``; the
network's scale is folded into a piece, so its multiplies are saved too), or at most equal when a factor is
computed on every call (a ``torch.nn.utils.parametrize`` or ``torch.nn.utils.prune`` factor: the frozen execution
keeps its value instead of recomputing it, work the flops do not count). A smaller saving is not worth the
memory of the pieces and the per-call version check (about 3 us): the ordinary plan runs. So at a large batch,
where the ordinary plan's factor-only steps are a vanishing part of its work, nothing changes.

**The frozen execution** (:func:`frozen_apply`, :func:`try_frozen`): the pieces are computed once under
``torch.no_grad()`` (outside inference mode, so they can serve autograd through ``x`` later) and held by the node;
``x`` is then contracted with them by an ordinary :class:`~structmat.core.nodes.NetNode` over the pieces (the
*reduced* network: same input and output modes, the pieces as its factors, scale 1), which plans its own path (the
same tree: the pieces left nothing cheaper to do) and runs like any network. The pieces are recomputed when any
tensor they come from changes: the cache is keyed by each source tensor's identity, ``_version`` (bumped by every
in-place update: an optimizer step, ``p.add_(1)`` under ``torch.no_grad()``, ``load_state_dict``), ``data_ptr``,
dtype and device (``.to()``, ``.double()``, assigning ``.data``). The sources of a factor are its parameter or
buffer; for a parametrized one every tensor of its parametrization (the original and the parametrization's own);
for a pruned one ``<name>_orig`` and ``<name>_mask``. A parametrization whose result depends on anything but its
tensors' values is seen as of the last change of those. A source without a version counter (an inference tensor:
a parameter made under ``torch.inference_mode()``) cannot be watched, and such a network keeps the ordinary plan.

**Semantics of the two entry points** (wired in ``NetNode.apply`` and ``LinearOperator.freeze``):

- under ``torch.inference_mode()`` every network uses the frozen execution where it is cheaper (no gradient can
  be asked for there, and the weights cannot be updated in place inside it without the update being seen:
  in-place updates bump the version counter even in inference mode);
- ``op.freeze()`` marks the networks of ``op`` and of every operator nested in it (like ``module.eval()``), and
  a marked network uses the frozen execution in any mode; ``op.unfreeze()`` clears the marks and drops the pieces.
  A network shared by two operators (an operand's node inside a product that did not fuse) is marked for both:
  harmless, since the frozen execution never changes a value or a gradient (next point).
- **gradients are never dropped**: when grad mode is on and any source tensor of the network requires grad, the
  ordinary plan runs (values and gradients exactly as unfrozen; a frozen operator in training is merely not
  accelerated). When only ``x`` requires grad, the frozen execution runs and ``x`` gets its exact gradient through
  the pieces (constants).
- under ``torch.compile`` the ordinary plan runs (the cache is Python state a graph cannot guard on).

The pieces stay with the node until the weights change (then they are recomputed on the next frozen call),
``op.unfreeze()`` or :func:`release`; :func:`cached_elements` says how many elements a node tree holds.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils import parametrize, prune

from .cost import Cost
from .network import Factor, Network

__all__ = [
    "EXACT_OPERANDS",
    "MEMORY_MULTIPLE",
    "MIN_SAVING",
    "FrozenPath",
    "constant_aware_path",
    "memory_limit",
    "try_frozen",
    "frozen_apply",
    "frozen_cost",
    "set_frozen",
    "release",
    "cached_elements",
]

EXACT_OPERANDS = 10  # x and up to 9 factors: 3^9 ~ 20k steps of the per-call search, ~30 ms once per layout
MEMORY_MULTIPLE = 4  # a piece holds at most this many times the elements of all factors (or a dense matrix)
MIN_SAVING = 0.1  # the least fraction of the ordinary plan's flops a frozen execution must save to run

_PLAN_CACHE_SIZE = 64  # decisions kept per node (one per batch size and layout), as the ordinary plans
_BATCH = -1  # the batch label, outside the network's own (non-negative) labels
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

Tree = Any  # a factor index k, or a pair of trees


@dataclass(frozen=True)
class FrozenPath:
    """The constant-aware tree of one network at one batch size, and what it saves.

    Attributes:
        batch: rows of the input (for a stack with ``per_head``, rows of ``(B, H, n)``).
        per_head: the input carries the head label (``(B, H, n)``).
        flops: per-call flops of the constant-aware tree: the steps that involve ``x`` (no scale multiplies: the
            scale is folded into a piece).
        ordinary_flops: per-call flops of the ordinary plan (``node.cost(batch)``), factor-only steps and scale
            multiplies included.
        once_flops: flops spent once to compute the pieces.
        pieces: the factors of each piece as a bit mask over factor indices (bit k: ``network.factors[k]``), in the
            order the input meets them.
        trees: each piece's contraction tree over factor indices (an index, or a pair of trees).
        piece_elements: elements held by each piece.
        limit: the most elements a piece of two or more factors may hold (:func:`memory_limit`).
        computed: a factor is computed on every call (parametrized or pruned).
    """

    batch: int
    per_head: bool
    flops: int
    ordinary_flops: int
    once_flops: int
    pieces: tuple[int, ...]
    trees: tuple[Tree, ...]
    piece_elements: tuple[int, ...]
    limit: int
    computed: bool = False

    @property
    def cheaper(self) -> bool:
        """True when the constant-aware tree costs fewer flops per call than the ordinary plan."""
        return self.flops < self.ordinary_flops

    @property
    def chosen(self) -> bool:
        """True when the frozen execution runs at this batch (the decision in the module doc)."""
        return _worth(self.flops, self.ordinary_flops, self.computed)

    @property
    def contracted(self) -> bool:
        """True when some piece joins two or more factors (else the pieces are the factors themselves)."""
        return any(p & (p - 1) for p in self.pieces)


def memory_limit(network: Network) -> int:
    """The most elements one piece of two or more factors may hold: ``max(MEMORY_MULTIPLE * (elements of all
    factors), H * m * n)``."""
    heads = network.head[1] if network.head is not None else 1
    return max(MEMORY_MULTIPLE * sum(fa.numel for fa in network.factors), heads * network.m * network.n)


# -- the search -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Search:
    """A network's batch-independent constant-aware tree: per-row costs (batch label of size 1)."""

    per_row: int  # per-call flops at batch 1 (every per-call step is proportional to the batch)
    once: int
    pieces: tuple[int, ...]  # masks over factor indices, in the order x meets them
    trees: tuple[Tree, ...]
    piece_labels: tuple[tuple[int, ...], ...]  # each piece's labels (network labels, ascending)
    piece_shapes: tuple[tuple[int, ...], ...]


def _search(network: Network, per_head: bool, limit: int) -> _Search | None:
    """The exact constant-aware tree of ``network`` (None when it has no factor or too many operands)."""
    factors = network.factors
    count = len(factors) + 1
    if not factors or count > EXACT_OPERANDS:
        return None
    sizes = network.sizes()
    sizes[_BATCH] = 1
    bit = {lab: k for k, lab in enumerate(sizes)}
    label_of = {k: lab for lab, k in bit.items()}
    size_of = [sizes[label_of[k]] for k in range(len(bit))]

    def mask(labels: Any) -> int:
        out = 0
        for lab in labels:
            out |= 1 << bit[lab]
        return out

    head = [network.head[0]] if network.head is not None else []
    x_labels = [_BATCH, *(head if per_head else []), *(lab for lab, _ in network.in_modes)]
    inputs = [mask(x_labels), *(mask(fa.labels) for fa in factors)]
    keep = mask([_BATCH, *head, *(lab for lab, _ in network.out_modes)])
    full = (1 << count) - 1
    memo: dict[int, int] = {}

    def size(labels: int) -> int:
        out = memo.get(labels)
        if out is None:
            out, rest = 1, labels
            while rest:
                low = rest & -rest
                out *= size_of[low.bit_length() - 1]
                rest ^= low
            memo[labels] = out
        return out

    carried = [0] * (full + 1)
    for s in range(1, full + 1):
        low = s & -s
        carried[s] = carried[s ^ low] | inputs[low.bit_length() - 1]
    legs = [carried[s] & (carried[full ^ s] | keep) for s in range(full + 1)]

    def step(a: int, b: int, result: int) -> int:
        union = a | b
        return size(union) * (2 if union & ~result else 1)

    # pieces: subsets of factors (even masks, x is bit 0); the cheapest one-time tree of each, and whether it fits
    inf = math.inf
    once: list[float] = [inf] * (full + 1)
    split = [0] * (full + 1)
    fits = [False] * (full + 1)
    for s in range(2, full + 1, 2):
        low = s & -s
        rest = s ^ low
        if not rest:  # one factor: its own labels summed once (when it has any), else free
            once[s] = size(carried[s]) if legs[s] != carried[s] else 0
            fits[s] = True
            continue
        fits[s] = size(legs[s]) <= limit
        best, sub = inf, rest
        while True:  # every split {low} + sub | rest - sub, sub a proper subset of rest
            sub = (sub - 1) & rest
            a = low | sub
            b = s ^ a
            c = once[a] + once[b] + step(legs[a], legs[b], legs[s])
            if c < best:
                best, split[s] = c, a
            if not sub:
                break
        once[s] = best
    # the path from x: cost[s] over masks holding x (bit 0); the cheapest piece to join last; x itself summed first
    # over its own labels (a per-call step of 2 * its size) when that is cheaper
    x_variants = [(0, inputs[0], False)]
    if size(inputs[0] & ~legs[1]) > 1:
        x_variants.append((2 * size(inputs[0]), legs[1], True))
    cost: list[tuple[float, float]] = [(inf, inf)] * (full + 1)
    last = [0] * (full + 1)
    for s in range(3, full + 1, 2):
        rest = s ^ 1
        best, piece = (inf, inf), 0
        b = rest
        while b:
            if fits[b]:
                a = s ^ b
                starts = [(c, lg) for c, lg, _ in x_variants] if a == 1 else [(cost[a][0], legs[a])]
                for c0, lg in starts:
                    c = (c0 + step(lg, legs[b], legs[s]), (0 if a == 1 else cost[a][1]) + once[b])
                    if c < best:
                        best, piece = c, b
            b = (b - 1) & rest
        cost[s], last[s] = best, piece
    per_row, once_total = cost[full]
    if per_row == inf:
        return None
    pieces: list[int] = []
    s = full
    while s != 1:
        pieces.append(last[s])
        s ^= last[s]
    pieces.reverse()

    def tree(s: int) -> Tree:
        if s & (s - 1) == 0:
            return s.bit_length() - 2  # operand k + 1 is factor k
        return (tree(split[s]), tree(s ^ split[s]))

    piece_labels = []
    for p in pieces:
        labs = sorted(label_of[k] for k in range(len(bit)) if legs[p] >> k & 1)
        piece_labels.append(tuple(labs))
    return _Search(
        per_row=int(per_row),
        once=int(once_total),
        pieces=tuple(p >> 1 for p in pieces),
        trees=tuple(tree(p) for p in pieces),
        piece_labels=tuple(piece_labels),
        piece_shapes=tuple(tuple(sizes[lab] for lab in labs) for labs in piece_labels),
    )


def _node_of(node_or_network: Any) -> Any:
    from . import nodes as _nodes  # here: nodes imports this module

    if isinstance(node_or_network, Network):
        return _nodes.NetNode(node_or_network)
    if not isinstance(node_or_network, _nodes.NetNode):
        raise TypeError(f"constant_aware_path: expected a NetNode or a Network, got {type(node_or_network).__name__}")
    return node_or_network


def _ordinary_cost(node: Any, batch: int, h: int = 0) -> Cost:
    """``node.cost(batch, h)`` of the ordinary plan, whatever the node's freeze mark (see :func:`frozen_cost`)."""
    marked = node.__dict__.get("frozen")
    if marked:
        node.frozen = False
    try:
        return node.cost(batch, h)
    finally:
        if marked:
            node.frozen = True


def constant_aware_path(node: Any, batch: int, per_head: bool = False, limit: int | None = None) -> FrozenPath | None:
    """The contraction tree of least per-call cost when contractions among factors only are free (done once).

    Args:
        node: a :class:`~structmat.core.nodes.NetNode` (or a :class:`~structmat.core.network.Network`, planned as a
            fresh node) whose plan gives the ordinary cost.
        batch: rows of the input.
        per_head: the input is ``(batch, H, n)`` (a stack only).
        limit: the most elements a piece of two or more factors may hold; :func:`memory_limit` when None.

    Returns:
        The :class:`FrozenPath`, or None when the network has no factor or more than :data:`EXACT_OPERANDS`
        operands (the ordinary plan is kept).

    Example:
        >>> import structmat as sm
        >>> op = sm.Dense(64, 16) @ sm.Dense(16, 16) @ sm.Dense(16, 64)
        >>> p = constant_aware_path(op._node, batch=8)
        >>> p.flops == 2 * (64 * 16 + 16 * 64) * 8, p.ordinary_flops == 2 * (64 * 16 + 16 * 16 + 16 * 64) * 8
        (True, True)
    """
    node = _node_of(node)
    network = node.network
    if per_head and network.head is None:
        raise ValueError("constant_aware_path: per_head=True needs a stack of heads; this network is single")
    limit = memory_limit(network) if limit is None else limit
    found = _search(network, per_head, limit)
    if found is None:
        return None
    ordinary = _ordinary_cost(node, batch, node.heads if per_head else 0).flops
    return FrozenPath(
        batch=batch,
        per_head=per_head,
        flops=found.per_row * batch,
        ordinary_flops=ordinary,
        once_flops=found.once,
        pieces=found.pieces,
        trees=found.trees,
        piece_elements=tuple(math.prod(s) for s in found.piece_shapes),
        limit=limit,
        computed=_computed(network),
    )


def _worth(flops: int, ordinary: int, computed: bool) -> bool:
    """Whether a frozen execution of ``flops`` per call replaces an ordinary plan of ``ordinary``."""
    return flops <= (1 - MIN_SAVING) * ordinary or (computed and flops <= ordinary)


# -- sources and versions ----------------------------------------------------------------------------------------------
def _pruned(owner: torch.nn.Module, name: str) -> bool:
    return any(
        isinstance(h, prune.BasePruningMethod) and h._tensor_name == name for h in owner._forward_pre_hooks.values()
    )


def _sources(fa: Factor, out: list[torch.Tensor]) -> bool:
    """Append the tensors ``fa``'s value is computed from; True when it is computed (parametrized or pruned)."""
    owner, name = fa.owner, fa.name
    t = owner._parameters.get(name)
    if t is None:
        t = owner._buffers.get(name)
    if t is not None:
        out.append(t)
        return False
    if parametrize.is_parametrized(owner, name):
        plist = owner.parametrizations[name]
        out.extend(plist.parameters())
        out.extend(plist.buffers())
        return True
    if owner._forward_pre_hooks and _pruned(owner, name):
        out.append(owner._parameters[name + "_orig"])
        out.append(owner._buffers[name + "_mask"])
        return True
    value = getattr(owner, name)
    if isinstance(value, torch.Tensor):
        out.append(value)
    return False


def _computed(network: Network) -> bool:
    """Whether a factor of ``network`` is computed on every call (parametrized or pruned)."""
    return any(_sources(fa, []) for fa in network.factors)


def _version_key(sources: list[torch.Tensor]) -> tuple[Any, ...] | None:
    """Identity, version, storage, dtype and device of every source; None when one has no version counter."""
    try:
        return tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device) for t in sources)
    except RuntimeError:  # an inference tensor: "Inference tensors do not track version counter"
        return None


# -- the frozen execution ---------------------------------------------------------------------------------------------
class _Holder(torch.nn.Module):
    """Holds the pieces of one reduced network as plain attributes ``p0, p1, ...`` (what its factors fetch)."""


@dataclass
class _Reduced:
    """The reduced network of one constant-aware tree: its pieces (masks, trees, labels) and the node over them."""

    pieces: tuple[int, ...]
    trees: tuple[Tree, ...]
    labels: tuple[tuple[int, ...], ...]
    holder: _Holder
    node: Any  # the NetNode over the pieces
    key: tuple[Any, ...] | None = None  # version key its pieces were computed under


class _State:
    """What one node keeps for its frozen execution: searches per layout, decisions per batch, pieces."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.limit = memory_limit(node.network)
        self.searches: dict[bool, _Search | None] = {}
        self.decisions: dict[tuple[int, bool], _Reduced | None] = {}
        self.reduced: dict[tuple[bool, tuple[int, ...]], _Reduced] = {}
        self.pieces: dict[int, torch.Tensor] = {}  # by factor mask, for the key below
        self.key: tuple[Any, ...] | None = None

    def search(self, per_head: bool) -> _Search | None:
        if per_head not in self.searches:
            self.searches[per_head] = _search(self.node.network, per_head, self.limit)
        return self.searches[per_head]

    def decide(self, batch: int, per_head: bool) -> _Reduced | None:
        key = (batch, per_head)
        if key in self.decisions:
            return self.decisions[key]
        found = self.search(per_head)
        chosen = None
        if found is not None:
            ordinary = _ordinary_cost(self.node, batch, self.node.heads if per_head else 0).flops
            flops = found.per_row * batch
            if _worth(flops, ordinary, _computed(self.node.network)):
                chosen = self.reduced_for(found, per_head)
        if len(self.decisions) >= _PLAN_CACHE_SIZE:
            self.decisions.pop(next(iter(self.decisions)))
        self.decisions[key] = chosen
        return chosen

    def reduced_for(self, found: _Search, per_head: bool) -> _Reduced:
        from . import nodes as _nodes  # here: nodes imports this module

        rkey = (per_head, found.pieces)
        red = self.reduced.get(rkey)
        if red is None:
            net = self.node.network
            holder = _Holder()
            factors = tuple(
                Factor(holder, f"p{k}", labels, shape)
                for k, (labels, shape) in enumerate(zip(found.piece_labels, found.piece_shapes))
            )
            reduced = Network(factors, net.in_modes, net.out_modes, 1.0, net.head)
            node = _nodes.NetNode(reduced)
            node.__dict__["_freeze"] = _Never  # its pieces hold nothing left to contract
            red = self.reduced[rkey] = _Reduced(found.pieces, found.trees, found.piece_labels, holder, node)
        return red

    def refresh(self, red: _Reduced, key: tuple[Any, ...], device: torch.device) -> None:
        """Bring ``red``'s pieces up to the sources' current values (recomputed once after any change), in the
        factors' dtype (autocast off: the pieces outlive the autocast region)."""
        if key != self.key:
            self.pieces.clear()
            self.key = key
        if red.key == key:
            return
        net = self.node.network
        kind = device.type
        plain = torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else nullcontext()
        with torch.inference_mode(False), torch.no_grad(), plain:
            values = [
                self.pieces.get(p) if p in self.pieces else _compute(net, tree, labels)
                for p, tree, labels in zip(red.pieces, red.trees, red.labels)
            ]
            for p, v in zip(red.pieces, values):
                self.pieces[p] = v
            if net.scale != 1.0:  # folded into the smallest piece (a copy: the others may be shared)
                k = min(range(len(values)), key=lambda i: values[i].numel())
                values[k] = values[k] * net.scale
        for k, v in enumerate(values):
            setattr(red.holder, f"p{k}", v)
        red.key = key


class _Never:
    """The state of a reduced node: never frozen again (a class, so that a pickled or copied node keeps it)."""


def _compute(network: Network, tree: Tree, labels: tuple[int, ...]) -> torch.Tensor:
    """One piece: the factors of ``tree`` contracted along it, summed down to ``labels`` (detached)."""
    letters = {lab: _LETTERS[k] for k, lab in enumerate(network.labels())}
    factors = network.factors

    def leaves(t: Tree) -> list[int]:
        return [t] if isinstance(t, int) else leaves(t[0]) + leaves(t[1])

    outside: dict[int, set[int]] = {}  # label -> factors holding it
    for k, fa in enumerate(factors):
        for lab in fa.labels:
            outside.setdefault(lab, set()).add(k)
    keep = set(labels)

    def value(t: Tree) -> tuple[torch.Tensor, tuple[int, ...]]:
        if isinstance(t, int):
            return factors[t].fetch().detach(), factors[t].labels
        (a, la), (b, lb) = value(t[0]), value(t[1])
        inside = set(leaves(t))
        out = tuple(
            lab for lab in dict.fromkeys(la + lb) if lab in keep or not outside[lab] <= inside
        )  # kept by the piece, or needed by a factor outside this subtree
        eq = "".join(letters[lab] for lab in la) + "," + "".join(letters[lab] for lab in lb)
        return torch.einsum(eq + "->" + "".join(letters[lab] for lab in out), a, b), out

    t, have = value(tree)
    if have != labels:  # the piece's own labels summed, and its axes in the declared order
        t = torch.einsum(
            "".join(letters[lab] for lab in have) + "->" + "".join(letters[lab] for lab in labels),
            t,
        )
    return t.contiguous()  # read on every call: strided axes would make each call's einsum copy it


def try_frozen(node: Any, x: torch.Tensor) -> torch.Tensor | None:
    """``node.apply(x)`` by the frozen execution, or None when the ordinary plan is to run.

    None when: traced by torch.compile; the frozen execution is not chosen at this batch; grad mode is on and
    a source tensor of the network requires grad (the ordinary plan keeps the gradients); a source has no version
    counter (an inference tensor: its changes could not be seen).
    """
    if torch.compiler.is_compiling():
        return None
    state = node.__dict__.get("_freeze")
    if state is None:
        state = node.__dict__["_freeze"] = _State(node)
    elif state is _Never:
        return None
    if x.ndim == 3 and node.heads is None:  # one operator for every head: fold the heads into the batch
        y = try_frozen(node, x.reshape(-1, node.n))
        return None if y is None else y.reshape(x.shape[0], x.shape[1], node.m)
    red = state.decide(x.shape[0], x.ndim == 3)
    if red is None:
        return None
    sources: list[torch.Tensor] = []
    for fa in node.network.factors:
        _sources(fa, sources)
    if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
        return None
    key = _version_key(sources)
    if key is None:
        return None
    state.refresh(red, key, x.device)
    return red.node.apply(x)


def _net_nodes(node: Any) -> Iterator[Any]:
    """Every NetNode of a node tree (children of sums, chains and Kronecker products)."""
    from . import nodes as _nodes  # here: nodes imports this module

    stack = [node]
    seen: set[int] = set()
    while stack:
        nd = stack.pop()
        if id(nd) in seen:
            continue
        seen.add(id(nd))
        if isinstance(nd, _nodes.NetNode):
            yield nd
        stack.extend(getattr(nd, "children", ()))


def frozen_apply(node: Any, x: torch.Tensor) -> torch.Tensor:
    """``node.apply(x)`` with every network of ``node`` using the frozen execution where it is cheaper.

    For a NetNode this is :func:`try_frozen`, else the ordinary plan. For a sum, chain or Kronecker node, its
    networks are marked frozen for the call (they run frozen when ``NetNode.apply`` is wired to
    :func:`try_frozen`; before that, the ordinary plan runs).
    """
    from . import nodes as _nodes  # here: nodes imports this module

    if isinstance(node, _nodes.NetNode):
        y = try_frozen(node, x)
        return node.apply(x) if y is None else y
    unmarked = [nd for nd in _net_nodes(node) if not nd.__dict__.get("frozen")]
    for nd in unmarked:
        nd.frozen = True
    try:
        return node.apply(x)
    finally:
        for nd in unmarked:
            del nd.frozen


def frozen_cost(node: Any, batch: int, h: int = 0) -> Cost:
    """Per-call cost of the frozen execution (fields as ``node.cost(batch, h)``; the one-time work not counted).

    For a NetNode: the reduced network's cost where the frozen execution runs at this batch, else the ordinary
    plan's. For a sum, chain or Kronecker node: its networks are marked for the query (they report their frozen
    cost when ``NetNode.cost`` is wired to this function; before that, the ordinary cost).
    """
    from . import nodes as _nodes  # here: nodes imports this module

    if isinstance(node, _nodes.NetNode):
        state = node.__dict__.get("_freeze")
        if state is _Never:
            return _ordinary_cost(node, batch, h)
        if state is None:
            state = node.__dict__["_freeze"] = _State(node)
        if h and node.heads is None:
            rows, per_head = batch * h, False
        else:
            rows, per_head = batch, bool(h)
        red = state.decide(rows, per_head)
        if red is None:
            return _ordinary_cost(node, batch, h)
        c = red.node.cost(rows, node.heads if per_head else 0)
        return Cost((node.m, node.n), batch, c.flops, c.macs, c.largest_intermediate, c.contractions)
    unmarked = [nd for nd in _net_nodes(node) if not nd.__dict__.get("frozen")]
    for nd in unmarked:
        nd.frozen = True
    try:
        return node.cost(batch, h)
    finally:
        for nd in unmarked:
            del nd.frozen


def set_frozen(node: Any, mode: bool = True) -> None:
    """Mark (or unmark) every network of a node tree frozen; unmarking drops their pieces (:func:`release`)."""
    for nd in _net_nodes(node):
        if mode:
            nd.frozen = True
        else:
            nd.__dict__.pop("frozen", None)
    if not mode:
        release(node)


def release(node: Any) -> None:
    """Drop the pieces and decisions every network of a node tree keeps for its frozen execution."""
    for nd in _net_nodes(node):
        if nd.__dict__.get("_freeze") not in (None, _Never):
            del nd.__dict__["_freeze"]


def cached_elements(node: Any) -> int:
    """Elements held by the pieces of every network of a node tree (scaled copies included)."""
    total = 0
    for nd in _net_nodes(node):
        state = nd.__dict__.get("_freeze")
        if state is None or state is _Never:
            continue
        held: dict[int, int] = {}
        for t in state.pieces.values():
            held[id(t)] = t.numel()
        for red in state.reduced.values():
            if red.key is not None:
                for k in range(len(red.pieces)):
                    t = getattr(red.holder, f"p{k}")
                    held[id(t)] = t.numel()
        total += sum(held.values())
    return total
