"""The execution engine (structmat.core.engine) vs the einsum reference it replaces: values and gradients in float64,
for every operator of the zoo, stacks of heads, distinct batch sizes, scaled and random networks, strided inputs and
autocast; and the layouts it promises (contiguous outputs, no copy of the activations where a view does)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import zoo
from hypothesis import given, settings
from hypothesis import strategies as st
from test_algebra import any_operator

import structmat as sm
from structmat.core import engine as _exec
from structmat.core import nodes as _nodes

F64 = torch.float64


@pytest.fixture(autouse=True)
def _engine_at_every_size(monkeypatch):
    """The tests use small sizes: run the engine there too (by default small networks leave the work to einsum)."""
    monkeypatch.setattr(_nodes, "ENGINE_MIN_FLOPS", 0)


@contextlib.contextmanager
def _reference():
    """Run networks through the einsum reference (the engine off)."""
    saved = _nodes.USE_ENGINE
    _nodes.USE_ENGINE = False
    try:
        yield
    finally:
        _nodes.USE_ENGINE = saved


def _nets(node: _nodes.Node) -> list[_nodes.NetNode]:
    found = [node] if isinstance(node, _nodes.NetNode) else []
    for child in getattr(node, "children", ()):
        found += _nets(child)
    return found


def _run(op: sm.LinearOperator, x: torch.Tensor, per_head: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The output and the gradients of a fixed random functional of it (input first, then the parameters)."""
    x = x.detach().clone().requires_grad_(True)
    params = [p for p in op.parameters() if p.requires_grad]
    y = op(x, per_head=per_head) if per_head else op(x)
    w = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad((y * w).sum(), [x, *params], allow_unused=True)
    return y.detach(), [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, [x, *params])]


def _check(op: sm.LinearOperator, x: torch.Tensor, per_head: bool = False) -> torch.Tensor:
    y, grads = _run(op, x, per_head)
    with _reference():
        y_ref, grads_ref = _run(op, x, per_head)
    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)
    assert y.is_contiguous()
    return y


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
@pytest.mark.parametrize("batch", [1, 3, 7])
def test_zoo_matches_the_einsum_reference(name, batch):
    op = zoo.build(name)
    x = torch.randn(batch, op.shape[1], dtype=F64)
    _check(op, x)
    if op.heads is None:
        torch.testing.assert_close(_check(op, x.reshape(batch, 1, -1)), op(x).reshape(batch, 1, -1))


def test_the_zoo_runs_on_the_engine():
    """Every network of the zoo with a factor compiles to a program (none falls back to the einsum silently)."""
    missing = []
    for name in sorted(zoo.ZOO):
        op = zoo.build(name)
        op(torch.randn(5, op.shape[1], dtype=F64))
        for net in _nets(op._node):
            for plan in net._plans.values():
                if plan.program is None and "," in plan.equation:
                    missing.append((name, plan.equation))
    assert missing == []


def _stacks() -> list[sm.LinearOperator]:
    torch.manual_seed(0)
    return [
        sm.Dense(5, 7, heads=3, dtype=F64),
        sm.LowRank(6, 5, rank=2, heads=3, dtype=F64),
        sm.BTT(12, 10, ranks=2, heads=3, dtype=F64),
        sm.Monarch(6, 9, nblocks=3, heads=3, dtype=F64),
        sm.Monarch(12, 20, nblocks=4, heads=3, dtype=F64),
        sm.Dense(5, 7, heads=3, dtype=F64) @ sm.Dense(7, 4, dtype=F64),
        sm.kron(sm.Dense(2, 3, heads=3, dtype=F64), sm.Dense(5, 4, heads=3, dtype=F64)),
    ]


@pytest.mark.parametrize("k", range(7))
@pytest.mark.parametrize("batch", [1, 4, 5])
def test_stacks_of_heads_shared_and_per_head_inputs(k, batch):
    op = _stacks()[k]
    heads, (m, n) = op.heads, op.shape
    y = _check(op, torch.randn(batch, n, dtype=F64))
    assert y.shape == (batch, heads, m)
    y = _check(op, torch.randn(batch, heads, n, dtype=F64), per_head=True)
    assert y.shape == (batch, heads, m)
    dense = op.dense()
    x = torch.randn(batch, heads, n, dtype=F64)
    torch.testing.assert_close(op(x, per_head=True), torch.einsum("zhn,hmn->zhm", x, dense))


@pytest.mark.parametrize(
    "make",
    [
        lambda: 2.5 * sm.BTT(12, 10, ranks=2, dtype=F64),
        lambda: -0.5 * sm.Monarch(8, 12, nblocks=2, dtype=F64),
        lambda: 3.0 * sm.kron(sm.Dense(3, 4, dtype=F64), sm.Dense(5, 2, dtype=F64)),
        lambda: 0.5 * (sm.LowRank(7, 5, rank=2, dtype=F64) @ sm.Dense(5, 6, dtype=F64)),
    ],
)
@pytest.mark.parametrize("batch", [1, 2, 40])
def test_scaled_networks(make, batch):
    torch.manual_seed(1)
    op = make()
    x = torch.randn(batch, op.shape[1], dtype=F64)
    _check(op, x)
    torch.testing.assert_close(op(x), x @ op.dense().T)


@pytest.mark.parametrize("name", ["dense", "btt2", "btt3", "monarch", "kron_from_sizes", "mlr", "tn_tt3"])
def test_strided_inputs(name):
    op = zoo.build(name)
    n = op.shape[1]
    base = torch.randn(2 * n, 9, dtype=F64)
    for x in (base[::2].T, torch.randn(5, 3 * n, dtype=F64)[:, ::3], torch.randn(n, 6, dtype=F64).T):
        assert not x.is_contiguous()
        y = _check(op, x)
        torch.testing.assert_close(y, x @ op.dense().T)
    x = torch.randn(4, 7, n, dtype=F64).transpose(0, 1)  # leading dims, not contiguous
    torch.testing.assert_close(op(x), x @ op.dense().T)


def test_matmul_with_a_tensor_reads_a_transposed_view():
    op = zoo.build("btt2")
    t = torch.randn(op.shape[1], 6, dtype=F64)
    torch.testing.assert_close(op @ t, op.dense() @ t)


@pytest.mark.parametrize("name", ["btt2", "monarch_rect", "kron_from_sizes", "lowrank"])
def test_autocast_matches_the_reference(name):
    torch.manual_seed(0)
    op = zoo.build(name).float()
    x = torch.randn(6, op.shape[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = op(x)
        with _reference():
            y_ref = op(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)


@settings(max_examples=60)
@given(any_operator(), st.sampled_from([1, 2, 5]))
def test_random_compositions_match_the_reference(op, batch):
    dtype = op.dtype or F64
    x = torch.randn(batch, op.shape[1], dtype=dtype)
    y, grads = _run(op, x)
    with _reference():
        y_ref, grads_ref = _run(op, x)
    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)
    assert y.is_contiguous()


# -- the layouts the engine promises ---------------------------------------------------------------------------------
def _program(op: sm.LinearOperator, batch: int) -> _exec.Program:
    op(torch.randn(batch, op.shape[1], dtype=op.dtype))
    (net,) = _nets(op._node)
    program = net._plans[(batch, False)].program
    assert program is not None
    return program


def _factor_elements(op: sm.LinearOperator) -> int:
    return sum(p.numel() for p in op.parameters())


@pytest.mark.parametrize(
    "make",
    [
        lambda: sm.Dense(48, 40, dtype=F64),
        lambda: sm.LowRank(48, 40, rank=3, dtype=F64),
        lambda: sm.Kronecker.from_sizes((6, 5), (8, 8), dtype=F64),
        lambda: sm.BTT(48, 40, ranks=1, in_factors=(5, 8), out_factors=(6, 8), dtype=F64),
        lambda: sm.BTT(64, 64, ranks=4, dtype=F64),
        lambda: sm.MLR(48, 40, ranks=[2, 1], blocks=[1, 4], dtype=F64).levels[1],
    ],
)
def test_no_copy_of_the_activations(make):
    """Dense, low rank, Kronecker, BTT and a block level run as GEMMs on views of the activations, each step
    writing its output in the layout the next one reads (the last one: the (B, m) output): the program copies at
    most the factors, never a batch-sized tensor."""
    op = make()
    batch = 64
    program = _program(op, batch)
    assert program.copies <= _factor_elements(op) + 1
    y = op(torch.randn(batch, op.shape[1], dtype=F64))
    assert y.is_contiguous()


def test_monarch_copies_one_activation():
    """A Monarch's output interleaves its blocks (y[t k + l]); no GEMM writes that with a unit stride, so one
    batch-sized copy is left (the paper's code makes two: the middle transpose and the output permutation)."""
    op = sm.Monarch(64, 64, nblocks=8, dtype=F64)
    program = _program(op, 32)
    assert program.copies <= 4 * (32 * 64 + _factor_elements(op))  # weighted: a transposing copy counts 4x


def test_dense_is_one_linear_call():
    program = _program(sm.Dense(6, 5, dtype=F64), 4)
    assert [st.kernel for st in program.steps] == ["linear"] and program.final_perm is None


def test_double_backward_through_a_step_written_in_place():
    torch.manual_seed(0)
    op = sm.BTT(12, 10, ranks=2, dtype=F64)
    x = torch.randn(3, 10, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: op(t), (x,))
    assert torch.autograd.gradgradcheck(lambda t: op(t), (x,))


_ORDERS = [((3, 5, 7), (0, 1, 2)), ((3, 7, 5), (0, 2, 1)), ((5, 3, 7), (1, 0, 2)), ((7, 3, 5), (1, 2, 0))]


def _operand(shape: tuple[int, ...], layout: str) -> torch.Tensor:
    """A float64 leaf of ``shape`` stored row-major, column-major in each matrix, or batch-in-the-middle."""
    if layout == "row":
        t = torch.randn(shape, dtype=F64)
    elif layout == "col":
        t = torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=F64).mT
    else:
        t = torch.randn(shape[1], shape[0], shape[2], dtype=F64).transpose(0, 1)
    return t.requires_grad_(True)


@pytest.mark.parametrize("into", _ORDERS)
@pytest.mark.parametrize("layouts", [("row", "row"), ("col", "mid"), ("mid", "col")])
def test_gemm_kernel_matches_bmm(into, layouts):
    """The engine's GEMM step (output in each memory order, operands in several layouts) against torch.bmm: values,
    gradients in float64, gradients laid out as their operands, and double backward."""
    torch.manual_seed(0)
    a = _operand((3, 5, 2), layouts[0])
    b = _operand((3, 2, 7), layouts[1])
    c = _exec._Gemm.apply(a, b, into, 0, 0, (False, False))
    torch.testing.assert_close(c, torch.bmm(a, b))
    shape, perm = into
    assert c.permute(*[perm.index(d) for d in range(3)]).is_contiguous()  # written in the chosen memory order
    g = torch.randn(3, 5, 7, dtype=F64)
    ga, gb = torch.autograd.grad(c, (a, b), g)
    ra, rb = torch.autograd.grad(torch.bmm(a, b), (a, b), g)
    torch.testing.assert_close(ga, ra)
    torch.testing.assert_close(gb, rb)
    assert ga.stride() == a.stride() and gb.stride() == b.stride()
    assert torch.autograd.gradcheck(lambda p, q: _exec._Gemm.apply(p, q, into, 0, 0, (False, False)), (a, b))
    assert torch.autograd.gradgradcheck(lambda p, q: _exec._Gemm.apply(p, q, into, 0, 0, (False, False)), (a, b))


@pytest.mark.parametrize("side", ["a", "b"])
@pytest.mark.parametrize("layout", ["row", "col", "mid"])
@pytest.mark.parametrize("many", [False, True])
def test_gemm_kernel_broadcast_operand(side, layout, many):
    """One matrix broadcast over the batch (its gradient: a sum over the batch, one GEMM where the layouts fold, a
    batched GEMM and a sum where they do not), and batches of many small products (MKL's batched path)."""
    torch.manual_seed(0)
    nb = _exec._MANY + 3 if many else 3
    if side == "a":
        w = torch.randn(1, 5, 2, dtype=F64, requires_grad=True)
        x = _operand((nb, 2, 7), layout)
        args, ref = (w, x, 0, 0), (w.expand(nb, 5, 2), x)
        expand = (nb, 0)
    else:
        x = _operand((nb, 5, 2), layout)
        w = torch.randn(1, 2, 7, dtype=F64, requires_grad=True)
        args, ref = (x, w), (x, w.expand(nb, 2, 7))
        expand = (0, nb)
    for into in (((nb, 5, 7), (0, 1, 2)), ((nb, 7, 5), (0, 2, 1)), ((5, nb, 7), (1, 0, 2))):
        c = _exec._Gemm.apply(*args[:2], into, *expand, (False, False))
        torch.testing.assert_close(c, torch.bmm(*ref))
        g = torch.randn(nb, 5, 7, dtype=F64)
        grads = torch.autograd.grad(c, args[:2], g)
        grads_ref = torch.autograd.grad(torch.bmm(*ref), args[:2], g)
        for got, want in zip(grads, grads_ref):
            torch.testing.assert_close(got, want)
    if not many:
        f = lambda p, q: _exec._Gemm.apply(p, q, ((nb, 5, 7), (0, 1, 2)), *expand, (False, False))  # noqa: E731
        assert torch.autograd.gradcheck(f, args[:2])
        assert torch.autograd.gradgradcheck(f, args[:2])


@pytest.mark.parametrize("into", [((5, 7), (0, 1)), ((7, 5), (1, 0))])
def test_gemm_kernel_single_matrix(into):
    torch.manual_seed(0)
    a = _operand((5, 2), "col")
    b = _operand((2, 7), "row")
    c = _exec._Gemm.apply(a, b, into, 0, 0, (False, False))
    torch.testing.assert_close(c, a @ b)
    ga, gb = torch.autograd.grad(c, (a, b), torch.ones(5, 7, dtype=F64))
    assert ga.stride() == a.stride() and gb.stride() == b.stride()
    assert torch.autograd.gradcheck(lambda p, q: _exec._Gemm.apply(p, q, into, 0, 0, (False, False)), (a, b))


@pytest.mark.parametrize("layout", ["row", "col"])
def test_gemm_kernel_writes_a_factor_gradient_wide(layout):
    """A factor's (tall) gradient is written wide in memory (MKL's faster orientation); values as torch.mm's."""
    torch.manual_seed(0)
    x = torch.randn(6, 9, dtype=F64, requires_grad=True)
    w = _operand((9, 2), layout)
    c = _exec._Gemm.apply(x, w, ((6, 2), (0, 1)), 0, 0, (False, True))
    g = torch.randn(6, 2, dtype=F64)
    gx, gw = torch.autograd.grad(c, (x, w), g)
    rx, rw = torch.autograd.grad(x @ w, (x, w), g)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
    assert gw.stride() == (1, 9) and gx.stride() == x.stride()


def test_small_networks_leave_the_work_to_einsum(monkeypatch):
    """Under ENGINE_MIN_FLOPS a program of several steps is not run (its per-step Python costs more than it saves);
    a single GEMM always is; the einsum's output comes back contiguous all the same."""
    monkeypatch.setattr(_nodes, "ENGINE_MIN_FLOPS", 1 << 19)
    ran = []
    run = _exec.Program.run
    monkeypatch.setattr(_exec.Program, "run", lambda self, *a: ran.append(len(self.steps)) or run(self, *a))
    op = sm.BTT(12, 20, ranks=2, dtype=F64)  # 2 steps
    small, large = torch.randn(3, 20, dtype=F64), torch.randn(4096, 20, dtype=F64)
    assert op.cost(3).flops < 1 << 19 <= op.cost(4096).flops
    y = op(small)
    assert ran == [] and y.is_contiguous()
    torch.testing.assert_close(y, small @ op.dense().T)
    op(large)
    assert ran == [2]
    ran.clear()
    stack = sm.Dense(5, 7, heads=3, dtype=F64)  # one step (a batched GEMM): always the engine
    stack(torch.randn(2, 3, 7, dtype=F64), per_head=True)
    assert ran == [1]


@pytest.mark.parametrize(
    "make",
    [
        lambda: sm.Dense(7, 5, dtype=F64),
        lambda: sm.Dense(12, 3, dtype=F64) @ sm.Dense(3, 5, dtype=F64),
        lambda: sm.Dense(5, 7, dtype=F64).T @ sm.Dense(5, 3, dtype=F64),
        lambda: 2.5 * (sm.Dense(7, 3, dtype=F64) @ sm.Dense(3, 12, dtype=F64) @ sm.Dense(12, 5, dtype=F64)),
        lambda: sm.LowRank(12, 7, rank=3, dtype=F64),
        lambda: -0.5 * sm.Dense(3, 12, dtype=F64).T,
    ],
)
@pytest.mark.parametrize("batch", [1, 5, 4096])
def test_chains_of_matrices_run_as_linear_calls(make, batch):
    """A chain of matrices applied x-first (when that order is as cheap as the plan) is a sequence of F.linear calls,
    against the einsum reference: values and gradients, float64, outputs contiguous."""
    op = make()
    x = torch.randn(batch, op.shape[1], dtype=F64)
    op(x)
    chain = op._node._plans[(batch, False)].chain
    if chain is not None:
        assert sorted(k for k, _ in chain) == list(range(1, len(op._node.network.factors) + 1))
    _check(op, x)


def test_linear_chain_detection():
    """Hand-derived: which networks are chains, in which order and orientation, and when x-first is too costly."""
    chain = _nodes._linear_chain
    assert chain("za,ba->zb", [(4, 3), (5, 3)], 2 * 4 * 15) == ((1, False),)
    assert chain("za,bc,ca->zb", [(4, 3), (5, 2), (2, 3)], 10**9) == ((2, False), (1, False))
    assert chain("za,ab,bc->zc", [(4, 3), (3, 2), (2, 5)], 10**9) == ((1, True), (2, True))
    assert chain("za,ab,bc->zc", [(4, 3), (3, 2), (2, 5)], 2 * 4 * (6 + 10) - 1) is None  # x-first costs more
    assert chain("zab,cab->zc", [(4, 3, 2), (5, 3, 2)], 10**9) is None  # x has two modes
    assert chain("za,ab,ac->zbc", [(4, 3), (3, 2), (3, 5)], 10**9) is None  # not a chain
    assert chain("za,aa->za", [(4, 3), (3, 3)], 10**9) is None  # a diagonal, not a matrix
