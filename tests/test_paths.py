"""Contraction paths of fused networks: optimal where affordable, never worse than applying the parts one at a time.

FLOPs are opt_einsum's ``opt_cost``: a step joining two tensors whose labels together have ``U`` elements costs
``2 U`` when it sums a label away and ``U`` when it does not (an outer product). The references are opt_einsum's own
searches on the same equation (``optimal``; ``dp`` with outer products for more operands) and the chain: the sum of
the parts' costs, each planned on its own.
"""

from __future__ import annotations

import functools
import operator
from collections import Counter

import opt_einsum as oe
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_dense

import structmat as sm
from structmat.core import paths as _paths

F64 = torch.float64


def product(ops: list[sm.LinearOperator]) -> sm.LinearOperator:
    return functools.reduce(operator.matmul, ops)


def chained(ops: list[sm.LinearOperator], batch: int) -> int:
    """What applying the parts one at a time costs: each part's own plan, summed."""
    return sum(op.cost(batch).flops for op in ops)


def reference_cost(equation: str, shapes: tuple[tuple[int, ...], ...]) -> int:
    """opt_einsum's exhaustive search (up to 7 operands), else its dynamic program with outer products allowed."""
    optimize = "optimal" if len(shapes) <= 7 else oe.DynamicProgramming(search_outer=True)
    return int(oe.contract_path(equation, *shapes, shapes=True, optimize=optimize)[1].opt_cost)


def has_own_labels(equation: str) -> bool:
    """A label only one operand has and the output lacks: opt_einsum's ``optimal`` counts its sum differently from
    ``opt_cost`` (not as a summing step), so it may miss the cheapest path by ``opt_cost``."""
    lhs, rhs = equation.split("->")
    return any(k == 1 and c not in rhs for c, k in Counter(lhs.replace(",", "")).items())


def alternating_dense(count: int, wide: int, narrow: int) -> list[sm.LinearOperator]:
    """``Dense(wide, narrow) @ Dense(narrow, wide) @ ...``, ``count`` of them."""
    dims = [wide if k % 2 == 0 else narrow for k in range(count + 1)]
    return [sm.Dense(dims[k], dims[k + 1], device="meta") for k in range(count)]


# -- (a) hand-derived cases ------------------------------------------------------------------------------------------
def test_ten_dense_alternating_at_batch_1_costs_320():
    # x is one vector of 8. Applied right to left, each Dense is a matrix-vector product with 8 * 2 = 16
    # multiply-adds (Dense(2, 8) on an 8-vector, or Dense(8, 2) on a 2-vector): 32 FLOPs, ten of them: 320.
    # Nothing is cheaper: each of the 10 matrices (16 entries) must meet the vector or another matrix in a step
    # that sums a label, and a step reading a 16-entry matrix costs at least 2 * 16. The fused network has 11
    # operands; the old planner ran greedy there and counted 464.
    ops = alternating_dense(10, 8, 2)
    cost = product(ops).cost(batch=1)
    assert len(cost.contractions) == 1
    assert cost.flops == 320 == chained(ops, 1)
    c = cost.contractions[0]
    assert reference_cost(c.equation, c.shapes) == 320


@pytest.mark.parametrize("batch, expected", [(4, 592), (32, 2416)])
def test_ten_dense_alternating_at_larger_batches_is_optimal(batch, expected):
    # At larger batches pairs (8x2)(2x8) are not formed but (2x8)(8x2) = 2x2 blocks are worth forming once: the
    # optimum (opt_einsum's dp with outer products: 592 and 2416; greedy: 704 and 2944) is far below the chain.
    ops = alternating_dense(10, 8, 2)
    cost = product(ops).cost(batch=batch)
    c = cost.contractions[0]
    assert cost.flops == expected == reference_cost(c.equation, c.shapes)
    assert cost.flops < chained(ops, batch) == 10 * 32 * batch


def test_rank_one_pieces_use_outer_products():
    # Dense(12,1) @ Dense(1,12) @ Dense(12,1) @ Dense(1,12) @ Dense(12,1) @ Dense(1,12) at batch 5. The size-1 labels
    # are squeezed out of the fused network, so it falls apart: x with F, B with C, D with E, and A alone.
    # The optimum, step by step (a step summing a label costs 2 U, one that does not costs U):
    #   x[5,12] F[1,12] -> [5]        U = 5*12 = 60,  summed:     120
    #   B[1,12] C[12,1] -> scalar     U = 12,         summed:      24
    #   D[1,12] E[12,1] -> scalar     U = 12,         summed:      24
    #   scalar * scalar               U = 1,          outer:        1
    #   A[12,1] * scalar -> [12]      U = 12,         summed (A's size-1 label):  24
    #   [5] outer [12] -> [5,12]      U = 60,         outer:       60
    # Total 253. The chain costs 6 * 2 * 5 * 12 = 720; the old planner (dp without outer products) counted 378.
    dims = [12, 1, 12, 1, 12, 1, 12]
    ops = [sm.Dense(dims[k], dims[k + 1], device="meta") for k in range(6)]
    cost = product(ops).cost(batch=5)
    assert len(cost.contractions) == 1
    assert cost.flops == 120 + 24 + 24 + 1 + 24 + 60 == 253
    assert chained(ops, 5) == 720
    c = cost.contractions[0]
    assert cost.flops <= reference_cost(c.equation, c.shapes)


def test_four_three_core_btts_at_batch_32_cost_no_more_than_their_chain():
    # Four BTT(64, 64) of 3 cores (4, 4, 4), bond 2: 13 operands fused. The old greedy plan counted 630784,
    # 20% over the chain's 4 * 131072 = 524288, which is also opt_einsum's dp optimum (outer products allowed).
    ops = [sm.BTT(64, 64, ranks=2, in_factors=(4, 4, 4), out_factors=(4, 4, 4), device="meta") for _ in range(4)]
    assert [op.cost(32).flops for op in ops] == [131072] * 4
    cost = product(ops).cost(batch=32)
    c = cost.contractions[0]
    assert len(c.shapes) == 13
    assert cost.flops == 524288 == reference_cost(c.equation, c.shapes)


def test_sixteen_part_kronecker_plans_part_by_part():
    # kron of 16 Dense(2, 2) on one vector of 2^16: each part is applied to a tensor of 2^16 entries, a step whose
    # labels hold 2^16 * 2 elements and sum one: 2 * 2^17 = 2^18 FLOPs, 16 of them: 2^22. (Planning must stay in
    # milliseconds; exhaustive searches over 17 operands take minutes.)
    op = sm.kron(*[sm.Dense(2, 2, device="meta") for _ in range(16)])
    cost = op.cost(batch=1)
    assert len(cost.contractions) == 1
    assert cost.flops == 16 * 2**18 == 2**22


def test_chain_bounds_the_cost_when_the_searches_are_off(monkeypatch):
    # With the exact searches disabled only greedy (464 here) and the chain (320) are left: the chain wins, for the
    # product and for its transpose (whose parts apply in the other order).
    monkeypatch.setattr(_paths, "EXACT_OPERANDS", 2)
    monkeypatch.setattr(_paths, "SEARCH_STEPS", 0)
    ops = alternating_dense(10, 8, 2)
    assert product(ops).cost(batch=1).flops == 320
    assert product(ops).T.cost(batch=1).flops == chained([op.T for op in ops], 1) == 320


# -- (b) random products against opt_einsum's searches and the chain -------------------------------------------------
SPLITS = {6: (2, 3), 12: (3, 4), 4: (2, 2)}
KINDS = ["dense", "lowrank", "network", "btt", "kron"]


def build(kind: str, m: int, n: int, rank: int, device: str, dtype: torch.dtype | None = None) -> sm.LinearOperator:
    """An operator of ``kind`` with shape (m, n); Dense where the shape does not allow the kind."""
    kw = dict(device=device, dtype=dtype)
    if kind == "lowrank" and min(m, n) > 1:
        return sm.LowRank(m, n, rank=min(rank, m, n), **kw)
    if kind == "network":
        spec = "y[o] = A[o,r] B[r,s] C[s,i] x[i]"
        return sm.TensorNetwork(spec, sizes=dict(o=m, r=rank, s=rank + 1, i=n), **kw)
    if kind == "btt" and m in SPLITS and n in SPLITS:
        return sm.BTT(m, n, ranks=rank, in_factors=SPLITS[n], out_factors=SPLITS[m], **kw)
    if kind == "kron" and m in SPLITS and n in SPLITS:
        (m1, m2), (n1, n2) = SPLITS[m], SPLITS[n]
        return sm.kron(sm.Dense(m1, n1, **kw), sm.Dense(m2, n2, **kw))
    return sm.Dense(m, n, **kw)


@st.composite
def products(draw, device: str = "meta", dtype: torch.dtype | None = None) -> list[sm.LinearOperator]:
    count = draw(st.integers(2, 4))
    dims = draw(st.lists(st.sampled_from([1, 3, 4, 5, 6, 7, 12]), min_size=count + 1, max_size=count + 1))
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=count, max_size=count))
    ranks = draw(st.lists(st.integers(1, 3), min_size=count, max_size=count))
    return [build(k, dims[j], dims[j + 1], r, device, dtype) for j, (k, r) in enumerate(zip(kinds, ranks))]


@settings(max_examples=80)
@given(products(), st.sampled_from([1, 3, 32]), st.booleans())
def test_fused_cost_is_optimal_and_never_worse_than_the_chain(ops, batch, transposed):
    if transposed:
        ops = [op.T for op in reversed(ops)]
    cost = product(ops).cost(batch)
    assert cost.flops <= chained(ops, batch)
    if len(cost.contractions) != 1:  # did not fuse (splits that do not refine): a chain by construction
        return
    c = cost.contractions[0]
    assert c.flops == _paths.path_cost(c.equation, c.shapes, c.path)  # the counted path is the one planned
    assert c.flops == oe.contract_path(c.equation, *c.shapes, shapes=True, optimize=list(c.path))[1].opt_cost
    if len(c.shapes) <= 9:
        ref = reference_cost(c.equation, c.shapes)
        assert c.flops <= ref
        if len(c.shapes) <= 7 and not has_own_labels(c.equation):
            assert c.flops == ref


def test_planned_paths_match_optimal_on_random_einsums():
    # Random connected-or-not networks of 3..7 operands (sizes 1..7, so some split apart on size-1 labels): the
    # planner finds opt_einsum's optimum by opt_cost, or better where ``optimal`` counts own-label sums differently.
    gen = torch.Generator().manual_seed(0)

    def rand(hi: int) -> int:
        return int(torch.randint(hi, (1,), generator=gen))

    for trial in range(60):
        count = 3 + trial % 5
        terms: list[list[str]] = [[] for _ in range(count)]
        sizes: dict[str, int] = {"z": [1, 3, 32][trial % 3]}
        out = ["z"]
        for j in range(1, count):
            for i in {rand(j), rand(count)} - {j}:
                c = f"l{len(sizes)}"
                terms[i].append(c)
                terms[j].append(c)
                sizes[c] = 1 + rand(7)
        for j in range(count):
            if rand(3) == 0 or not terms[j]:
                c = f"l{len(sizes)}"
                terms[j].append(c)
                sizes[c] = 2 + rand(6)
                out.append(c)
        symbols = {c: oe.get_symbol(k) for k, c in enumerate(sizes)}
        equation = (
            ",".join("".join(symbols[c] for c in (["z"] if j == 0 else []) + t) for j, t in enumerate(terms))
            + "->"
            + "".join(symbols[c] for c in out)
        )
        shapes = [tuple(sizes[c] for c in (["z"] if j == 0 else []) + t) for j, t in enumerate(terms)]
        path, info = _paths.best_path(equation, shapes)
        ref = reference_cost(equation, tuple(shapes))
        assert info.opt_cost <= ref, (equation, shapes)
        if not has_own_labels(equation):
            assert info.opt_cost == ref, (equation, shapes)


# -- (c) the planned paths compute the product ------------------------------------------------------------------------
@settings(max_examples=40)
@given(products(device="cpu", dtype=F64), st.sampled_from([1, 3, 5]), st.booleans())
def test_fused_products_apply_as_the_dense_product(ops, batch, transposed):
    if transposed:
        ops = [op.T for op in reversed(ops)]
    dense = functools.reduce(torch.matmul, [reference_dense(op) for op in ops])
    x = torch.randn(batch, dense.shape[1], dtype=F64)
    torch.testing.assert_close(product(ops)(x), x @ dense.T)


def test_chain_path_of_a_transposed_product_applies_correctly(monkeypatch):
    # The chain path (searches off) runs the parts in the other order for the transpose; both still compute W x.
    monkeypatch.setattr(_paths, "EXACT_OPERANDS", 2)
    monkeypatch.setattr(_paths, "SEARCH_STEPS", 0)
    dims = [5, 3, 7, 2, 12]
    ops = [sm.Dense(dims[k], dims[k + 1], dtype=F64) for k in range(4)]
    dense = functools.reduce(torch.matmul, [op.weight.detach() for op in ops])
    x = torch.randn(3, 12, dtype=F64)
    torch.testing.assert_close(product(ops)(x), x @ dense.T)
    xt = torch.randn(3, 5, dtype=F64)
    torch.testing.assert_close(product(ops).T(xt), xt @ dense)


def test_path_cost_matches_opt_einsum():
    eq, shapes = "za,ab,bc->zc", [(3, 5), (5, 7), (7, 2)]
    for path in ([(0, 1), (0, 1)], [(1, 2), (0, 1)], [(0, 2), (0, 1)]):
        assert (
            _paths.path_cost(eq, shapes, path) == oe.contract_path(eq, *shapes, shapes=True, optimize=path)[1].opt_cost
        )
