"""One contract test over the whole zoo, in float64, against independent dense references."""

from __future__ import annotations

import pytest
import torch
from reference import reference_dense
from zoo import ZOO, build

import structmat as sm

NAMES = sorted(ZOO)


@pytest.fixture(params=NAMES)
def case(request: pytest.FixtureRequest) -> tuple[str, sm.LinearOperator, torch.Tensor]:
    op = build(request.param)
    return request.param, op, reference_dense(op)


def test_apply_matches_reference(case):
    _, op, ref = case
    m, n = op.shape
    x = torch.randn(3, 2, n, dtype=torch.float64)
    torch.testing.assert_close(op(x), x @ ref.T)
    torch.testing.assert_close(op(x[0, 0]), ref @ x[0, 0])  # a single vector


def test_dense_matches_reference(case):
    _, op, ref = case
    torch.testing.assert_close(op.dense(torch.float64), ref)
    assert op.dense(torch.float64).shape == op.shape


def test_matmul_with_tensor(case):
    _, op, ref = case
    m, n = op.shape
    X = torch.randn(n, 4, dtype=torch.float64)
    torch.testing.assert_close(op @ X, ref @ X)
    Xb = torch.randn(2, n, 3, dtype=torch.float64)
    torch.testing.assert_close(op @ Xb, ref @ Xb)
    Y = torch.randn(3, m, dtype=torch.float64)
    torch.testing.assert_close(Y @ op, Y @ ref)


def test_transpose(case):
    _, op, ref = case
    torch.testing.assert_close(op.T.dense(torch.float64), ref.T)
    y = torch.randn(4, op.shape[0], dtype=torch.float64)
    torch.testing.assert_close(op.T(y), y @ ref)
    assert op.T.T.shape == op.shape
    torch.testing.assert_close(op.T.T.dense(torch.float64), ref)


def test_composition_laws(case):
    _, op, ref = case
    ref = ref.contiguous()  # torch.kron rejects some transposed views
    torch.testing.assert_close((op.T @ op).dense(torch.float64), ref.T @ ref)
    torch.testing.assert_close((op + op).dense(torch.float64), 2 * ref)
    torch.testing.assert_close((op - 0.5 * op).dense(torch.float64), 0.5 * ref)
    torch.testing.assert_close(
        sm.kron(op, sm.Identity(2)).dense(torch.float64), torch.kron(ref, torch.eye(2, dtype=ref.dtype))
    )
    torch.testing.assert_close(sm.block_diag(op, op.T).dense(torch.float64), torch.block_diag(ref, ref.T))


def test_rank_bound(case):
    name, op, ref = case
    r = op.rank()
    true = int(torch.linalg.matrix_rank(ref))
    if r.exact:
        assert r.bound == true, name
    else:
        assert r.bound >= true, name
    assert r.bound <= min(op.shape)
    assert sm.numerical_rank(op) == true


def test_cost_shape_facts(case):
    _, op, _ = case
    m, n = op.shape
    c1, c5 = op.cost(1), op.cost(5)
    assert c5.dense_flops == 2 * m * n * 5
    assert c1.batch == 1 and c5.batch == 5
    assert 0 <= c1.flops <= c5.flops
    assert c1.macs <= c1.flops
    assert c5.largest_intermediate >= 0
    for c in c5.contractions:
        assert (
            c.equation.startswith("z") and c.shapes[0][0] % 5 == 0
        )  # a Kronecker part runs at a multiple of the batch


def test_state_dict_round_trip(case):
    name, op, ref = case
    other = build(name, seed=1)
    other.load_state_dict(op.state_dict())
    x = torch.randn(3, op.shape[1], dtype=torch.float64)
    torch.testing.assert_close(other(x), op(x))


def test_gradcheck(case):
    _, op, _ = case
    params = dict(op.named_parameters())
    names = list(params)
    x = torch.randn(2, op.shape[1], dtype=torch.float64, requires_grad=True)

    def f(x: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(op, dict(zip(names, values)), (x,))

    values = [p.detach().clone().requires_grad_(True) for p in params.values()]
    assert torch.autograd.gradcheck(f, (x, *values))


def test_print_tree(case):
    _, op, _ = case
    text = repr(op)
    assert text.splitlines()[0].startswith(op.name)
    assert f"rank<={op.rank().bound}" in text
    assert f"flops/vec={op.cost(1).flops:,}" in text
