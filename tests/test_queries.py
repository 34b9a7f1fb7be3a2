"""Queries and module behaviour: numerical rank without the dense matrix, parameter counts, plan caching,
state_dict, dtype moves, autocast, torch.compile, printing, and the Python operator protocol."""

from __future__ import annotations

import copy
import warnings

import opt_einsum
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from zoo import ZOO
from zoo import build as build_zoo

import structmat as sm
from structmat.core import nodes as _nodes

F64 = torch.float64
BIG = 10**6


@pytest.fixture
def no_dense(monkeypatch):
    """Make ``LinearOperator.dense`` raise, and count how often something tried to call it."""
    calls = []

    def refuse(self, dtype=None):
        calls.append(self.name)
        raise AssertionError(f"dense() called on {self.name}")

    monkeypatch.setattr(sm.LinearOperator, "dense", refuse)
    return calls


def _big_low_rank(seed: int = 0) -> tuple[sm.LinearOperator, sm.Dense, sm.Dense]:
    torch.manual_seed(seed)
    u = sm.Dense(BIG, 4, dtype=torch.float32)
    v = sm.Dense(4, BIG, dtype=torch.float32)
    return u @ v, u, v


def test_numerical_rank_of_a_huge_low_rank_operator(no_dense):
    # 10^6 x 10^6 in float32 is 4 TB: the answer must come from the thin factors.
    op, _, _ = _big_low_rank()
    assert op.shape == (BIG, BIG)
    assert op.rank().bound == 4
    assert sm.numerical_rank(op) == 4
    assert no_dense == []


def test_numerical_rank_of_a_huge_operator_with_a_dead_direction(no_dense):
    # Zero the third column of U (equivalently the third rank-one term u_3 v_3^T): rank 3.
    op, u, _ = _big_low_rank(seed=1)
    with torch.no_grad():
        u.weight[:, 2] = 0.0
    assert sm.numerical_rank(op) == 3
    assert op.rank().bound == 4  # the structural bound does not look at the values
    assert no_dense == []


def test_numerical_rank_of_a_huge_operator_with_a_dead_row_of_v(no_dense):
    op, _, v = _big_low_rank(seed=2)
    with torch.no_grad():
        v.weight[1] = 0.0
    assert sm.numerical_rank(op) == 3
    assert no_dense == []


def _spectrum_operator(s: list[float]) -> sm.LinearOperator:
    """U diag(s) V^T of shape (7, 5) with orthonormal U (7, 3), V (5, 3): singular values exactly s (to rounding)."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(7, 3, dtype=F64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(5, 3, dtype=F64, generator=g))
    return sm.Dense.from_tensor(u * torch.tensor(s, dtype=F64)) @ sm.Dense.from_tensor(v.T.contiguous())


@pytest.mark.parametrize("rtol, expected", [(None, 3), (0.0, 3), (1e-8, 3), (1e-5, 2), (1e-2, 1), (2.0, 0)])
def test_numerical_rank_with_rtol_through_the_thin_cut(rtol, expected, no_dense):
    op = _spectrum_operator([1.0, 1e-3, 1e-6])
    assert op.rank().bound == 3 < min(op.shape)  # the thin path, not the dense one
    assert sm.numerical_rank(op, rtol=rtol) == expected


@pytest.mark.parametrize("rtol, expected", [(None, 3), (1e-4, 2), (1e-2, 1)])
def test_numerical_rank_with_rtol_dense(rtol, expected):
    op = sm.Diagonal.from_tensor(torch.tensor([1.0, 1e-3, 1e-6], dtype=F64))
    assert sm.numerical_rank(op, rtol=rtol) == expected


def test_num_params_counts_a_shared_parameter_once():
    a = sm.Dense(5, 5)
    assert (a + a.T).num_params == 25
    assert (a @ a + a).num_params == 25
    assert (a + sm.Dense(5, 5)).num_params == 50


@pytest.fixture
def plan_counter(monkeypatch):
    """Count opt_einsum.contract_path calls made by the execution nodes."""
    calls = []
    original = opt_einsum.contract_path

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(_nodes.oe, "contract_path", counting)
    if hasattr(_nodes, "contract_path"):
        monkeypatch.setattr(_nodes, "contract_path", counting)
    return calls


def test_plans_are_cached(plan_counter):
    op = sm.Dense(5, 3, dtype=F64) @ sm.Dense(3, 7, dtype=F64)  # one network
    x = torch.randn(4, 7, dtype=F64)
    y1 = op(x)
    assert len(plan_counter) == 1
    y2 = op(x + 1.0)
    assert len(plan_counter) == 1  # same batch: no new plan
    torch.testing.assert_close(y2 - y1, op(torch.ones(4, 7, dtype=F64)))  # the plan is used with fresh data
    assert len(plan_counter) == 1
    op(torch.randn(6, 7, dtype=F64))
    assert len(plan_counter) == 2  # a new batch size plans once more
    op(torch.randn(2, 3, 7, dtype=F64))  # leading dims (2, 3) flatten to the batch 6 already planned
    op(torch.randn(6, 7, dtype=F64))
    assert len(plan_counter) == 2
    op.cost(batch=4)  # a cost query at a planned batch reuses the plan
    assert len(plan_counter) == 2


def test_changing_parameter_values_does_not_replan(plan_counter):
    u, v = sm.Dense(5, 3, dtype=F64), sm.Dense(3, 7, dtype=F64)
    op = u @ v
    x = torch.randn(4, 7, dtype=F64)
    op(x)
    with torch.no_grad():
        u.weight.mul_(2.0)
        v.weight.copy_(torch.randn(3, 7, dtype=F64))
    expected = x @ (u.weight @ v.weight).detach().T
    torch.testing.assert_close(op(x), expected)
    assert len(plan_counter) == 1


def test_state_dict_keys():
    u, v = sm.Dense(5, 3), sm.Dense(3, 7)
    assert set((u @ v).state_dict()) == {"factors.0.weight", "factors.1.weight"}
    t = sm.TensorNetwork("y[o] = U[o,r] V[r,i] x[i]", sizes=dict(o=5, r=2, i=7))
    assert set(t.state_dict()) == {"U", "V"}
    assert set(sm.Diagonal(5).state_dict()) == {"diag"}
    assert set(sm.Identity(5).state_dict()) == set()
    s = u + sm.Dense(5, 3).T.T
    assert set(s.state_dict()) == {"terms.0.weight", "terms.1.weight"}


def test_state_dict_round_trip_between_composites():
    a = sm.Dense(5, 3, dtype=F64) @ sm.Dense(3, 7, dtype=F64)
    b = sm.Dense(5, 3, dtype=F64) @ sm.Dense(3, 7, dtype=F64)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 7, dtype=F64)
    torch.testing.assert_close(b(x), a(x))


def test_to_float64_then_apply():
    torch.manual_seed(0)
    op = (sm.Dense(5, 3) @ sm.Dense(3, 7) + 0.5 * sm.Dense(5, 7)).to(F64)
    assert op.dtype == F64
    assert all(p.dtype == F64 for p in op.parameters())
    x = torch.randn(4, 7, dtype=F64)
    y = op(x)
    assert y.dtype == F64
    torch.testing.assert_close(y, x @ op.dense().T)
    with pytest.raises(TypeError, match="input has dtype torch.float32"):
        op(x.float())


def test_to_after_apply_uses_the_new_parameters():
    op = sm.Dense(5, 3) @ sm.Dense(3, 7)
    op(torch.randn(2, 7))  # plans and caches in float32
    op = op.to(F64)
    x = torch.randn(2, 7, dtype=F64)
    assert op(x).dtype == F64
    torch.testing.assert_close(op(x), x @ op.dense().T)


def test_autocast_bfloat16():
    torch.manual_seed(0)
    op = sm.Dense(12, 5) @ sm.Dense(5, 7) + sm.Dense(12, 7)
    x = torch.randn(3, 7)
    ref = op(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = op(x)
    assert y.dtype == torch.bfloat16
    assert y.shape == (3, 12)
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)
    assert all(p.dtype == torch.float32 for p in op.parameters())  # autocast does not touch the parameters


def test_torch_compile():
    op = sm.Dense(5, 3, dtype=F64) @ sm.Dense(3, 7, dtype=F64) + sm.Dense(5, 7, dtype=F64)
    compiled = torch.compile(op, backend="aot_eager")
    x = torch.randn(4, 7, dtype=F64)
    torch.testing.assert_close(compiled(x), op(x))


def test_torch_compile_fullgraph():
    # DESIGN §3 says torch.compile works; today dynamo breaks the graph at the lazy lowering (_node) and at
    # torch._VF.einsum(..., path=...), which it cannot trace, so fullgraph=True fails.
    torch._dynamo.reset()
    op = sm.Dense(5, 3, dtype=F64) @ sm.Dense(3, 7, dtype=F64)
    compiled = torch.compile(op, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 7, dtype=F64)
    torch.testing.assert_close(compiled(x), op(x))


def test_print_shows_a_tree():
    op = sm.Dense(5, 3) @ (sm.Dense(3, 7) + 2.0 * sm.Dense(3, 7))
    lines = repr(op).splitlines()
    assert lines[0].startswith("Product(5, 7)")
    assert lines[1].startswith("├─ Dense(5, 3)")
    assert lines[2].startswith("└─ Sum(3, 7)")
    assert lines[3].startswith("   ├─ Dense(3, 7)")
    assert lines[4].startswith("   └─ Scaled(3, 7, scale=2)")
    assert lines[5].startswith("      └─ Dense(3, 7)")
    assert len(lines) == 6
    assert f"flops/vec={op.cost(1).flops:,}" in lines[0]
    assert "params=15" in lines[1] and "rank<=3 (exact)" in lines[1]


def test_print_draws_the_vertical_bar_under_a_middle_child():
    op = sm.Sum(sm.Dense(3, 5) @ sm.Dense(5, 7), sm.Dense(3, 7))
    lines = repr(op).splitlines()
    assert lines[1].startswith("├─ Product(3, 7)")
    assert lines[2].startswith("│  ├─ Dense(3, 5)")
    assert lines[3].startswith("│  └─ Dense(5, 7)")
    assert lines[4].startswith("└─ Dense(3, 7)")


def test_builtin_sum():
    a, b = sm.Dense(5, 7, dtype=F64), sm.Dense(5, 7, dtype=F64)
    s = sum([a, b])
    assert isinstance(s, sm.Sum)
    torch.testing.assert_close(s.dense(), a.dense() + b.dense())
    c = sm.Dense(5, 7, dtype=F64)
    torch.testing.assert_close(sum([a, b, c]).dense(), a.dense() + b.dense() + c.dense())


def test_rmatmul():
    op = sm.Dense(5, 3, dtype=F64) @ sm.Dense(3, 7, dtype=F64)
    y = torch.randn(4, 5, dtype=F64)
    torch.testing.assert_close(y @ op, y @ op.dense())
    v = torch.randn(5, dtype=F64)
    torch.testing.assert_close(v @ op, v @ op.dense())
    yb = torch.randn(2, 4, 5, dtype=F64)
    torch.testing.assert_close(yb @ op, yb @ op.dense())


def test_matmul_with_a_matrix_and_a_vector():
    op = sm.Dense(5, 3, dtype=F64) @ sm.Dense(3, 7, dtype=F64)
    mat = torch.randn(7, 4, dtype=F64)
    torch.testing.assert_close(op @ mat, op.dense() @ mat)
    v = torch.randn(7, dtype=F64)
    torch.testing.assert_close(op @ v, op.dense() @ v)


def test_apply_keeps_leading_dims_and_empty_batches():
    op = sm.Dense(5, 7, dtype=F64)
    x = torch.randn(2, 3, 7, dtype=F64)
    assert op(x).shape == (2, 3, 5)
    torch.testing.assert_close(op(x), x @ op.dense().T)
    assert op(torch.randn(0, 7, dtype=F64)).shape == (0, 5)


def test_gradients_reach_the_parameters():
    u, v = sm.Dense(5, 3, dtype=F64), sm.Dense(3, 7, dtype=F64)
    x = torch.randn(4, 7, dtype=F64)
    (u @ v)(x).sum().backward()
    # d/dU sum(U V x) = 1 (V x)^T summed over the batch
    torch.testing.assert_close(u.weight.grad, torch.ones(4, 5, dtype=F64).T @ (x @ v.weight.detach().T))
    assert v.weight.grad is not None and v.weight.grad.shape == (3, 7)


def test_kronecker_beyond_one_einsum_falls_back_to_parts():
    # 3 parts of (2, 3) and 30 of (1, 1): 66 labels, more than one einsum takes (51 besides the batch), so the
    # product is applied part by part (a KronNode) instead of failing
    parts = [sm.Dense(2, 3, dtype=F64) for _ in range(3)] + [sm.Dense(1, 1, dtype=F64) for _ in range(30)]
    op = sm.kron(*parts)
    assert type(op._node).__name__ == "KronNode"
    ref = parts[0].weight.detach()
    for p in parts[1:]:
        ref = torch.kron(ref, p.weight.detach())
    x = torch.randn(4, 27, dtype=F64)
    torch.testing.assert_close(op(x), x @ ref.T)
    assert op.cost(4).flops > 0


def test_numerical_rank_of_a_stack_is_per_head():
    A = sm.LowRank(50, 40, rank=3, heads=2, dtype=F64)  # thin cut: the sketch path
    with torch.no_grad():
        A.U[1, :, 2] = 0.0  # head 1 loses a direction
    assert sm.numerical_rank(A) == [int(torch.linalg.matrix_rank(d)) for d in A.dense()] == [3, 2]
    B = sm.Dense(5, 4, heads=3, dtype=F64)  # full cut: the dense path
    with torch.no_grad():
        B.weight[2, :, 0] = 0.0
    assert sm.numerical_rank(B) == [4, 4, 3]


def test_pickle_and_deepcopy_keep_the_structure_and_own_their_parameters():
    import copy
    import io

    op = sm.LowRank(6, 5, rank=2, dtype=F64) + sm.Permutation([1, 0, 2, 4, 3, 5]) @ sm.Dense(6, 5, dtype=F64)
    x = torch.randn(3, 5, dtype=F64)
    y = op(x)
    buf = io.BytesIO()
    torch.save(op, buf)
    buf.seek(0)
    for other in (torch.load(buf, weights_only=False), copy.deepcopy(op)):
        torch.testing.assert_close(other(x), y)
        with torch.no_grad():
            for p in other.parameters():
                p.add_(1.0)
        assert not torch.allclose(other(x), y)  # the copy's networks read the copy's parameters
        torch.testing.assert_close(op(x), y)  # and the original is untouched


# -- numerical_rank: stacks of rank 0, half precision, non-finite values ---------------------------------------------
@pytest.mark.parametrize("heads", [1, 4])
def test_numerical_rank_of_a_zero_stack_is_one_zero_per_head(heads):
    op = 0.0 * sm.Dense(3, 5, heads=heads, dtype=F64)
    assert op.rank().bound == 0
    assert sm.numerical_rank(op) == [0] * heads
    assert sm.numerical_rank(0.0 * sm.Dense(3, 5, dtype=F64)) == 0


def _rank3_rows(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A (5, 7) matrix whose last two rows repeat the first two: rank 3 exactly, in any dtype."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 7, generator=g).to(dtype)
    return torch.cat([w, w[:2]])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_numerical_rank_in_half_precision(dtype):
    # the dense path (bound 5 = min(m, n)): compare with matrix_rank of the exactly upcast matrix
    w = _rank3_rows(dtype)
    assert sm.numerical_rank(sm.Dense.from_tensor(w)) == int(torch.linalg.matrix_rank(w.double())) == 3
    # the thin path: bound 2 < min(12, 7); the reference is the exact product of the upcast factors (op.dense() is
    # rounded to half precision, which makes it full rank)
    torch.manual_seed(0)
    u, v = sm.Dense(12, 2, dtype=dtype), sm.Dense(2, 7, dtype=dtype)
    op = u @ v
    assert op.rank().bound == 2
    assert sm.numerical_rank(op) == int(torch.linalg.matrix_rank(u.weight.double() @ v.weight.double())) == 2
    # stacks, both paths
    assert sm.numerical_rank(sm.Dense.from_tensor(torch.stack([w, w[[0, 0, 1, 1, 0]]]))) == [3, 2]
    thin = sm.LowRank(12, 7, rank=2, heads=3, dtype=dtype)
    assert sm.numerical_rank(thin) == [2, 2, 2]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_numerical_rank_in_half_precision_is_the_rank_of_the_values(name, dtype):
    # the half-precision values, upcast exactly to float64, define the matrix whose rank is asked for (the rounding to
    # half precision happened when the values were stored; it is not noise to discount)
    op = build_zoo(name).to(dtype)
    reference = copy.deepcopy(op).to(F64)
    assert sm.numerical_rank(op) == sm.numerical_rank(reference)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_numerical_rank_of_non_finite_parameters(bad):
    op = sm.Dense(3, 5, dtype=F64)
    with torch.no_grad():
        op.weight[1, 2] = bad
    with pytest.raises(
        ValueError, match=r"numerical_rank\(Dense\(3, 5\)\): parameter 'weight' of shape \(3, 5\) holds 1 NaN or inf"
    ):
        sm.numerical_rank(op)
    # in a composite the message gives the parameter's path
    with pytest.raises(ValueError, match=r"numerical_rank\(Product\(7, 5\)\): parameter 'factors\.1\.weight' of"):
        sm.numerical_rank(sm.Dense(7, 3, dtype=F64) @ op)


def test_numerical_rank_when_applying_overflows():
    # finite float32 parameters 1e30 whose product (2e60) is beyond float32: not a LAPACK error nor a wrong rank
    big = sm.Dense.from_tensor(torch.full((2, 2), 1e30)) @ sm.Dense.from_tensor(torch.full((2, 2), 1e30))
    with pytest.raises(ValueError, match=r"numerical_rank\(Product\(2, 2\)\): applying the operator overflowed"):
        sm.numerical_rank(big)
    thin = sm.Dense.from_tensor(torch.full((7, 1), 1e30)) @ sm.Dense.from_tensor(torch.full((1, 5), 1e30))
    with pytest.raises(ValueError, match=r"numerical_rank\(Product\(7, 5\)\): applying the operator overflowed"):
        sm.numerical_rank(thin)


# -- rank: exact wherever the math makes it exact --------------------------------------------------------------------
def _perm(n: int) -> sm.Permutation:
    return sm.Permutation(torch.randperm(n, generator=torch.Generator().manual_seed(n)).tolist())


def _btt() -> sm.LinearOperator:
    """A 2-core BTT (its family vouches that its cut is exact) of rank 6 < 10: cores (3, 4) x (2, 5) and bond 1, cut
    min(12, 10, 3 * 2 * 1) = 6."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the family warns that these factors limit the rank: we want it
        return sm.BTT(12, 10, ranks=1, in_factors=(2, 5), out_factors=(3, 4), dtype=F64)


EXACT_RANKS = {
    # name: (builder, hand-derived bound); every one must claim exactness and equal matrix_rank
    "kron_btt_lowrank": (lambda: sm.kron(_btt(), sm.LowRank(3, 5, rank=2, dtype=F64)), 6 * 2),
    "kron_btt_dense": (lambda: sm.kron(sm.Dense(2, 3, dtype=F64), _btt()), 2 * 6),
    "kron_identity_btt": (lambda: sm.kron(sm.Identity(3), _btt()), 3 * 6),
    "kron_gather_btt": (lambda: sm.kron(_perm(3), _btt()), 3 * 6),  # a KronNode (the gather is no network)
    "block_diag_btt_lowrank": (lambda: sm.block_diag(_btt(), sm.LowRank(5, 7, rank=2, dtype=F64)), 6 + 2),
    "transpose_btt": (lambda: _btt().T, 6),
    "scaled_btt": (lambda: -2.5 * _btt(), 6),
    "btt_times_gather": (lambda: _btt() @ _perm(10), 6),
    "gather_times_btt": (lambda: _perm(12) @ _btt(), 6),
    "gather_times_lowrank": (lambda: _perm(7) @ sm.LowRank(7, 5, rank=2, dtype=F64), 2),
    "diagonal_times_btt": (lambda: sm.Diagonal.from_tensor(torch.randn(12, dtype=F64)) @ _btt(), 6),
    "btt_times_diagonal": (lambda: _btt() @ sm.Diagonal.from_tensor(torch.randn(10, dtype=F64)), 6),
    "btt_times_identity": (lambda: _btt() @ sm.Identity(10), 6),
    "axes_times_btt": (lambda: sm.Permutation.from_axes((3, 4), (1, 0)) @ _btt(), 6),
    "injective_chain_surjective": (
        lambda: sm.Dense(7, 3, dtype=F64) @ _perm(3) @ sm.LowRank(3, 5, rank=2, dtype=F64) @ _perm(5),
        2,
    ),
    "kron_of_transposed_products": (lambda: sm.kron((_perm(12) @ _btt()).T, sm.Dense(2, 3, dtype=F64)), 6 * 2),
    # fused into one (non-tree) network: a one-to-one left part keeps the right part's rank, an onto right part the
    # left one's. BTT(12, 10, ranks=2) on (3, 4) x (2, 5): cut min(12, 10, 3 * 2 * 2 = 12) = 10, one-to-one
    "one_to_one_btt_times_lowrank": (
        lambda: sm.BTT(12, 10, 2, in_factors=(2, 5), out_factors=(3, 4), dtype=F64) @ sm.LowRank(10, 7, 3, dtype=F64),
        3,
    ),
    # BTT(12, 12, ranks=2) on (3, 4) x (3, 4): cut min(12, 3 * 3 * 2 = 18) = 12, onto
    "lowrank_times_onto_btt": (lambda: sm.LowRank(7, 12, 4, dtype=F64) @ sm.BTT(12, 12, 2, dtype=F64), 4),
    "btt_times_btt": (lambda: sm.BTT(12, 12, 2, dtype=F64) @ _btt(), 6),
}


@pytest.mark.parametrize("name", sorted(EXACT_RANKS))
def test_rank_is_exact_where_the_math_says_so(name):
    build, bound = EXACT_RANKS[name]
    torch.manual_seed(0)
    op = build()
    assert op.rank() == sm.Rank(bound, True)
    assert int(torch.linalg.matrix_rank(op.dense())) == bound


@pytest.mark.parametrize(
    "build",
    [
        lambda: sm.Dense(5, 5, dtype=F64) + sm.Dense(5, 5, dtype=F64),  # a sum can cancel (A - A)
        lambda: sm.LowRank(5, 6, rank=2, dtype=F64) @ _perm(6) @ sm.LowRank(6, 7, rank=3, dtype=F64),  # no pivot
        lambda: sm.kron(sm.Dense(2, 3, dtype=F64) + sm.Dense(2, 3, dtype=F64), _perm(4)),
    ],
)
def test_rank_stays_a_bound_where_exactness_does_not_follow(build):
    torch.manual_seed(0)
    op = build()
    r = op.rank()
    assert not r.exact and r.bound >= int(torch.linalg.matrix_rank(op.dense()))


def test_rank_of_zero_parts_is_exactly_zero():
    zero = 0.0 * sm.Dense(3, 5, dtype=F64)
    assert (zero @ _perm(5)).rank() == sm.Rank(0, True)
    assert sm.kron(zero, _perm(2)).rank() == sm.Rank(0, True)
    assert (zero + 0.0 * sm.Dense(3, 5, dtype=F64)).rank() == sm.Rank(0, True)


_LEAVES = {
    "dense": lambda m, n: sm.Dense(m, n, dtype=F64),
    "lowrank": lambda m, n: sm.LowRank(m, n, rank=max(1, min(m, n) - 1), dtype=F64),
    "gather": lambda m, n: _perm(m) if m == n else sm.Dense(m, n, dtype=F64),
    "diagonal": lambda m, n: (
        sm.Diagonal.from_tensor(torch.randn(m, dtype=F64)) if m == n else sm.Dense(m, n, dtype=F64)
    ),
}


@settings(max_examples=80)
@given(
    data=st.data(),
    kinds=st.lists(st.sampled_from(sorted(_LEAVES)), min_size=2, max_size=3),
    how=st.sampled_from(["product", "kron", "block_diag"]),
)
def test_rank_claims_match_matrix_rank(data, kinds, how):
    # random combinations of small leaves: an exact claim equals matrix_rank of random float64 values, a bound bounds
    torch.manual_seed(0)
    if how == "product":
        sizes = data.draw(st.lists(st.integers(1, 5), min_size=len(kinds) + 1, max_size=len(kinds) + 1))
        op = sm.Product(*(_LEAVES[k](sizes[i], sizes[i + 1]) for i, k in enumerate(kinds)))
    else:
        ops = [_LEAVES[k](data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))) for k in kinds]
        op = sm.kron(*ops) if how == "kron" else sm.block_diag(*ops)
    r, true = op.rank(), int(torch.linalg.matrix_rank(op.dense()))
    assert r.bound == true if r.exact else r.bound >= true, (op.name, r, true)


# -- dense() is contiguous ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ZOO))
def test_dense_is_contiguous(name):
    op = build_zoo(name)
    d = op.dense()
    assert d.is_contiguous(), name
    torch.testing.assert_close(torch.kron(d, torch.ones(1, 2, dtype=d.dtype)), d.repeat_interleave(2, dim=-1))
