"""Monarch is Dao et al.'s Monarch matrix, as the authors' ``MonarchLinear(n, m, nblocks)`` computes it.

The reference below is written from the definition of the authors' ``blockdiag_butterfly_multiply`` with plain
reshapes and ``torch.bmm`` (no structmat): ``x (B, n)`` viewed as ``(B, k, p)``, a batched matmul with the ``k``
blocks ``w1 (k, q, p)``, the ``(B, k q)`` intermediate viewed as ``(B, q, k)`` and transposed, a batched matmul with
``w2 (k, s, q)`` giving ``(k, B, s)``, then the output laid out as ``(B, s, k)``. The authors' layer picks
``q = n / k`` when ``n < m`` and ``q = m / k`` otherwise, i.e. ``q = min(m, n) / k``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import structmat as sm

F64 = torch.float64


def monarch_reference(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Dao et al.'s block-diagonal butterfly multiply: ``x (B, n)``, ``w1 (k, q, p)``, ``w2 (k, s, q)``."""
    batch = x.shape[0]
    k, q, p = w1.shape
    kl, s, r = w2.shape
    assert k * p == x.shape[1] and kl * r == k * q  # the shapes the reference requires
    h = torch.bmm(x.reshape(batch, k, p).transpose(0, 1), w1.transpose(1, 2))  # (k, B, q)
    h = h.transpose(0, 1).reshape(batch, r, kl).transpose(1, 2)  # (B, kl, r): entry f of (k q) read as (r, l)
    z = torch.bmm(h.transpose(0, 1), w2.transpose(1, 2))  # (kl, B, s)
    return z.permute(1, 2, 0).reshape(batch, s * kl)


def reference_matrix(op: sm.Monarch, head: int | None = None) -> torch.Tensor:
    w1, w2 = op.blkdiag1.detach(), op.blkdiag2.detach()
    if head is not None:
        w1, w2 = w1[head], w2[head]
    return monarch_reference(torch.eye(op.shape[1], dtype=w1.dtype), w1, w2).T


def seeded(m: int, n: int, nblocks: int, seed: int = 0, **kw) -> sm.Monarch:
    torch.manual_seed(seed)
    return sm.Monarch(m, n, nblocks, dtype=F64, **kw)


# (m, n, nblocks): square and rectangular, nblocks in {2, 4, sqrt(n), n / 2}, both ways of the q-vs-k divisibility
SHAPES = [
    (16, 16, 2),
    (16, 16, 4),  # nblocks = sqrt(n): bond 1
    (16, 16, 8),  # nblocks = n / 2: q = 2 divides k
    (36, 36, 6),  # sqrt(n)
    (12, 12, 2),
    (12, 12, 4),  # q = 3 and k = 4: neither divides the other
    (12, 12, 6),  # n / 2
    (10, 10, 5),  # n / 2, q = 2 and k = 5: neither divides
    (20, 12, 4),  # tall: q = 3
    (12, 20, 4),  # wide: q = 3
    (28, 12, 2),  # tall: q = 6
    (12, 28, 4),  # wide: q = 3, k = 4
    (35, 10, 5),
    (14, 7, 7),
]


@pytest.mark.parametrize("m, n, nblocks", SHAPES)
def test_monarch_matches_the_authors_multiply(m, n, nblocks):
    op = seeded(m, n, nblocks)
    k = nblocks
    q = min(m, n) // k
    assert tuple(op.blkdiag1.shape) == (k, q, n // k) and tuple(op.blkdiag2.shape) == (k, m // k, q)
    x = torch.randn(5, n, dtype=F64)
    torch.testing.assert_close(op(x), monarch_reference(x, op.blkdiag1, op.blkdiag2))
    ref = reference_matrix(op)
    torch.testing.assert_close(op.dense(), ref)
    torch.testing.assert_close(op.T.dense(), ref.T)
    y = torch.randn(3, m, dtype=F64)
    torch.testing.assert_close(op.T(y), y @ ref)


@pytest.mark.parametrize("m, n, nblocks", SHAPES)
def test_monarch_rank_is_full_and_exact(m, n, nblocks):
    op = seeded(m, n, nblocks)
    assert op.rank() == sm.Rank(min(m, n), True)
    assert op.T.rank() == sm.Rank(min(m, n), True)
    assert int(torch.linalg.matrix_rank(reference_matrix(op))) == min(m, n)
    assert (0.0 * op).rank() == sm.Rank(0, True)


@pytest.mark.parametrize("m, n, nblocks", SHAPES)
def test_monarch_num_params(m, n, nblocks):
    op = sm.Monarch(m, n, nblocks, device="meta")
    if m >= n:  # blocks (n/k, n/k) then (m/k, n/k)
        assert op.num_params == n * n // nblocks + m * n // nblocks
    else:  # blocks (m/k, n/k) then (m/k, m/k)
        assert op.num_params == m * n // nblocks + m * m // nblocks


def test_monarch_standard_definition_in_numbers():
    """The issue's example: Monarch(1024, 1024, nblocks=4) had rank 16 and 8,192 parameters."""
    op = sm.Monarch(1024, 1024, nblocks=4, device="meta")
    assert op.num_params == 2 * 1024 * 1024 // 4 == 524_288
    assert op.rank() == sm.Rank(1024, True)
    # block-diagonal matmuls: 2 flops per parameter per row, in one einsum
    assert op.cost(3).flops == 2 * 3 * op.num_params
    assert len(op.cost(3).contractions) == 1


def test_monarch_cost_when_the_two_factors_chain():
    # Monarch(12, 20, 4): q = 3 and k = 4 do not refine, so R (4 blocks 3x5) then L (4 blocks 3x3) run one after
    # the other; at batch 2: 2 * 2 * (60 + 36) flops, and the (2, 12) intermediate
    op = sm.Monarch(12, 20, 4)
    assert op.num_params == 60 + 36
    assert op.cost(2).flops == 2 * 2 * 96
    assert len(op.cost(2).contractions) == 2


def test_monarch_gradients_match_the_reference():
    op = seeded(12, 8, 4)  # q = 2 divides k = 4: one network
    other = seeded(12, 12, 4)  # q = 3: a chain
    for A in (op, other):
        x = torch.randn(3, A.shape[1], dtype=F64, requires_grad=True)
        g = torch.randn(3, A.shape[0], dtype=F64)
        (A(x) * g).sum().backward()
        w1 = A.blkdiag1.detach().clone().requires_grad_(True)
        w2 = A.blkdiag2.detach().clone().requires_grad_(True)
        xr = x.detach().clone().requires_grad_(True)
        (monarch_reference(xr, w1, w2) * g).sum().backward()
        torch.testing.assert_close(x.grad, xr.grad)
        torch.testing.assert_close(A.blkdiag1.grad, w1.grad)
        torch.testing.assert_close(A.blkdiag2.grad, w2.grad)


@pytest.mark.parametrize("m, n, nblocks", [(6, 4, 2), (6, 6, 3), (4, 8, 4)])
def test_monarch_gradcheck(m, n, nblocks):
    op = seeded(m, n, nblocks)
    names = [name for name, _ in op.named_parameters()]

    def f(x: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(op, dict(zip(names, values)), (x,))

    x = torch.randn(2, n, dtype=F64, requires_grad=True)
    values = [p.detach().clone().requires_grad_(True) for p in op.parameters()]
    assert torch.autograd.gradcheck(f, (x, *values))


def test_monarch_heads_are_independent_monarchs():
    op = seeded(12, 20, 4, heads=3)
    x = torch.randn(2, 20, dtype=F64)
    y = op(x)
    assert y.shape == (2, 3, 12)
    for h in range(3):
        torch.testing.assert_close(y[:, h], monarch_reference(x, op.blkdiag1[h], op.blkdiag2[h]))
        torch.testing.assert_close(op.dense()[h], reference_matrix(op, h))
    assert op.rank() == sm.Rank(12, True)


@given(st.integers(1, 6), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**16))
def test_monarch_property(nblocks, p, s, seed):
    m, n = nblocks * s, nblocks * p
    op = seeded(m, n, nblocks, seed)
    ref = reference_matrix(op)
    torch.testing.assert_close(op.dense(), ref)
    assert op.num_params == min(p, s) * (m + n)
    assert op.rank() == sm.Rank(min(m, n), True)
    assert int(torch.linalg.matrix_rank(ref)) == min(m, n)


def test_monarch_fuses_with_its_neighbours():
    """A product with dense factors stays one einsum when the splits refine."""
    torch.manual_seed(0)
    A = sm.Monarch(16, 16, 4, dtype=F64)
    D = sm.Dense(16, 5, dtype=F64)
    P = A @ D
    assert len(P.cost(1).contractions) == 1
    torch.testing.assert_close(P.dense(), reference_matrix(A) @ D.weight.detach())


# -- project ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "m, n, nblocks, heads", [(16, 16, 4, None), (12, 12, 4, None), (12, 20, 4, 2), (35, 10, 5, None)]
)
def test_project_recovers_a_monarch_matrix(m, n, nblocks, heads):
    source = seeded(m, n, nblocks, seed=1, heads=heads)
    W = source.dense()
    P = sm.project(W, like=seeded(m, n, nblocks, seed=2, heads=heads))
    torch.testing.assert_close(P.dense(), W, rtol=0, atol=1e-12)


def block_pair_counts(m: int, n: int, k: int) -> dict[tuple[int, int], int]:
    """How many intermediate entries join input block a to the output rows of residue l: entry f = a q + j goes to
    l = f mod k."""
    q = min(m, n) // k
    counts: dict[tuple[int, int], int] = {}
    for a in range(k):
        for j in range(q):
            key = ((a * q + j) % k, a)
            counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.parametrize("m, n, nblocks", [(12, 12, 4), (12, 20, 4), (18, 30, 6), (16, 16, 8), (20, 12, 2)])
def test_project_onto_monarch_is_blockwise_eckart_young(m, n, nblocks):
    """The error is the sum over the (m/k, n/k) blocks ``A[l::k, a*p:(a+1)*p]`` of their Eckart-Young tails at rank
    equal to the number of intermediate entries joining them (zero entries: the whole block)."""
    torch.manual_seed(0)
    A = torch.randn(m, n, dtype=F64)
    P = sm.project(A, like=seeded(m, n, nblocks))
    k, p = nblocks, n // nblocks
    counts = block_pair_counts(m, n, k)
    expected = 0.0
    for lb in range(k):
        for a in range(k):
            sv = torch.linalg.svdvals(A[lb::k, a * p : (a + 1) * p])
            expected += float(sv[counts.get((lb, a), 0) :].square().sum())
    assert float(torch.linalg.norm(P.dense().detach() - A)) == pytest.approx(math.sqrt(expected), rel=1e-10)
    for seed in range(5):  # perturbing the projection never helps
        Q = copy.deepcopy(P)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for w in Q.parameters():
                w.add_(1e-3 * torch.randn(w.shape, generator=g, dtype=F64))
        assert float(torch.linalg.norm(Q.dense().detach() - A)) >= math.sqrt(expected) * (1 - 1e-12)


# -- errors -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: sm.Monarch(12, 20, 3), ValueError, r"Monarch\(12, 20, nblocks=3\): nblocks must divide m=12 and n=20"),
        (lambda: sm.Monarch(12, 20, 0), ValueError, r"Monarch\(12, 20, nblocks=0\): nblocks must be >= 1, got 0"),
        (lambda: sm.Monarch(12, 20, 2.0), TypeError, r"Monarch\(12, 20, nblocks=2.0\): nblocks must be an int"),
        (lambda: sm.Monarch(12.0, 20, 2), TypeError, r"Monarch\(12.0, 20, nblocks=2\): m must be an int"),
        (lambda: sm.Monarch(12, 0, 2), ValueError, r"Monarch\(12, 0, nblocks=2\): n must be >= 1, got 0"),
        (lambda: sm.Monarch(12, 20, 2, heads=0), ValueError, r"Monarch\(12, 20, nblocks=2\): heads must be"),
    ],
)
def test_monarch_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()
