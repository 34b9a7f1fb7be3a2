"""PyTorch integration of operators: torch.compile with changing shapes, the meta device, and hooks and
parametrizations (``torch.nn.utils.prune``, ``torch.nn.utils.parametrize``) on operators nested in compositions."""

from __future__ import annotations

import pytest
import torch
import zoo
from torch._dynamo.testing import CompileCounterWithBackend

import structmat as sm
from structmat import _nodes

F64 = torch.float64


def _node_kinds(node: _nodes.Node) -> set[str]:
    kinds = {type(node).__name__}
    for child in getattr(node, "children", ()):
        kinds |= _node_kinds(child)
    return kinds


# -- torch.compile: one graph for every batch size ---------------------------------------------------------------------
def _composite() -> sm.LinearOperator:
    """One operator whose lowering holds every node kind: a sum, a chain, a Kronecker product, a gather and a
    block-diagonal (a sum over disjoint slices), around networks (shape (17, 12))."""
    torch.manual_seed(0)
    perm = sm.Permutation([2, 0, 4, 1, 3])
    chain = sm.kron(sm.Dense(6, 2, dtype=F64), sm.Dense(5, 6, dtype=F64)) @ sm.TensorNetwork(
        "y[b,o] = W[b,o,i] x[b,i]", sizes=dict(b=3, o=4, i=2), dtype=F64
    )  # (30, 6): the splits (6, 5) and (3, 4) do not refine, so it chains
    kron = sm.kron(sm.Dense(2, 3, dtype=F64) + sm.Dense(2, 3, dtype=F64), sm.Diagonal(5, dtype=F64) @ perm)
    left = sm.Dense(7, 30, dtype=F64) @ chain  # (7, 6)
    return sm.block_diag(left + 0.5 * sm.Dense(7, 6, dtype=F64), kron @ sm.Dense(15, 6, dtype=F64))  # (22, 12)


@pytest.mark.parametrize("dynamic", [None, True, False])
def test_compile_composite_with_changing_batch_and_leading_dims(dynamic):
    op = _composite()
    assert {"SumNode", "ChainNode", "KronNode", "GatherNode", "NetNode"} <= _node_kinds(op._node)
    assert not op._node.full  # the block-diagonal: disjoint slices
    torch.manual_seed(1)
    xs = [torch.randn(3, 12, dtype=F64), torch.randn(5, 12, dtype=F64), torch.randn(7, 12, dtype=F64)]
    xs.append(torch.randn(2, 6, 12, dtype=F64))  # leading dims
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(op, backend=counter, fullgraph=True, dynamic=dynamic)
    dense = op.dense()
    graphs = []
    for x in xs:
        y = compiled(x)
        torch.testing.assert_close(y, op(x))
        torch.testing.assert_close(y, x @ dense.T)
        graphs.append(counter.frame_count)
    expected = {True: [1, 1, 1], None: [1, 2, 2], False: [1, 2, 3]}[dynamic]  # the batch is never specialized
    assert graphs[:3] == expected
    assert graphs[3] == graphs[2] + 1  # a new number of dims is a new graph


@pytest.mark.parametrize("dynamic", [None, True, False])
def test_compile_stack_per_head_with_changing_batch(dynamic):
    torch.manual_seed(2)
    lr = sm.LowRank(7, 5, rank=2, heads=3, dtype=F64)
    op = lr + sm.Dense(7, 5, dtype=F64)  # a stack plus a single operator broadcast over the heads
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda x: op(x, per_head=True), backend=counter, fullgraph=True, dynamic=dynamic)
    dense = op.dense()  # (3, 7, 5)
    graphs = []
    for lead in [(4,), (6,), (9,), (2, 5)]:
        x = torch.randn(*lead, 3, 5, dtype=F64)
        y = compiled(x)
        torch.testing.assert_close(y, op(x, per_head=True))
        torch.testing.assert_close(y, torch.einsum("hmn,...hn->...hm", dense, x))
        graphs.append(counter.frame_count)
    assert graphs[:3] == {True: [1, 1, 1], None: [1, 2, 2], False: [1, 2, 3]}[dynamic]


# -- the meta device ---------------------------------------------------------------------------------------------------
def _meta_zoo(name: str, monkeypatch: pytest.MonkeyPatch) -> sm.LinearOperator:
    """The zoo operator built under ``torch.device("meta")``: every tensor it creates is a meta tensor. A
    permutation's structure is data, so the zoo draws it on the CPU (a meta ``randperm`` has no values)."""
    gen = zoo.perm

    def perm(n: int) -> sm.Permutation:
        with torch.device("cpu"):
            return gen(n)

    monkeypatch.setattr(zoo, "perm", perm)
    with torch.device("meta"):
        return zoo.build(name)


def _check_meta_apply(op: sm.LinearOperator) -> None:
    m, n = op.shape
    heads = () if op.heads is None else (op.heads,)
    x = torch.empty(3, 4, n, dtype=op.dtype or F64, device="meta")
    y = op(x)
    assert y.device.type == "meta"
    assert y.shape == (3, 4, *heads, m)
    assert op.T(torch.empty(5, m, dtype=op.dtype or F64, device="meta")).shape == (5, *heads, n)


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_meta_operator_applies_to_meta_tensor(name, monkeypatch):
    op = _meta_zoo(name, monkeypatch)
    assert all(t.device.type == "meta" for t in op.parameters())
    _check_meta_apply(op)


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_operator_moved_to_meta_applies_to_meta_tensor(name):
    op = zoo.build(name).to("meta")
    assert all(t.device.type == "meta" for t in op.parameters())
    _check_meta_apply(op)


def test_meta_stack_per_head_and_autocast():
    op = sm.Monarch(6, 9, nblocks=3, heads=4, device="meta") + sm.Dense(6, 9, device="meta")
    x = torch.empty(5, 2, 4, 9, device="meta")
    assert op(x, per_head=True).shape == (5, 2, 4, 6)
    assert op(x[:, :, 0]).shape == (5, 2, 4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast on another device type leaves meta alone
        y = op(x, per_head=True)
    assert y.shape == (5, 2, 4, 6) and y.dtype == torch.float32 and y.device.type == "meta"
    assert op.dense().shape == (4, 6, 9)
