"""``op.to_scipy()``: every zoo operator as a ``scipy.sparse.linalg.LinearOperator`` (matvec, rmatvec, matmat, rmatmat
against the dense matrix), scipy's svds/eigsh/cg/gmres on structmat operators against torch.linalg, and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from zoo import STACKS, ZOO
from zoo import build as build_zoo

import structmat as sm
from structmat.interop import ScipyOperator, to_scipy

F64 = torch.float64


def _dense(op: sm.LinearOperator) -> np.ndarray:
    with torch.no_grad():
        return op.dense(F64).numpy()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_products_match_the_dense_matrix(name: str) -> None:
    op = build_zoo(name)
    A = op.to_scipy()
    M = _dense(op)
    m, n = op.shape
    assert isinstance(A, sla.LinearOperator)
    assert A.shape == (m, n) and A.dtype == np.float64
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(n), rng.standard_normal(m)
    X, Y = rng.standard_normal((n, 3)), rng.standard_normal((m, 5))
    for got, want, shape in [
        (A.matvec(x), M @ x, (m,)),
        (A @ x, M @ x, (m,)),
        (A.matvec(x[:, None]), M @ x[:, None], (m, 1)),
        (A.rmatvec(y), M.T @ y, (n,)),
        (A.H @ y, M.T @ y, (n,)),
        (A.rmatvec(y[:, None]), M.T @ y[:, None], (n, 1)),
        (A.matmat(X), M @ X, (m, 3)),
        (A @ X, M @ X, (m, 3)),
        (A.rmatmat(Y), M.T @ Y, (n, 5)),
        (A.T @ Y, M.T @ Y, (n, 5)),
    ]:
        assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == shape
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_module_function_and_method_agree() -> None:
    op = build_zoo("btt2")
    A, B = to_scipy(op), op.to_scipy()
    assert isinstance(A, ScipyOperator) and A.op is op and B.op is op
    x = np.arange(op.shape[1], dtype=np.float64)
    np.testing.assert_array_equal(A.matvec(x), B.matvec(x))


def test_inputs_are_converted_and_outputs_are_new_arrays() -> None:
    op = sm.Identity(6)  # no parameters: computes in float64; its application returns its input
    A = op.to_scipy()
    x = np.arange(6)  # integers are converted
    y = A.matvec(x)
    assert y.dtype == np.float64 and not np.shares_memory(y, x)
    np.testing.assert_array_equal(y, x)
    z = np.arange(6, dtype=np.float64)
    z.flags.writeable = False  # read-only input: no warning, no aliasing
    out = A.matvec(z)
    assert not np.shares_memory(out, z)
    out[0] = 5.0  # writable
    X = np.asfortranarray(np.arange(12.0).reshape(6, 2))  # non-contiguous layouts
    np.testing.assert_array_equal(A.matmat(X), X)


def test_parameter_changes_are_seen() -> None:
    op = build_zoo("dense")
    A = op.to_scipy()
    with torch.no_grad():
        for p in op.parameters():
            p.mul_(2.0)
    x = np.ones(op.shape[1])
    np.testing.assert_allclose(A.matvec(x), _dense(op) @ x, rtol=1e-12)


def test_no_autograd_graph_is_built() -> None:
    op = build_zoo("lowrank")
    assert any(p.requires_grad for p in op.parameters())
    A = op.to_scipy()
    seen = []
    op.register_forward_hook(lambda mod, args, out: seen.append((torch.is_grad_enabled(), out.requires_grad)))
    A.matvec(np.ones(op.shape[1]))
    assert seen == [(False, False)]
    op2 = build_zoo("lowrank")  # a hook on op would not run inside op.T (and would warn): hook the transpose itself
    A2 = op2.to_scipy()
    seen_t = []
    A2._transposed.register_forward_hook(lambda mod, args, out: seen_t.append(out.requires_grad))
    A2.rmatvec(np.ones(op2.shape[0]))
    assert seen_t == [False]


def test_float32_operator_computes_in_float32_and_returns_float64() -> None:
    op64 = build_zoo("btt2")
    op32 = build_zoo("btt2").to(torch.float32)
    assert op32.dtype == torch.float32
    A32, A64 = op32.to_scipy(), op64.to_scipy()
    assert A32.dtype == np.float64
    X = np.random.default_rng(1).standard_normal((op64.shape[1], 4))
    got = A32.matmat(X)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, A64.matmat(X), rtol=1e-4, atol=1e-4)
    assert not np.allclose(got, A64.matmat(X), rtol=1e-12, atol=0)  # float32 arithmetic, honestly reported


def _top_svdvals(op: sm.LinearOperator, k: int) -> np.ndarray:
    return torch.linalg.svdvals(torch.from_numpy(_dense(op)))[:k].numpy()


@pytest.mark.parametrize("name", ["tn_monarch", "btt2", "kron_mixed", "product_refined", "monarch_chained", "sum"])
def test_svds_matches_torch_svdvals(name: str) -> None:
    op = build_zoo(name)
    k = 2
    s = sla.svds(op.to_scipy(), k=k, return_singular_vectors=False, random_state=0, tol=1e-12)
    np.testing.assert_allclose(np.sort(s)[::-1], _top_svdvals(op, k), rtol=1e-8)


@pytest.mark.parametrize("name", ["btt2", "kron_networks", "monarch_rect"])
def test_eigsh_on_a_symmetric_operator(name: str) -> None:
    B = build_zoo(name)
    for S in (B @ B.T, B.T + B if B.shape[0] == B.shape[1] else B.T @ B):
        M = _dense(S)
        np.testing.assert_allclose(M, M.T, atol=1e-12)  # symmetric by construction
        k = 3
        w = sla.eigsh(S.to_scipy(), k=k, which="LA", return_eigenvectors=False, tol=1e-12, v0=np.ones(S.shape[0]))
        want = torch.linalg.eigvalsh(torch.from_numpy(M)).numpy()[-k:]
        np.testing.assert_allclose(np.sort(w), want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", ["btt2", "tn_tt3", "kron_three", "monarch"])
def test_cg_on_an_spd_operator(name: str) -> None:
    B = build_zoo(name)
    m = B.shape[0]
    S = B @ B.T + 0.5 * sm.Identity(m)  # symmetric positive definite
    b = np.random.default_rng(2).standard_normal(m)
    x, info = sla.cg(S.to_scipy(), b, rtol=1e-12, atol=0.0, maxiter=10 * m)
    assert info == 0
    want = torch.linalg.solve(torch.from_numpy(_dense(S)), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(x, want, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("name", ["kron_three", "tn_tt3", "block_diag", "transpose_monarch", "permutation"])
def test_gmres_on_a_square_operator(name: str) -> None:
    op = build_zoo(name)
    n = op.shape[0]
    M0 = _dense(op)
    c = 2.0 * float(np.linalg.norm(M0, 2)) + 1.0  # op + c I: non-symmetric in general, well conditioned
    A = op + c * sm.Identity(n)
    b = np.random.default_rng(3).standard_normal(n)
    x, info = sla.gmres(A.to_scipy(), b, rtol=1e-12, atol=0.0, restart=n, maxiter=20)
    assert info == 0
    want = torch.linalg.solve(torch.from_numpy(_dense(A)), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(x, want, rtol=1e-9, atol=1e-10)


# -- errors --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(STACKS))
def test_heads_are_rejected(name: str) -> None:
    torch.manual_seed(0)
    op = STACKS[name](3)
    with pytest.raises(ValueError, match=r"to_scipy\(\): the operator is a stack of 3 heads") as err:
        op.to_scipy()
    assert op.name in str(err.value)


def test_meta_operator_is_rejected() -> None:
    op = sm.Dense(5, 3, device="meta")
    with pytest.raises(ValueError, match=r"Dense\(5, 3\)\.to_scipy\(\): the operator is on the meta device"):
        op.to_scipy()


def test_not_an_operator_is_rejected() -> None:
    with pytest.raises(TypeError, match="to_scipy: expected a structmat LinearOperator, got ndarray"):
        to_scipy(np.eye(3))


def test_complex_input_is_rejected() -> None:
    A = build_zoo("dense").to_scipy()
    with pytest.raises(TypeError, match=r"Dense\(5, 7\)\.to_scipy\(\)\.matvec: input is complex \(complex128\)"):
        A.matvec(np.ones(7, dtype=np.complex128))
    with pytest.raises(TypeError, match=r"rmatmat: input is complex"):
        A.rmatmat(np.ones((5, 2), dtype=np.complex64))


def test_non_numeric_input_is_rejected() -> None:
    A = build_zoo("dense").to_scipy()
    with pytest.raises(TypeError, match=r"matvec: input must be a real numeric array, got <U1"):
        A.matvec(np.array(list("abcdefg")))


def test_wrong_length_is_rejected_by_scipy() -> None:
    A = build_zoo("dense").to_scipy()
    with pytest.raises(ValueError, match="dimension mismatch"):
        A.matvec(np.ones(5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_operator_moves_vectors_to_its_device() -> None:
    op = build_zoo("btt2")
    M = _dense(op)
    opc = op.to("cuda")
    A = opc.to_scipy()
    X = np.random.default_rng(4).standard_normal((op.shape[1], 3))
    got = A.matmat(X)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    np.testing.assert_allclose(got, M @ X, rtol=1e-10, atol=1e-10)
    y = np.ones(op.shape[0])
    np.testing.assert_allclose(A.rmatvec(y), M.T @ y, rtol=1e-10, atol=1e-10)
