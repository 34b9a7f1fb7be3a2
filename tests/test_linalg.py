"""structmat.linalg: every structural rule against torch.linalg on the dense matrix (float64, distinct sizes), the
rule each structure chooses (so a fallback cannot silently replace a rule), the dense fallback on the square zoo,
algebra laws with hypothesis, and the errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from zoo import ZOO, build

import structmat as sm
from structmat import linalg

F64 = torch.float64


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def wc(n: int, gen: torch.Generator | None = None) -> sm.Dense:
    """A well-conditioned dense ``(n, n)``."""
    return sm.Dense.from_tensor(
        torch.randn(n, n, dtype=F64, generator=gen) + 3 * math.sqrt(n) * torch.eye(n, dtype=F64)
    )


def dg(n: int, gen: torch.Generator | None = None) -> sm.Diagonal:
    """A diagonal with entries of both signs, |d| in [1, 2)."""
    d = torch.rand(n, dtype=F64, generator=gen) + 1
    signs = torch.where(torch.arange(n) % 3 == 1, -1.0, 1.0).to(F64)
    return sm.Diagonal.from_tensor(d * signs)


def lowrank(n: int, r: int) -> sm.LowRank:
    op = sm.LowRank(n, n, rank=r, dtype=F64)
    with torch.no_grad():
        op.U.copy_(0.3 * torch.randn(n, r, dtype=F64))
        op.V.copy_(0.3 * torch.randn(r, n, dtype=F64))
    return op


def perm(n: int) -> sm.Permutation:
    return sm.Permutation(torch.randperm(n, generator=_seeded(n)).tolist())


def stacked_blocks() -> sm.BlockDiagonal:
    W = torch.randn(4, 3, 3, dtype=F64) + 4 * torch.eye(3, dtype=F64)
    return sm.BlockDiagonal(sm.Dense.from_tensor(W))


#: name -> (factory, {task: expected rule}); tasks not listed expect "dense".
CASES = {
    "identity": (lambda: sm.Identity(5), dict.fromkeys(linalg.TASKS, "identity")),
    "diagonal": (lambda: dg(7), dict.fromkeys(linalg.TASKS, "diagonal")),
    "permutation": (lambda: perm(7), dict.fromkeys(linalg.TASKS, "permutation")),
    "axis_permutation": (
        lambda: sm.Permutation.from_axes((3, 4, 2), (2, 0, 1)),
        dict.fromkeys(linalg.TASKS, "permutation"),
    ),
    "scaled_dense": (lambda: -2.5 * wc(6), dict.fromkeys(linalg.TASKS, "scaled")),
    "transpose_kron": (lambda: sm.kron(wc(2), dg(3)).T, dict.fromkeys(linalg.TASKS, "transpose")),
    "transpose_dense": (lambda: wc(5).T, {"logdet": "transpose", "eigvals": "transpose", "svdvals": "transpose"}),
    "kron": (lambda: sm.kron(wc(3), wc(4)), dict.fromkeys(linalg.TASKS, "kronecker")),
    "kron_three": (lambda: sm.kron(wc(2), perm(3), dg(5)), dict.fromkeys(linalg.TASKS, "kronecker")),
    "block_diag": (lambda: sm.block_diag(wc(3), dg(5), perm(2)), dict.fromkeys(linalg.TASKS, "block_diagonal")),
    "block_diag_stack": (stacked_blocks, dict.fromkeys(linalg.TASKS, "block_diagonal")),
    "identity_plus_lowrank": (
        lambda: sm.Identity(12) + lowrank(12, 3),
        {"solve": "woodbury", "inv": "woodbury", "logdet": "determinant_lemma"},
    ),
    "diagonal_plus_lowrank": (
        lambda: lowrank(12, 2) + dg(12),
        {"solve": "woodbury", "inv": "woodbury", "logdet": "determinant_lemma"},
    ),
    "diagonal_minus_product": (
        lambda: (
            dg(7)
            - sm.Dense.from_tensor(0.3 * torch.randn(7, 2, dtype=F64))
            @ sm.Dense.from_tensor(0.3 * torch.randn(2, 7, dtype=F64))
        ),
        {"solve": "woodbury", "inv": "woodbury", "logdet": "determinant_lemma"},
    ),
    "scaled_identity_plus_lowrank_t": (
        lambda: 2.0 * sm.Identity(5) + lowrank(5, 1).T,
        {"solve": "woodbury", "inv": "woodbury", "logdet": "determinant_lemma"},
    ),
    "product_diag_perm": (lambda: dg(5) @ perm(5), {"solve": "product", "inv": "product", "logdet": "product"}),
    "product_dense": (lambda: wc(5) @ wc(5), {}),
}


def _dense(op: sm.LinearOperator) -> torch.Tensor:
    return op.dense(dtype=F64)


def assert_same_eigvals(got: torch.Tensor, want: torch.Tensor, atol: float = 1e-5) -> None:
    """Equal as multisets: each wanted value is matched to the nearest unmatched value got (order-free)."""
    a = got.detach().to(torch.complex128).numpy()
    b = want.detach().to(torch.complex128).numpy()
    assert a.shape == b.shape
    free = np.ones(len(a), dtype=bool)
    for w in b:
        dist = np.where(free, np.abs(a - w), np.inf)
        k = int(np.argmin(dist))
        assert dist[k] < atol * (1 + abs(w)), (w, a)
        free[k] = False


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> tuple[str, sm.LinearOperator, dict[str, str]]:
    torch.manual_seed(3)
    make, rules = CASES[request.param]
    return request.param, make(), rules


def test_rule_chosen(case: tuple[str, sm.LinearOperator, dict[str, str]]) -> None:
    _, op, rules = case
    for task in linalg.TASKS:
        p = linalg.plan(op, task)
        assert p.rule == rules.get(task, "dense"), (task, str(p))
        assert p.flops <= p.dense_flops
        assert linalg.plan(op, task).dense_flops == p.dense_flops


def test_solve(case: tuple[str, sm.LinearOperator, dict[str, str]]) -> None:
    _, op, _ = case
    A = _dense(op)
    n = A.shape[0]
    b = torch.randn(n, dtype=F64)
    B = torch.randn(2, n, 3, dtype=F64)
    torch.testing.assert_close(linalg.solve(op, b), torch.linalg.solve(A, b))
    torch.testing.assert_close(linalg.solve(op, B), torch.linalg.solve(A, B))
    torch.testing.assert_close(linalg.solve(op, b, method="dense"), torch.linalg.solve(A, b))


def test_inv(case: tuple[str, sm.LinearOperator, dict[str, str]]) -> None:
    _, op, rules = case
    Ainv = linalg.inv(op)
    assert isinstance(Ainv, sm.LinearOperator)
    if rules.get("inv", "dense") != "dense":
        assert not isinstance(Ainv, sm.Dense)
    torch.testing.assert_close(_dense(Ainv), torch.linalg.inv(_dense(op)))


def test_logdet(case: tuple[str, sm.LinearOperator, dict[str, str]]) -> None:
    _, op, _ = case
    sign, la = linalg.logdet(op)
    ref = torch.linalg.slogdet(_dense(op))
    assert sign.item() == ref.sign.item()
    torch.testing.assert_close(la.to(F64), ref.logabsdet, atol=1e-5, rtol=1e-6)


def test_eigvals_svdvals(case: tuple[str, sm.LinearOperator, dict[str, str]]) -> None:
    _, op, _ = case
    A = _dense(op)
    assert_same_eigvals(linalg.eigvals(op), torch.linalg.eigvals(A))
    torch.testing.assert_close(linalg.svdvals(op).to(F64), torch.linalg.svdvals(A), atol=1e-6, rtol=1e-6)


def test_solve_and_logdet_are_differentiable() -> None:
    torch.manual_seed(0)
    for op in (sm.Identity(6) + lowrank(6, 2), sm.kron(wc(2), dg(3)), dg(4)):
        b = torch.randn(op.shape[0], dtype=F64)
        params = [p for p in op.parameters() if p.requires_grad]
        got = torch.autograd.grad(linalg.solve(op, b).sum() + linalg.logdet(op).logabsdet, params)
        A = op.dense()
        want = torch.autograd.grad(torch.linalg.solve(A, b).sum() + torch.linalg.slogdet(A).logabsdet, params)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


def test_woodbury_is_cheap_at_scale() -> None:
    op = sm.Identity(2000) + sm.LowRank(2000, 2000, rank=4, dtype=F64)
    p = linalg.plan(op, "solve")
    assert p.rule == "woodbury" and p.flops * 1000 < p.dense_flops
    assert "woodbury" in str(p)


def test_kron_plan_recurses() -> None:
    p = linalg.plan(sm.kron(dg(3), wc(4)), "logdet")
    assert [q.rule for q in p.parts] == ["diagonal", "dense"]
    assert "kronecker" in str(p) and "diagonal" in str(p)


# -- the dense fallback on the square zoo -----------------------------------------------------------------------------
SQUARE_ZOO = [name for name in sorted(ZOO) if build(name).shape[0] == build(name).shape[1]]


@pytest.mark.parametrize("name", SQUARE_ZOO)
def test_zoo_square(name: str) -> None:
    op = build(name, seed=1)
    A = _dense(op)
    ref = torch.linalg.slogdet(A)
    sign, la = linalg.logdet(op)
    assert sign.item() == ref.sign.item()
    if ref.sign.item() != 0:
        torch.testing.assert_close(la.to(F64), ref.logabsdet, atol=1e-5, rtol=1e-6)
    assert_same_eigvals(linalg.eigvals(op), torch.linalg.eigvals(A))
    torch.testing.assert_close(linalg.svdvals(op).to(F64), torch.linalg.svdvals(A), atol=1e-6, rtol=1e-6)
    s = torch.linalg.svdvals(A)
    if s[-1] > 1e-6 * s[0]:  # well conditioned: solve and inv are checked too
        b = torch.randn(A.shape[0], dtype=F64)
        x = linalg.solve(op, b)
        torch.testing.assert_close(A @ x.to(F64), b, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(_dense(linalg.inv(op)) @ A, torch.eye(A.shape[0], dtype=F64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", [n for n in sorted(ZOO) if n not in SQUARE_ZOO])
def test_zoo_rectangular_svdvals(name: str) -> None:
    op = build(name, seed=1)
    torch.testing.assert_close(linalg.svdvals(op), torch.linalg.svdvals(_dense(op)), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"must be square, got shape"):
        linalg.logdet(op)


# -- hypothesis: algebra laws ----------------------------------------------------------------------------------------
@st.composite
def invertible(draw: st.DrawFn, n: int, depth: int = 2) -> sm.LinearOperator:
    gen = _seeded(draw(st.integers(0, 2**16)))
    kinds = ["dense", "diagonal", "permutation", "identity", "woodbury"]
    if depth:
        kinds += ["scaled", "transpose", "product"]
        kinds += ["kron"] if any(n % k == 0 for k in range(2, n)) else []
        kinds += ["block_diag"] if n > 1 else []
    kind = draw(st.sampled_from(kinds))
    if kind == "dense":
        return wc(n, gen)
    if kind == "diagonal":
        return dg(n, gen)
    if kind == "permutation":
        return sm.Permutation(torch.randperm(n, generator=gen).tolist())
    if kind == "identity":
        return sm.Identity(n)
    if kind == "woodbury":
        r = draw(st.integers(1, max(1, n - 1)))
        U = sm.Dense.from_tensor(0.3 * torch.randn(n, r, dtype=F64, generator=gen))
        V = sm.Dense.from_tensor(0.3 * torch.randn(r, n, dtype=F64, generator=gen))
        return dg(n, gen) + U @ V
    if kind == "scaled":
        return draw(st.sampled_from([-1.5, 0.5, 3.0])) * draw(invertible(n, depth - 1))
    if kind == "transpose":
        return draw(invertible(n, depth - 1)).T
    if kind == "product":
        return draw(invertible(n, depth - 1)) @ draw(invertible(n, depth - 1))
    if kind == "kron":
        a = draw(st.sampled_from([k for k in range(2, n) if n % k == 0]))
        return sm.kron(draw(invertible(a, depth - 1)), draw(invertible(n // a, depth - 1)))
    a = draw(st.integers(1, n - 1))
    return sm.block_diag(draw(invertible(a, depth - 1)), draw(invertible(n - a, depth - 1)))


SIZES = st.sampled_from([3, 4, 6, 7])


@given(st.data(), SIZES)
def test_hyp_solve_logdet_match_dense(data: st.DataObject, n: int) -> None:
    op = data.draw(invertible(n))
    A = _dense(op)
    b = torch.randn(n, 2, dtype=F64, generator=_seeded(n))
    torch.testing.assert_close(linalg.solve(op, b), torch.linalg.solve(A, b))
    torch.testing.assert_close(op @ linalg.solve(op, b), b)
    sign, la = linalg.logdet(op)
    ref = torch.linalg.slogdet(A)
    assert sign.item() == ref.sign.item()
    torch.testing.assert_close(la.to(F64), ref.logabsdet)


@given(st.data(), SIZES)
def test_hyp_inverse_of_product(data: st.DataObject, n: int) -> None:
    A, B = data.draw(invertible(n)), data.draw(invertible(n))
    left = _dense(linalg.inv(A @ B))
    torch.testing.assert_close(left, _dense(linalg.inv(B)) @ _dense(linalg.inv(A)))
    torch.testing.assert_close(left, torch.linalg.inv(_dense(A) @ _dense(B)))


@given(st.data(), st.sampled_from([2, 3]), st.sampled_from([4, 5]))
def test_hyp_logdet_of_kron(data: st.DataObject, na: int, nb: int) -> None:
    A, B = data.draw(invertible(na, 1)), data.draw(invertible(nb, 1))
    sa, la = linalg.logdet(A)
    sb, lb = linalg.logdet(B)
    s, lk = linalg.logdet(sm.kron(A, B))
    torch.testing.assert_close(lk.to(F64), (nb * la + na * lb).to(F64))
    assert s.item() == (sa**nb * sb**na).item()
    assert linalg.plan(sm.kron(A, B), "logdet").rule == "kronecker"


# -- errors ------------------------------------------------------------------------------------------------------------
def test_errors() -> None:
    with pytest.raises(ValueError, match=r"solve: Dense\(5, 7\) must be square, got shape \(5, 7\)"):
        linalg.solve(sm.Dense(5, 7, dtype=F64), torch.zeros(5, dtype=F64))
    with pytest.raises(ValueError, match=r"inv: Dense\(3, 4\) must be square"):
        linalg.inv(sm.Dense(3, 4))
    with pytest.raises(ValueError, match=r"Diagonal\(3, 3\) is singular \(diagonal entry 1 is 0\)"):
        linalg.solve(sm.Diagonal.from_tensor(torch.tensor([1.0, 0.0, 2.0])), torch.ones(3))
    with pytest.raises(ValueError, match=r"inv: Diagonal\(3, 3\) is singular"):
        linalg.inv(sm.kron(sm.Identity(2), sm.Diagonal.from_tensor(torch.tensor([1.0, 0.0, 2.0]))))
    singular = sm.Dense.from_tensor(torch.ones(4, 4, dtype=F64))
    with pytest.raises(ValueError, match=r"solve: Dense\(4, 4\) is singular \(torch.linalg"):
        linalg.solve(singular, torch.ones(4, dtype=F64))
    with pytest.raises(ValueError, match=r"inv: BlockDiagonal\(8, 8\) is singular"):
        linalg.inv(sm.BlockDiagonal(sm.Dense.from_tensor(torch.ones(2, 4, 4, dtype=F64))))
    with pytest.raises(ValueError, match=r"is singular \(its scale is 0\)"):
        linalg.solve(0.0 * sm.Identity(3), torch.ones(3))
    assert linalg.logdet(singular).sign.item() == 0 and linalg.logdet(singular).logabsdet.item() == -math.inf
    with pytest.raises(ValueError, match=r"Dense\(4, 4, heads=2\) is a stack of 2 heads"):
        linalg.logdet(sm.Dense(4, 4, heads=2))
    with pytest.raises(ValueError, match=r"b must have shape \(4,\) or \(\.\.\., 4, k\), got \(5,\)"):
        linalg.solve(sm.Identity(4), torch.ones(5))
    with pytest.raises(ValueError, match=r"got \(3, 4\)"):
        linalg.solve(sm.Identity(4), torch.ones(3, 4))
    with pytest.raises(TypeError, match=r"b must be a torch.Tensor, got list"):
        linalg.solve(sm.Identity(2), [1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"expected a LinearOperator, got Tensor"):
        linalg.inv(torch.eye(3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"task must be one of"):
        linalg.plan(sm.Identity(2), "det")
    with pytest.raises(ValueError, match=r"method must be 'auto' or 'dense', got 'cg'"):
        linalg.solve(sm.Identity(2), torch.ones(2), method="cg")
    zero_d = sm.Diagonal.from_tensor(torch.tensor([1.0, 0.0, 2.0], dtype=F64)) + lowrank(3, 1)
    with pytest.raises(ValueError, match=r"Woodbury needs an invertible diagonal part.*method='dense'"):
        linalg.solve(zero_d, torch.ones(3, dtype=F64))
    A = _dense(zero_d)
    torch.testing.assert_close(
        linalg.solve(zero_d, torch.ones(3, dtype=F64), method="dense"), torch.linalg.solve(A, torch.ones(3, dtype=F64))
    )
    torch.testing.assert_close(linalg.logdet(zero_d).logabsdet, torch.linalg.slogdet(A).logabsdet)
