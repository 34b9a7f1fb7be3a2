"""Constant-aware planning (structmat.core.freeze): the frozen execution against the ordinary plan, in float64.

Every network of every zoo operator, stacks of heads (shared and per-head inputs), the hand-derived flops of a
three-factor chain, the memory limit, cache invalidation, and the gradient rule. Sizes are distinct (3, 5, 7, 12)
so that a swapped axis fails.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import zoo
from zoo import ZOO, build

import structmat as sm
from structmat.core import freeze as fz
from structmat.core.nodes import NetNode

F64 = torch.float64
NAMES = sorted(ZOO)


def dense(m: int, n: int, heads: int | None = None) -> sm.Dense:
    return sm.Dense(m, n, heads=heads, dtype=F64)


def chain(heads: int | None = None) -> sm.LinearOperator:
    """``A (12x3) @ B (3x5) @ C (5x12)``: per row 2 * (60 + 15 + 36) flops, 2 * (36 + 36) with B @ C kept."""
    return dense(12, 3, heads) @ dense(3, 5, heads) @ dense(5, 12, heads)


def nets(op: sm.LinearOperator) -> list[NetNode]:
    return list(fz._net_nodes(op._node))


def frozen_runs(node: NetNode, x: torch.Tensor) -> torch.Tensor | None:
    """try_frozen as inference mode would call it (grad off)."""
    with torch.no_grad():
        return fz.try_frozen(node, x)


# -- values: every network of every zoo operator --------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("batch", [1, 3, 64])
def test_zoo_networks_match_ordinary(name, batch):
    op = build(name)
    for node in nets(op):
        x = torch.randn(batch, node.n, dtype=F64)
        expected = node.apply(x)
        with torch.inference_mode():
            got = fz.frozen_apply(node, x)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            got = fz.frozen_apply(node, x)  # the explicit freeze: grad off, not inference mode
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_zoo_operators_match_ordinary(name):
    op = build(name)
    x = torch.randn(3, op.shape[1], dtype=F64)
    expected = op._node.apply(x)
    with torch.inference_mode():
        torch.testing.assert_close(fz.frozen_apply(op._node, x), expected, rtol=1e-12, atol=1e-12)


def test_zoo_takes_the_frozen_path_where_it_is_cheaper():
    """The equality tests above are not vacuous: these networks run frozen (their constant-aware tree is cheaper)."""
    for name in ["tn_tt3", "btt3", "tt", "product_refined", "difference"]:
        op = build(name)
        node = nets(op)[0]
        x = torch.randn(3, node.n, dtype=F64)
        assert frozen_runs(node, x) is not None, name
        assert fz.cached_elements(node) > 0, name


def test_frozen_tree_costs_what_the_reduced_network_runs():
    """The search's per-call flops are the reduced network's planned cost (the path it runs)."""
    for name in NAMES:
        for node in nets(build(name)):
            for batch in (1, 7, 64):
                path = fz.constant_aware_path(node, batch)
                if path is None:
                    continue
                assert path.flops <= path.ordinary_flops, name
                cost = fz.frozen_cost(node, batch)
                assert cost.flops == (path.flops if path.chosen else path.ordinary_flops), (name, batch)
                assert (frozen_runs(node, torch.randn(batch, node.n, dtype=F64)) is not None) == path.chosen


# -- stacks of heads --------------------------------------------------------------------------------------------------
STACKS = {name: (lambda make=make: make(3)) for name, make in zoo.STACKS.items()}  # the registry's, 3 heads


@pytest.mark.parametrize("name", sorted(STACKS))
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("per_head", [False, True])
def test_stacks_match_ordinary(name, batch, per_head):
    torch.manual_seed(0)
    op = STACKS[name]()
    for node in nets(op):
        x = torch.randn(batch, 3, node.n, dtype=F64) if per_head else torch.randn(batch, node.n, dtype=F64)
        expected = node.apply(x)
        with torch.inference_mode():
            got = fz.frozen_apply(node, x)
        assert got.shape == expected.shape == (batch, 3, node.m)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_stack_chain_runs_frozen_with_heads_in_the_pieces():
    op = chain(heads=3)
    (node,) = nets(op)
    for per_head in (False, True):
        path = fz.constant_aware_path(node, 5, per_head=per_head)
        assert path.flops == 3 * 2 * (36 + 36) * 5  # per head: the B @ C piece, then A
        assert path.ordinary_flops == node.cost(5, 3 if per_head else 0).flops > path.flops
        x = torch.randn(5, 3, 12, dtype=F64) if per_head else torch.randn(5, 12, dtype=F64)
        assert frozen_runs(node, x) is not None


def test_single_operator_folds_heads_of_the_input():
    op = chain()
    (node,) = nets(op)
    x = torch.randn(5, 3, 12, dtype=F64)  # (B, H, n) into a single operator: every head alike
    got = frozen_runs(node, x)
    assert got is not None and got.shape == (5, 3, 12)
    torch.testing.assert_close(got, node.apply(x), rtol=1e-12, atol=1e-12)


# -- flops -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 8, 1000])
def test_hand_derived_flops_of_a_three_dense_chain(batch):
    op = sm.Dense(64, 16) @ sm.Dense(16, 16) @ sm.Dense(16, 64)
    (node,) = nets(op)
    path = fz.constant_aware_path(node, batch)
    assert path.flops == 2 * (64 * 16 + 16 * 64) * batch
    assert path.ordinary_flops == node.cost(batch).flops
    if batch < 1000:  # at a large batch the ordinary plan contracts the two right factors too, on every call
        assert path.ordinary_flops == 2 * (64 * 16 + 16 * 16 + 16 * 64) * batch
    else:
        assert path.ordinary_flops == 2 * (64 * 16 + 16 * 64) * batch + 2 * 16 * 16 * 64
    assert path.cheaper and path.contracted
    assert sorted(path.piece_elements) == [64 * 16, 16 * 64]
    assert path.once_flops == 16 * 16 * 64 * 2  # the 16x16 @ 16x64 product, once
    cost = fz.frozen_cost(node, batch)
    assert cost.shape == (64, 64) and cost.batch == batch
    if batch < 1000:
        assert path.chosen and cost.flops == 2 * (64 * 16 + 16 * 64) * batch
    else:  # the ordinary plan does the same per-row work plus 32768 flops per call: under MIN_SAVING, kept
        assert not path.chosen and cost == node.cost(batch)


def test_frozen_tree_does_not_depend_on_the_batch():
    (node,) = nets(chain())
    paths = [fz.constant_aware_path(node, b) for b in (1, 2, 64, 10_000)]
    assert len({(p.pieces, p.trees) for p in paths}) == 1
    assert [p.flops for p in paths] == [2 * 72 * b for b in (1, 2, 64, 10_000)]


@pytest.mark.parametrize("batch", [1, 64, 4096])
@pytest.mark.parametrize(
    "make",
    [
        lambda: sm.LowRank(12, 7, rank=3, dtype=F64),
        lambda: sm.Kronecker.from_sizes((3, 5), (4, 7), dtype=F64),
        lambda: sm.Monarch(12, 12, nblocks=3, dtype=F64),
        lambda: sm.BTT(12, 20, ranks=2, dtype=F64),
    ],
)
def test_ordinary_plan_kept_when_no_cheaper(make, batch):
    """Nothing to gain (the ordinary plan contracts no factors together): no pieces, the ordinary plan runs."""
    for node in nets(make()):
        path = fz.constant_aware_path(node, batch)
        assert path.flops == path.ordinary_flops and not path.cheaper and not path.chosen
        x = torch.randn(batch, node.n, dtype=F64)
        assert frozen_runs(node, x) is None
        assert fz.cached_elements(node) == 0
        assert fz.frozen_cost(node, batch) == node.cost(batch)


def test_small_savings_keep_the_ordinary_plan():
    """Folding a scale saves 5 of 75 flops: under MIN_SAVING, not worth a copy of the factor and the version check."""
    (node,) = nets(build("scaled"))
    path = fz.constant_aware_path(node, 1)
    assert path.cheaper and not path.chosen and (path.flops, path.ordinary_flops) == (70, 75)
    assert frozen_runs(node, torch.randn(1, 7, dtype=F64)) is None


# -- memory limit ------------------------------------------------------------------------------------------------------
def test_default_memory_limit_is_respected_across_the_zoo():
    for name in NAMES:
        for node in nets(build(name)):
            path = fz.constant_aware_path(node, 4)
            if path is None:
                continue
            assert path.limit == fz.memory_limit(node.network)
            for piece, size in zip(path.pieces, path.piece_elements):
                if piece & (piece - 1):  # two or more factors
                    assert size <= path.limit, name


def test_memory_limit_binds():
    (node,) = nets(chain())
    assert fz.memory_limit(node.network) == max(4 * (36 + 15 + 60), 144)
    free = fz.constant_aware_path(node, 3, limit=36)
    assert free.flops == 2 * 72 * 3 and max(free.piece_elements) == 36
    tight = fz.constant_aware_path(node, 3, limit=35)  # B @ C (3x12) no longer fits; A @ B (12x5) neither
    assert not tight.contracted and tight.flops == tight.ordinary_flops == 2 * 111 * 3
    assert all(size <= 60 for size in tight.piece_elements)  # single factors, as they are


# -- caching and invalidation ----------------------------------------------------------------------------------------
def test_cache_invalidates_after_in_place_update():
    op = chain()
    (node,) = nets(op)
    x = torch.randn(5, 12, dtype=F64)
    first = frozen_runs(node, x)
    torch.testing.assert_close(first, node.apply(x))
    held = fz.cached_elements(node)
    assert held > 0
    again = frozen_runs(node, x)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    for p in op.parameters():
        with torch.no_grad():
            p.add_(1)
        got = frozen_runs(node, x)
        torch.testing.assert_close(got, node.apply(x), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(got, first)
    assert fz.cached_elements(node) == held  # recomputed, not accumulated


def test_cache_invalidates_after_load_state_dict():
    torch.manual_seed(1)
    op, other = chain(), chain()
    (node,) = nets(op)
    x = torch.randn(5, 12, dtype=F64)
    before = frozen_runs(node, x)
    op.load_state_dict(other.state_dict())
    got = frozen_runs(node, x)
    torch.testing.assert_close(got, other._node.apply(x), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, before)


def test_cache_follows_dtype_and_replaced_parameters():
    op = chain()
    (node,) = nets(op)
    x = torch.randn(5, 12, dtype=F64)
    frozen_runs(node, x)
    op.float()  # new storage and dtype
    got = frozen_runs(node, x.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, node.apply(x.float()))
    first = op.factors[0]
    first.weight = torch.nn.Parameter(torch.randn_like(first.weight))  # a new tensor object
    torch.testing.assert_close(frozen_runs(node, x.float()), node.apply(x.float()))


def test_pieces_made_under_autocast_keep_the_factors_dtype():
    torch.manual_seed(2)
    op = dense(12, 3).float() @ dense(3, 5).float() @ dense(5, 12).float()
    (node,) = nets(op)
    x = torch.randn(5, 12)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = fz.try_frozen(node, x.bfloat16())
    assert low is not None and low.dtype == torch.bfloat16
    state = node.__dict__["_freeze"]
    assert all(t.dtype == torch.float32 for t in state.pieces.values())
    torch.testing.assert_close(frozen_runs(node, x), node.apply(x))  # float32 pieces, not bfloat16 ones


def test_parametrized_factor_is_kept_and_recomputed_on_change():
    """A computed factor runs frozen even without fewer flops: its value is kept instead of recomputed."""
    op = sm.LowRank(7, 5, rank=3, dtype=F64)
    (node,) = nets(op)
    name = node.network.factors[0].name
    owner = node.network.factors[0].owner
    torch.nn.utils.parametrizations.orthogonal(owner, name)
    x = torch.randn(3, 5, dtype=F64)
    got = frozen_runs(node, x)
    assert got is not None
    torch.testing.assert_close(got, node.apply(x), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        owner.parametrizations[name].original.add_(0.5)
    torch.testing.assert_close(frozen_runs(node, x), node.apply(x), rtol=1e-12, atol=1e-12)


def test_pruned_factor_follows_its_mask():
    op = dense(5, 7)
    (node,) = nets(op)
    owner, name = node.network.factors[0].owner, node.network.factors[0].name
    torch.nn.utils.prune.random_unstructured(owner, name, amount=0.3)
    x = torch.randn(3, 7, dtype=F64)
    torch.testing.assert_close(frozen_runs(node, x), node.apply(x), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        getattr(owner, name + "_mask").zero_()
    got = frozen_runs(node, x)
    torch.testing.assert_close(got, torch.zeros_like(got))


def test_inference_tensor_parameters_keep_the_ordinary_plan():
    with torch.inference_mode():
        op = chain()  # parameters without version counters: their updates could not be seen
        (node,) = nets(op)
        x = torch.randn(5, 12, dtype=F64)
        assert fz.try_frozen(node, x) is None
        torch.testing.assert_close(fz.frozen_apply(node, x), node.apply(x))


def test_release_and_copies():
    op = chain()
    (node,) = nets(op)
    x = torch.randn(5, 12, dtype=F64)
    expected = frozen_runs(node, x)
    for clone in (copy.deepcopy(op), pickle.loads(pickle.dumps(op))):
        (cnode,) = nets(clone)
        torch.testing.assert_close(frozen_runs(cnode, x), expected, rtol=0, atol=0)
    fz.release(op._node)
    assert fz.cached_elements(node) == 0
    torch.testing.assert_close(frozen_runs(node, x), expected, rtol=0, atol=0)


# -- gradients ---------------------------------------------------------------------------------------------------------
def test_grad_enabled_with_trainable_weights_runs_the_ordinary_plan():
    """Never a detached result: with grad on and weights requiring grad, the ordinary plan runs."""
    op = chain()
    (node,) = nets(op)
    x = torch.randn(5, 12, dtype=F64, requires_grad=True)
    assert fz.try_frozen(node, x) is None
    y = fz.frozen_apply(node, x)
    assert y.requires_grad
    y.square().sum().backward()
    grads = [p.grad.clone() for p in op.parameters()]
    xgrad = x.grad.clone()
    op.zero_grad()
    x.grad = None
    node.apply(x).square().sum().backward()
    for g, p in zip(grads, op.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=0, atol=0)
    torch.testing.assert_close(xgrad, x.grad, rtol=0, atol=0)


def test_grad_through_the_input_with_constant_weights():
    """Weights not requiring grad: the frozen execution runs and x gets its exact gradient through the pieces."""
    op = chain().requires_grad_(False)
    (node,) = nets(op)
    x = torch.randn(5, 12, dtype=F64, requires_grad=True)
    y = fz.try_frozen(node, x)
    assert y is not None and y.requires_grad
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    x2 = x.detach().requires_grad_(True)
    (ref,) = torch.autograd.grad(node.apply(x2).square().sum(), x2)
    torch.testing.assert_close(gx, ref, rtol=1e-12, atol=1e-12)


def test_pieces_made_in_inference_mode_serve_autograd_later():
    op = chain().requires_grad_(False)
    (node,) = nets(op)
    x = torch.randn(5, 12, dtype=F64)
    with torch.inference_mode():
        fz.frozen_apply(node, x)  # pieces computed here
    x = x.requires_grad_(True)
    y = fz.try_frozen(node, x)
    assert y is not None
    (gx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(gx, op.dense(F64).sum(0).expand(5, 12))


# -- errors ------------------------------------------------------------------------------------------------------------
def test_errors():
    (node,) = nets(chain())
    with pytest.raises(ValueError, match="per_head=True needs a stack"):
        fz.constant_aware_path(node, 3, per_head=True)
    with pytest.raises(TypeError, match="expected a NetNode or a Network, got SumNode"):
        fz.constant_aware_path(build("sum")._node, 3)
    assert fz.constant_aware_path(sm.Identity(4)._node, 3) is None  # nothing to contract


# -- the wired entry points --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_inference_mode_matches_ordinary(name):
    op = build(name)
    x = torch.randn(3, op.shape[1], dtype=F64)
    expected = op(x)
    with torch.inference_mode():
        got = op(x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_freeze_and_unfreeze():
    op = chain()
    (node,) = nets(op)
    x = torch.randn(5, 12, dtype=F64)
    expected = op(x)
    ordinary = op.cost(5).flops
    assert op.freeze() is op and op.frozen and node.frozen
    assert op.cost(5).flops == 2 * 72 * 5 < ordinary
    with torch.no_grad():
        torch.testing.assert_close(op(x), expected, rtol=1e-12, atol=1e-12)
    assert fz.cached_elements(node) > 0
    # grad on, weights trainable: the ordinary plan, gradients intact
    y = op(x)
    y.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in op.parameters())
    op.unfreeze()
    assert not op.frozen and fz.cached_elements(node) == 0 and op.cost(5).flops == ordinary


def test_freeze_reaches_nested_operators():
    inner = chain()
    outer = sm.block_diag(inner, dense(5, 7))
    outer.freeze()
    assert inner.frozen and all(nd.frozen for nd in nets(outer))
    x = torch.randn(4, 19, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(outer(x), outer.unfreeze()(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(STACKS))
def test_inference_mode_stacks(name):
    torch.manual_seed(3)
    op = STACKS[name]()
    x = torch.randn(4, 3, op.shape[1], dtype=F64)
    for per_head in (False, True):
        expected = op(x, per_head=per_head)
        with torch.inference_mode():
            got = op(x, per_head=per_head)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
