"""Contraction paths: the order in which one network's einsum contracts its operands.

Every path is scored by opt_einsum's ``opt_cost``: a step that joins ``k`` operands whose labels together are ``U``
costs ``prod(sizes of U) * (max(1, k - 1) + [some label of U is summed away])``, and a path costs the sum of its
steps. :func:`best_path` returns the cheapest of these candidates:

- the **optimum** over every pairwise contraction tree, outer products included (and an operand's own labels, those
  no other operand nor the output has, summed in a step of its own or not), for networks of at most
  :data:`EXACT_OPERANDS` operands (a dynamic program over subsets, ``3^n / 2`` steps);
- beyond that, the optimum over trees without outer products inside a connected part of the network (a dynamic
  program over connected sets under growing cost caps, as opt_einsum's ``dp``), the parts then joined optimally; it
  gives up after :data:`SEARCH_STEPS` units of work (a Kronecker product of many parts, whose factors meet only at
  the input, would take minutes), keeping the other candidates;
- opt_einsum's ``greedy`` path;
- the **chain** path of a fused product (``parts``): the input contracted with the last network's factors along that
  network's own best path, then with the next network's, and so on. It is a path of the fused network and costs what
  applying the product one network at a time costs, so a fused product never costs more than its chain.

The searches are cut off at the cheapest candidate found so far (a partial tree that already costs as much cannot
lead to a cheaper path), which keeps them fast when a cheap path exists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import opt_einsum as oe

__all__ = ["best_path", "path_cost", "EXACT_OPERANDS", "SEARCH_STEPS"]

EXACT_OPERANDS = 10  # every tree, outer products too: 3^10 / 2 ~ 30k steps, ~40 ms in the worst case
SEARCH_STEPS = 120_000  # work units of the connected search before it gives up (~40 ms on one core)

_STEP_WORK = 8  # a step evaluated costs about as much as 8 pairs looked at and skipped
Tree = Any  # an operand index k; (k,): operand k with its own labels summed first; or a pair of trees
Leaf = tuple[int, int, Tree, int]  # (operands it holds as a bit mask, cost of making it, its tree, its labels)


class _Problem:
    """One einsum in bit masks: each operand's labels, each label's size, the labels kept (the output)."""

    def __init__(self, equation: str, shapes: Sequence[Sequence[int]]) -> None:
        lhs, rhs = equation.split("->")
        terms = lhs.split(",")
        letters = {c: k for k, c in enumerate(dict.fromkeys(lhs.replace(",", "") + rhs))}
        sizes = [1] * len(letters)
        self.inputs: list[int] = []
        for term, shape in zip(terms, shapes):
            mask = 0
            for c, s in zip(term, shape):
                sizes[letters[c]] = int(s)
                mask |= 1 << letters[c]
            self.inputs.append(mask)
        self.keep = sum(1 << letters[c] for c in rhs)
        self.all = (1 << len(terms)) - 1
        # tables by bytes of a mask: the labels of any 8 consecutive operands, the product of any 8 label sizes
        self._label_table = _byte_tables(self.inputs, lambda a, b: a | b, 0)
        self._size_table = _byte_tables(sizes, lambda a, b: a * b, 1)
        self._legs: dict[int, int] = {}

    def labels(self, ops: int) -> int:
        """Labels carried by the operands in the mask ``ops``."""
        out = 0
        for table in self._label_table:
            if not ops:
                break
            out |= table[ops & 255]
            ops >>= 8
        return out

    def legs(self, ops: int) -> int:
        """Labels of the tensor contracted from the operands ``ops`` (or summed from one): those kept or carried by
        an operand outside ``ops``; the others were summed when it was made."""
        out = self._legs.get(ops)
        if out is None:
            out = self._legs[ops] = self.labels(ops) & (self.labels(self.all ^ ops) | self.keep)
        return out

    def size(self, labels: int) -> int:
        """Product of the sizes of the labels in the mask ``labels``."""
        out = 1
        for table in self._size_table:
            if not labels:
                break
            out *= table[labels & 255]
            labels >>= 8
        return out

    def operand(self, k: int) -> Leaf:
        return (1 << k, 0, k, self.inputs[k])

    def summed_first(self, k: int) -> Leaf | None:
        """Operand ``k`` after a step of its own that sums the labels no other operand (nor the output) has.

        None when there are none, or when they hold one element: summing a size-1 label is no work, but opt_einsum
        would count ``2 * size`` for it and then count the next step as an outer product (one flop per element
        instead of two), a saving that exists only in the count; the single step would also take the contraction
        off torch's einsum (which takes pairs only).
        """
        labels = self.inputs[k]
        own = labels & ~(self.labels(self.all ^ (1 << k)) | self.keep)
        return (1 << k, 2 * self.size(labels), (k,), labels ^ own) if self.size(own) > 1 else None

    def join(self, a: Leaf, b: Leaf) -> Leaf:
        """The step contracting ``a`` with ``b``: opt_einsum's cost, doubled when a label is summed away."""
        ops = a[0] | b[0]
        legs = self.legs(ops)
        union = a[3] | b[3]
        return ops, a[1] + b[1] + self.size(union) * (2 if union & ~legs else 1), (a[2], b[2]), legs


def _byte_tables(values: list[Any], join: Any, unit: Any) -> list[list[Any]]:
    """For each byte of a bit mask over ``values``: the join of the values its 256 bit patterns select."""
    tables = []
    for lo in range(0, len(values), 8):
        chunk = values[lo : lo + 8]
        table = [unit] * 256
        for pattern in range(1, 256):
            low = (pattern & -pattern).bit_length() - 1
            table[pattern] = join(table[pattern & (pattern - 1)], chunk[low]) if low < len(chunk) else unit
        tables.append(table)
    return tables


def _variants(pb: _Problem, leaves: list[Leaf]) -> list[Leaf | None]:
    """For each leaf that is a bare operand with labels of its own to sum: that operand summed first."""
    return [pb.summed_first(leaf[2]) if isinstance(leaf[2], int) else None for leaf in leaves]


def _exact(pb: _Problem, leaves: list[Leaf], cap: int) -> Leaf | None:
    """The cheapest tree over ``leaves`` (outer products allowed, an operand's own labels summed first or not)
    costing less than ``cap``, or None.

    A dynamic program over the subsets of ``leaves`` (indexed by bit mask), each split once: ``3^n / 2`` splits.
    """
    count = 1 << len(leaves)
    ops = [0] * count
    legs = [0] * count
    cost: list[float] = [math.inf] * count
    how: list[tuple[int, bool, bool]] = [(0, False, False)] * count  # (first part, each part summed first)
    alt = {1 << i: v for i, v in enumerate(_variants(pb, leaves)) if v is not None}
    alt_mask = sum(alt)
    for i, leaf in enumerate(leaves):
        ops[1 << i], cost[1 << i], legs[1 << i] = leaf[0], leaf[1], leaf[3]
    size = pb.size
    for s in range(3, count):
        low = s & -s
        rest = s ^ low
        if not rest:
            continue
        ops[s] = ops[low] | ops[rest]
        legs[s] = pb.legs(ops[s])
        summed = ~legs[s]
        best: float = cap
        sub = rest
        while True:  # every split {low} + sub | rest - sub, sub a proper subset of rest
            sub = (sub - 1) & rest
            a, b = low | sub, rest ^ sub
            both = cost[a] + cost[b]
            if both < best:
                union = legs[a] | legs[b]
                c = both + size(union) * (2 if union & summed else 1)
                if c < best:
                    best, how[s] = c, (a, False, False)
            if not sub:
                break
        bits = s & alt_mask
        while bits:  # the splits that take off one operand summed first (the other side, if one operand, too)
            j = bits & -bits
            bits ^= j
            other = s ^ j
            sides = [(cost[other], legs[other], False)]
            if other in alt:
                sides.append((alt[other][1], alt[other][3], True))
            for other_cost, other_legs, other_alt in sides:
                union = alt[j][3] | other_legs
                c = alt[j][1] + other_cost + size(union) * (2 if union & summed else 1)
                if c < best:
                    best, how[s] = c, (j, True, other_alt)
        cost[s] = best if best < cap else math.inf
    top = count - 1
    if cost[top] >= cap:
        return None

    def tree(s: int, first: bool) -> Tree:
        if s & (s - 1) == 0:
            return alt[s][2] if first else leaves[s.bit_length() - 1][2]
        a, a_first, b_first = how[s]
        return (tree(a, a_first), tree(s ^ a, b_first))

    return ops[top], int(cost[top]), tree(top, False), legs[top]


def _prefer_summed(pb: _Problem, leaves: list[Leaf]) -> list[Leaf]:
    """Leaves for the searches that do not try both ways: operands sum their own labels first."""
    return [first or leaf for leaf, first in zip(leaves, _variants(pb, leaves))]


class _OverBudgetError(Exception):
    pass


def _connected(pb: _Problem, leaves: list[Leaf], cap: int, budget: list[int]) -> Leaf | None:
    """The cheapest tree over connected ``leaves`` that never joins two tensors sharing no summed label, costing
    less than ``cap`` (None if there is none); raises :class:`_OverBudgetError` when ``budget[0]`` steps run out."""
    free = ~pb.keep
    table: dict[int, Leaf] = {1 << i: leaf for i, leaf in enumerate(leaves)}
    layers: list[list[int]] = [[], list(table)]
    for k in range(2, len(leaves) + 1):
        layer: list[int] = []
        for m in range(1, k // 2 + 1):
            budget[0] -= len(layers[m]) * len(layers[k - m])
            for s1 in layers[m]:
                if budget[0] < 0:
                    raise _OverBudgetError
                a = table[s1]
                shared = a[3] & free
                for s2 in layers[k - m]:
                    if s1 & s2 or (m == k - m and s1 > s2):
                        continue
                    b = table[s2]
                    if not shared & b[3]:
                        continue
                    budget[0] -= _STEP_WORK
                    joined = pb.join(a, b)
                    if joined[1] >= cap:
                        continue
                    s = s1 | s2
                    prev = table.get(s)
                    if prev is None:
                        layer.append(s)
                    elif prev[1] <= joined[1]:
                        continue
                    table[s] = joined
        layers.append(layer)
    return table.get((1 << len(leaves)) - 1)


def _deepening(pb: _Problem, leaves: list[Leaf], cap: int, budget: list[int]) -> Leaf | None:
    """:func:`_connected` under caps growing 8-fold from the output's size up to ``cap``: a tight cap prunes most
    sets, and the first cap under which a tree exists gives the cheapest (as opt_einsum's ``dp`` does)."""
    limit = 8 * max(pb.size(pb.legs(sum(leaf[0] for leaf in leaves))), 1)
    while limit < cap:
        found = _connected(pb, leaves, limit, budget)
        if found is not None:
            return found
        limit *= 8
    return _connected(pb, leaves, cap, budget)


def _components(pb: _Problem, leaves: list[Leaf]) -> list[list[Leaf]]:
    """``leaves`` grouped by the summed labels they share (transitively)."""
    free = ~pb.keep
    groups: list[tuple[int, list[Leaf]]] = []
    for leaf in leaves:
        labels = leaf[3] & free
        merged = (labels, [leaf])
        for g in [g for g in groups if g[0] & labels]:
            merged = (merged[0] | g[0], g[1] + merged[1])
            groups.remove(g)
        groups.append(merged)
    return [sorted(g, key=lambda leaf: leaf[0]) for _, g in groups]


def _greedy(pb: _Problem, leaves: list[Leaf]) -> Leaf:
    """Join the pair whose result grows memory least (ties: the cheaper step), preferring pairs that share a
    summed label; for sub-problems that the exact searches cannot afford."""
    free = ~pb.keep
    items = _prefer_summed(pb, leaves)
    while len(items) > 1:
        steps = []
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                a, b = items[i], items[j]
                new = pb.join(a, b)
                grown = pb.size(new[3]) - pb.size(a[3]) - pb.size(b[3])
                steps.append((not a[3] & b[3] & free, grown, new[1], i, j, new))
        *_, i, j, new = min(steps, key=lambda st: st[:5])
        items = [it for k, it in enumerate(items) if k not in (i, j)]
        items.append(new)
    return items[0]


def _search(pb: _Problem, leaves: list[Leaf], cap: int, budget: list[int]) -> Leaf | None:
    """The cheapest tree over ``leaves`` the affordable searches find below ``cap`` (None: none found)."""
    if len(leaves) <= EXACT_OPERANDS:
        return _exact(pb, leaves, cap)
    try:
        parts = []
        for group in _components(pb, _prefer_summed(pb, leaves)):
            if len(group) == 1:
                part: Leaf | None = group[0]
            elif len(group) <= EXACT_OPERANDS:
                part = _exact(pb, group, cap)
            else:
                part = _deepening(pb, group, cap, budget)
            if part is None:
                return None
            parts.append(part)
    except _OverBudgetError:
        return None
    if len(parts) == 1:
        return parts[0]
    found = _exact(pb, parts, cap) if len(parts) <= EXACT_OPERANDS else _greedy(pb, parts)
    return found if found is not None and found[1] < cap else None


def _best_tree(pb: _Problem, leaves: list[Leaf], budget: list[int]) -> Leaf:
    greedy = _greedy(pb, leaves)
    return _search(pb, leaves, greedy[1], budget) or greedy


def _chain(pb: _Problem, parts: Sequence[int], budget: list[int]) -> Leaf:
    """The chain path of a product fused from networks holding ``parts`` factors each (in factor order; operand 0
    is the input): the networks applied one at a time from the last, each along its own best tree; or from the
    first, for a transposed product. The cheaper of the two."""
    starts = [1 + sum(parts[:k]) for k in range(len(parts))]
    groups = [list(range(a, a + c)) for a, c in zip(starts, parts)]

    def applied(order: list[list[int]]) -> Leaf:
        current = pb.operand(0)
        for group in order:
            if group:
                current = _best_tree(pb, [current, *map(pb.operand, group)], budget)
        return current

    return min((applied(groups[::-1]), applied(groups)), key=lambda leaf: leaf[1])


def _linear(tree: Tree, count: int) -> list[tuple[int, ...]]:
    """A tree as opt_einsum's path: positions in the list of remaining operands, each result appended."""
    remaining = list(range(count))
    path: list[tuple[int, ...]] = []

    def visit(t: Tree) -> int:
        if isinstance(t, int):
            return t
        ids = [visit(sub) for sub in t]
        path.append(tuple(sorted(remaining.index(i) for i in ids)))
        for i in ids:
            remaining.remove(i)
        remaining.append(count + len(path))  # a fresh id
        return remaining[-1]

    visit(tree)
    return path


def path_cost(equation: str, shapes: Sequence[Sequence[int]], path: Sequence[Sequence[int]]) -> int:
    """opt_einsum's ``opt_cost`` of ``path`` for ``equation``, counted from bit masks (no path is searched).

    Example:
        >>> path_cost("za,ab,bc->zc", [(1, 8), (8, 2), (2, 8)], [(0, 1), (0, 1)])  # (1x8)(8x2), then (1x2)(2x8)
        64
    """
    pb = _Problem(equation, shapes)
    items = [(1 << k, labels) for k, labels in enumerate(pb.inputs)]
    total = 0
    for step in path:
        picked = [items[k] for k in step]
        items = [it for k, it in enumerate(items) if k not in step]
        ops = union = 0
        for op, labels in picked:
            ops |= op
            union |= labels
        legs = pb.legs(ops)
        total += pb.size(union) * (max(1, len(picked) - 1) + (1 if union & ~legs else 0))
        items.append((ops, legs))
    return total


def best_path(equation: str, shapes: Sequence[Sequence[int]], parts: Sequence[int] = ()) -> tuple[Any, Any]:
    """opt_einsum's ``(path, PathInfo)`` for the cheapest of the candidates in the module doc.

    ``parts``: for a fused product, how many factors each network of the product holds, in factor order (operand
    0 is the input); the chain of those networks is then a candidate. Deterministic: it depends on shapes only.

    Example:
        >>> eq = "za,ab,bc,cd,de->ze"  # x @ (8x2) @ (2x8) @ (8x2) @ (2x8) at batch 1: one vector-matrix product each
        >>> path, info = best_path(eq, [(1, 8), (8, 2), (2, 8), (8, 2), (2, 8)])
        >>> int(info.opt_cost)
        128
    """
    count = len(shapes)
    if count <= 2:
        return oe.contract_path(equation, *shapes, shapes=True, optimize="optimal")
    pb = _Problem(equation, shapes)
    budget = [SEARCH_STEPS]
    inputs, output = equation.split("->")
    sizes = {c: int(s) for term, shape in zip(inputs.split(","), shapes) for c, s in zip(term, shape)}
    greedy = [tuple(step) for step in oe.paths.greedy([set(t) for t in inputs.split(",")], set(output), sizes)]
    best, cap = greedy, path_cost(equation, shapes, greedy)
    if len(parts) > 1 and sum(parts) == count - 1:
        chain = _chain(pb, parts, budget)
        if chain[1] < cap:
            best, cap = _linear(chain[2], count), chain[1]
    found = _search(pb, [pb.operand(k) for k in range(count)], cap, budget)
    if found is not None:
        best = _linear(found[2], count)
    return oe.contract_path(equation, *shapes, shapes=True, optimize=best)
