"""Algebra laws on random operators (hypothesis), in float64, against the independent dense references.

The strategy builds an operator of a requested shape ``(m, n)`` recursively, up to three combinators deep: leaves
(Dense, Identity, Diagonal, Permutation, axis permutation, TensorNetwork low-rank, block-diagonal and Monarch-like
networks) under Sum, Product (with a random inner size, or Kronecker-shaped so that the networks fuse), Transpose,
Kronecker, BlockDiagonal and Scaled. Parameter values come from a drawn seed, so examples replay exactly.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import reference_dense

import structmat as sm

F64 = torch.float64
MAX = 12


def _divisors(k: int) -> list[int]:
    return [d for d in range(1, k + 1) if k % d == 0]


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64, generator=gen)


@st.composite
def _leaf(draw: st.DrawFn, m: int, n: int) -> sm.LinearOperator:
    kinds = ["dense", "lowrank", "monarch"]
    if m == n:
        kinds += ["identity", "diagonal", "permutation"]
        if len(_divisors(n)) > 2:
            kinds.append("axis_permutation")
    common = [g for g in _divisors(math.gcd(m, n)) if g > 1]
    if common:
        kinds.append("blocks")
    kind = draw(st.sampled_from(kinds))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    if kind == "dense":
        return sm.Dense.from_tensor(_randn(gen, m, n))
    if kind == "lowrank":
        r = draw(st.integers(1, 4))
        return sm.TensorNetwork("y[o] = U[o,r] V[r,i] x[i]", factors=dict(U=_randn(gen, m, r), V=_randn(gen, r, n)))
    if kind == "monarch":  # y[c,d] = L[c,d,a] R[a,c,b] x[a,b] with m = c*d, n = a*b (not a tree: rank not exact)
        c = draw(st.sampled_from(_divisors(m)))
        a = draw(st.sampled_from(_divisors(n)))
        d, b = m // c, n // a
        return sm.TensorNetwork(
            "y[c,d] = L[c,d,a] R[a,c,b] x[a,b]", factors=dict(L=_randn(gen, c, d, a), R=_randn(gen, a, c, b))
        )
    if kind == "blocks":
        g = draw(st.sampled_from(common))
        return sm.TensorNetwork("y[b,o] = W[b,o,i] x[b,i]", factors=dict(W=_randn(gen, g, m // g, n // g)))
    if kind == "identity":
        return sm.Identity(n)
    if kind == "diagonal":
        return sm.Diagonal.from_tensor(_randn(gen, n))
    if kind == "permutation":
        return sm.Permutation(list(draw(st.permutations(range(n)))))
    # axis permutation: view x as (s1, n/s1), or (s1, s2, n/(s1 s2)), and permute the axes
    s1 = draw(st.sampled_from([d for d in _divisors(n) if 1 < d < n]))
    sizes = [s1, n // s1]
    rest = [d for d in _divisors(n // s1) if 1 < d < n // s1]
    if rest and draw(st.booleans()):
        s2 = draw(st.sampled_from(rest))
        sizes = [s1, s2, n // (s1 * s2)]
    order = draw(st.permutations(range(len(sizes))))
    return sm.Permutation.from_axes(tuple(sizes), tuple(order))


@st.composite
def operators(draw: st.DrawFn, m: int, n: int, depth: int = 3) -> sm.LinearOperator:
    """A random operator of shape ``(m, n)`` with at most ``depth`` levels of combinators."""
    if depth == 0:
        return draw(_leaf(m, n))
    kinds = ["leaf", "sum", "product", "transpose", "scaled", "kron"]
    if m >= 2 and n >= 2:
        kinds.append("block_diag")
    if depth >= 2:
        kinds.append("kron_product")
    kind = draw(st.sampled_from(kinds))
    sub = depth - 1
    if kind == "leaf":
        return draw(_leaf(m, n))
    if kind == "sum":
        first = draw(operators(m, n, sub))
        if draw(st.integers(0, 4)) == 0:  # the same operator twice: shared parameters
            return first + first
        rest = [draw(operators(m, n, sub)) for _ in range(draw(st.integers(1, 2)))]
        return sm.Sum(first, *rest)
    if kind == "product":
        k = draw(st.integers(1, MAX))
        return draw(operators(m, k, sub)) @ draw(operators(k, n, sub))
    if kind == "kron_product":
        # (A1 ⊗ A2) @ (B1 ⊗ B2) with matching inner splits (k1, k2): the two networks share a refinement and fuse.
        m1, n1 = draw(st.sampled_from(_divisors(m))), draw(st.sampled_from(_divisors(n)))
        k1, k2 = draw(st.integers(1, 4)), draw(st.integers(1, 3))
        left = sm.kron(draw(operators(m1, k1, depth - 2)), draw(operators(m // m1, k2, depth - 2)))
        right = sm.kron(draw(operators(k1, n1, depth - 2)), draw(operators(k2, n // n1, depth - 2)))
        return left @ right
    if kind == "transpose":
        inner = draw(operators(n, m, sub))
        return inner.T if draw(st.booleans()) else sm.Transpose(inner)
    if kind == "scaled":
        c = draw(st.sampled_from([-2.0, -0.5, 0.0, 0.5, 3.0]))
        return c * draw(operators(m, n, sub))
    if kind == "kron":
        m1, n1 = draw(st.sampled_from(_divisors(m))), draw(st.sampled_from(_divisors(n)))
        return sm.kron(draw(operators(m1, n1, sub)), draw(operators(m // m1, n // n1, sub)))
    # block_diag: split rows and columns in two
    m1, n1 = draw(st.integers(1, m - 1)), draw(st.integers(1, n - 1))
    return sm.block_diag(draw(operators(m1, n1, sub)), draw(operators(m - m1, n - n1, sub)))


sizes = st.integers(1, MAX)


@st.composite
def any_operator(draw: st.DrawFn) -> sm.LinearOperator:
    return draw(operators(draw(sizes), draw(sizes)))


@st.composite
def same_shape_pair(draw: st.DrawFn) -> tuple[sm.LinearOperator, sm.LinearOperator]:
    m, n = draw(sizes), draw(sizes)
    return draw(operators(m, n)), draw(operators(m, n))


@st.composite
def composable_pair(draw: st.DrawFn) -> tuple[sm.LinearOperator, sm.LinearOperator]:
    m, k, n = draw(sizes), draw(sizes), draw(sizes)
    return draw(operators(m, k)), draw(operators(k, n))


def _x(n: int, batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, n, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _dense(op: sm.LinearOperator) -> torch.Tensor:
    return op.dense(F64)  # F64 also for an operator without parameters (Identity, Permutation and their combinations)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A copy with row-major strides. ``.contiguous()`` is not enough: a transposed ``(1, k)`` counts as contiguous
    but keeps its strides, and torch.kron then fails with "view size is not compatible"."""
    return t.clone(memory_format=torch.contiguous_format)


def _ref(op: sm.LinearOperator) -> torch.Tensor:
    """``reference_dense`` for the leaves; the combinators here, on plain row-major parts (see ``_plain``)."""
    if isinstance(op, sm.Sum):
        return functools.reduce(torch.add, [_ref(t) for t in op.terms])
    if isinstance(op, sm.Product):
        return functools.reduce(torch.matmul, [_ref(t) for t in op.factors])
    if isinstance(op, sm.Transpose):
        return _plain(_ref(op.op).T)
    if isinstance(op, sm.Kronecker):
        return functools.reduce(torch.kron, [_ref(t) for t in op.parts])
    if isinstance(op, sm.BlockDiagonal):
        return torch.block_diag(*[_ref(t) for t in op.blocks])
    if isinstance(op, sm.Scaled):
        return op.scale * _ref(op.op)
    return _plain(reference_dense(op))


@given(same_shape_pair())
def test_sum_applies_termwise(pair):
    a, b = pair
    x = _x(a.shape[1])
    torch.testing.assert_close((a + b)(x), a(x) + b(x))
    torch.testing.assert_close((a + b)(x), x @ (_ref(a) + _ref(b)).T)
    torch.testing.assert_close((a - b)(x), a(x) - b(x))


@given(composable_pair())
def test_product_applies_in_turn(pair):
    a, b = pair
    x = _x(b.shape[1])
    torch.testing.assert_close((a @ b)(x), a(b(x)))
    torch.testing.assert_close((a @ b)(x), x @ (_ref(a) @ _ref(b)).T)


@given(any_operator())
def test_double_transpose_is_the_operator(op):
    x = _x(op.shape[1])
    ref = _ref(op)
    twice = sm.Transpose(sm.Transpose(op))  # a real double transpose, not op.T.T (which returns op itself)
    assert twice.shape == op.shape
    torch.testing.assert_close(_dense(twice), ref)
    torch.testing.assert_close(twice(x), op(x))
    torch.testing.assert_close(_dense(op.T.T), ref)
    torch.testing.assert_close(_dense(op.T), ref.T)
    y = _x(op.shape[0], seed=1)
    torch.testing.assert_close(op.T(y), y @ ref)


@given(composable_pair())
def test_transpose_of_product(pair):
    a, b = pair
    expected = (_ref(a) @ _ref(b)).T
    torch.testing.assert_close(_dense((a @ b).T), expected)
    torch.testing.assert_close(_dense(b.T @ a.T), expected)
    y = _x(a.shape[0])
    torch.testing.assert_close((a @ b).T(y), (b.T @ a.T)(y))


small = st.integers(1, 4)


@st.composite
def kron_operands(draw: st.DrawFn) -> list[sm.LinearOperator]:
    count = draw(st.integers(2, 3))
    return [draw(operators(draw(small), draw(small), 2)) for _ in range(count)]


@given(kron_operands())
def test_kron_matches_torch_kron(ops):
    k = sm.kron(*ops)
    expected = _ref(ops[0])
    for op in ops[1:]:
        expected = torch.kron(expected, _ref(op))
    assert k.shape == tuple(expected.shape)
    torch.testing.assert_close(_dense(k), expected)
    x = _x(k.shape[1])
    torch.testing.assert_close(k(x), x @ expected.T)


@st.composite
def block_operands(draw: st.DrawFn) -> list[sm.LinearOperator]:
    count = draw(st.integers(2, 3))
    return [draw(operators(draw(st.integers(1, 6)), draw(st.integers(1, 6)), 2)) for _ in range(count)]


@given(block_operands())
def test_block_diag_matches_torch_block_diag(ops):
    bd = sm.block_diag(*ops)
    expected = torch.block_diag(*[_ref(op) for op in ops])
    assert bd.shape == tuple(expected.shape)
    torch.testing.assert_close(_dense(bd), expected)
    x = _x(bd.shape[1])
    torch.testing.assert_close(bd(x), x @ expected.T)


@given(any_operator())
def test_dense_is_consistent_with_apply_and_reference(op):
    m, n = op.shape
    dense = _dense(op)
    assert dense.shape == (m, n)
    torch.testing.assert_close(dense, _ref(op))
    x = _x(n, batch=4)
    torch.testing.assert_close(op(x), x @ dense.T)
    torch.testing.assert_close(op(x[0]), dense @ x[0])
    mat = _x(n, batch=2, seed=2).T
    torch.testing.assert_close(op @ mat, dense @ mat)


@given(any_operator())
def test_rank_bound(op):
    ref = _ref(op)
    true = int(torch.linalg.matrix_rank(ref, rtol=1e-10))
    r = op.rank()
    assert r.bound <= min(op.shape)
    if r.exact:
        assert r.bound == true, f"{op!r}\nclaims exact rank {r.bound}, matrix_rank is {true}"
    else:
        assert r.bound >= true, f"{op!r}\nbound {r.bound} < matrix_rank {true}"
    assert sm.numerical_rank(op, rtol=1e-10) == true


def test_long_chain_of_rank_one_factors():
    # Six operands or more are planned with opt_einsum's "dp" optimizer, whose path may hold single-operand steps
    # (summing a label that only one factor carries, such as a size-1 bond); the path handed to torch's einsum
    # must still be a list of pairs. Found by the laws above; here as one fixed case.
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 1), (1, 4), (4, 1), (1, 5), (5, 1), (1, 2)]
    ops = [sm.Dense.from_tensor(_randn(g, m, n)) for m, n in shapes]
    chain = sm.Product(*ops)
    expected = functools.reduce(torch.matmul, [op.weight.detach() for op in ops])
    x = _x(2)
    torch.testing.assert_close(chain(x), x @ expected.T)
    torch.testing.assert_close(_dense(chain), expected)


def test_six_factor_network_with_a_label_summed_alone():
    # s[q] carries a label no other operand has: "dp" sums it in a single-operand step (the path is not all pairs).
    # The operator is (sum_q s[q]) A B C D E.
    g = torch.Generator().manual_seed(1)
    shapes = dict(A=(3, 2), B=(2, 4), C=(4, 2), D=(2, 3), E=(3, 5), s=(2,))
    factors = {name: _randn(g, *shape) for name, shape in shapes.items()}
    op = sm.TensorNetwork("y[o] = A[o,a] B[a,b] C[b,c] D[c,d] E[d,i] s[q] x[i]", factors=factors)
    expected = factors["s"].sum() * functools.reduce(torch.matmul, [factors[k] for k in "ABCDE"])
    x = _x(5)
    torch.testing.assert_close(op(x), x @ expected.T)
    torch.testing.assert_close(_dense(op), expected)


def test_long_operator_chains_stay_flat():
    """``a + b + c + ...``, ``a @ b @ ...`` and ``c * (d * A)`` nest no modules (a 600-term chain used to hit
    RecursionError in repr, and to_expr refused it as nested 600 deep)."""
    A = sm.Dense(3, 5, dtype=torch.float64)
    B = sm.Dense(3, 5, dtype=torch.float64)
    S = A
    for k in range(600):
        S = S + B if k % 2 else S - B
    assert type(S) is sm.Sum and len(S.terms) == 601
    assert S.num_params == 30  # shared parameters count once
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(S(x), A(x))  # 300 (- B) and 300 (+ B) cancel
    assert "Sum(3, 5)" in repr(S)
    assert sm.to_expr(S).count(" + ") + sm.to_expr(S).count(" - ") == 600

    P = sm.Dense(3, 3, dtype=torch.float64)
    Q = P
    for _ in range(600):
        Q = Q @ sm.Permutation([1, 2, 0])
    assert type(Q) is sm.Product and len(Q.factors) == 601
    torch.testing.assert_close(Q.dense(), P.dense())  # the cyclic shift to the power 600 = 3 * 200 is I

    C = A
    for _ in range(1500):
        C = 1.001 * C
    assert type(C) is sm.Scaled and C.op is A
    assert C.scale == pytest.approx(1.001**1500, rel=1e-12)
    torch.testing.assert_close(C.dense(), 1.001**1500 * A.dense())


def test_explicit_nesting_is_kept():
    A, B, C = (sm.Dense(3, 5) for _ in range(3))
    S = sm.Sum(sm.Sum(A, B), C)  # written out by the user: kept as asked
    assert isinstance(S.terms[0], sm.Sum)
    T = sm.Scaled(sm.Scaled(A, 2.0), 3.0)
    assert isinstance(T.op, sm.Scaled) and T.scale == 3.0
