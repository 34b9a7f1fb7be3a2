"""PyTorch integration of operators: torch.compile with changing shapes, the meta device, and hooks and
parametrizations (``torch.nn.utils.prune``, ``torch.nn.utils.parametrize``) on operators nested in compositions."""

from __future__ import annotations

import warnings

import pytest
import torch
import zoo
from torch._dynamo.testing import CompileCounterWithBackend
from torch.nn.utils import parametrize, prune

import structmat as sm
from structmat.core import nodes as _nodes

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


# -- hooks and parametrizations ----------------------------------------------------------------------------------------
def _pruned_dense(m: int, n: int) -> sm.Dense:
    d = sm.Dense(m, n, dtype=F64)
    prune.l1_unstructured(d, "weight", amount=0.4)
    return d


def _masked(d: sm.Dense) -> torch.Tensor:
    return d.weight_orig.detach() * d.weight_mask


COMPOSITIONS = {  # (composition of the pruned leaf d, its dense matrix from d's current masked weight)
    "product": (lambda d, o: o @ d, lambda w, o: o.weight.detach() @ w),
    "sum": (lambda d, o: d + o.T.T, lambda w, o: w + o.weight.detach()),
    "kronecker": (lambda d, o: sm.kron(o, d), lambda w, o: torch.kron(o.weight.detach(), w)),
}
OTHER_SHAPE = {"product": (3, 5), "sum": (5, 7), "kronecker": (2, 3)}


@pytest.mark.parametrize("kind", sorted(COMPOSITIONS))
def test_prune_nested_leaf_uses_the_current_masked_weight(kind):
    torch.manual_seed(3)
    d = _pruned_dense(5, 7)
    other = sm.Dense(*OTHER_SHAPE[kind], dtype=F64)
    build, reference = COMPOSITIONS[kind]
    op = build(d, other)
    assert (d.weight_mask == 0).sum() == 14  # 40% of 35
    x = torch.randn(4, op.shape[1], dtype=F64)
    torch.testing.assert_close(op(x), x @ reference(_masked(d), other).T)
    opt = torch.optim.SGD(op.parameters(), lr=0.1)
    for _ in range(2):  # a stale pruned weight would be read again (wrong values, and a freed autograd graph)
        opt.zero_grad()
        op(x).square().sum().backward()
        assert (d.weight_orig.grad * (1 - d.weight_mask)).abs().max() == 0  # pruned entries get no gradient
        opt.step()
        torch.testing.assert_close(op(x), x @ reference(_masked(d), other).T)
    prune.random_unstructured(d, "weight", amount=0.5)  # a new mask on top of the first
    assert (d.weight_mask == 0).sum() > 14
    torch.testing.assert_close(op(x), x @ reference(_masked(d), other).T)


def test_prune_nested_leaf_follows_dtype_moves():
    torch.manual_seed(4)
    d = _pruned_dense(5, 7)
    op = (sm.Dense(3, 5, dtype=F64) @ d).to(torch.float32)
    assert op.dtype == torch.float32 and d.dtype == torch.float32
    x = torch.randn(2, 7)
    torch.testing.assert_close(op(x), x @ (op.factors[0].weight @ (d.weight_orig * d.weight_mask)).T.detach())


class _Symmetric(torch.nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + w.mT


@pytest.mark.parametrize("how", ["symmetric", "orthogonal"])
def test_parametrized_nested_leaf_matches_dense_and_gets_gradients(how):
    torch.manual_seed(5)
    s = sm.Dense(5, 5, dtype=F64)
    if how == "symmetric":
        parametrize.register_parametrization(s, "weight", _Symmetric())
    else:
        torch.nn.utils.parametrizations.orthogonal(s, "weight")
    a, b = sm.Dense(3, 5, dtype=F64), sm.Dense(3, 5, dtype=F64)
    op = a @ s + b
    original = s.parametrizations.weight.original
    x = torch.randn(4, 5, dtype=F64)

    def reference() -> torch.Tensor:
        w = _Symmetric()(original) if how == "symmetric" else s.weight
        if how == "orthogonal":
            torch.testing.assert_close(w.T @ w, torch.eye(5, dtype=F64))
        return x @ (a.weight @ w + b.weight).T

    torch.testing.assert_close(op(x), reference())
    (grad,) = torch.autograd.grad(op(x).sin().sum(), original)
    (expected,) = torch.autograd.grad(reference().sin().sum(), original)
    torch.testing.assert_close(grad, expected)
    with torch.no_grad():
        original.add_(0.1 * torch.randn_like(original))  # the next application sees the new original
    torch.testing.assert_close(op(x), reference())


def test_parametrized_leaf_gradcheck():
    torch.manual_seed(6)
    s = sm.Dense(4, 4, dtype=F64)
    parametrize.register_parametrization(s, "weight", _Symmetric())
    op = sm.kron(sm.Dense(2, 3, dtype=F64), s)
    x = torch.randn(3, 12, dtype=F64, requires_grad=True)
    original = s.parametrizations.weight.original
    assert torch.autograd.gradcheck(lambda x, w: op(x), (x, original))  # noqa: ARG005 - w is read through s
    torch.testing.assert_close(op(x), x @ torch.kron(op.parts[0].weight, original + original.T).T)


def test_forward_hooks_on_nested_leaf_warn():
    torch.manual_seed(7)
    d = sm.Dense(5, 7, dtype=F64)
    calls = []
    d.register_forward_hook(lambda mod, inp, out: calls.append("hook"))
    op = sm.Dense(3, 5, dtype=F64) @ d
    x = torch.randn(2, 7, dtype=F64)
    with pytest.warns(UserWarning, match=r"Product\(3, 7\): hooks registered on Dense\(5, 7\) do not run"):
        op(x)
    assert calls == []  # the fused leaf is not called
    d(x)
    assert calls == ["hook"]  # called on its own, it runs its hook
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op(x)  # warned once for this composition and these hooks
        op.register_forward_hook(lambda mod, inp, out: calls.append("outer"))
        sm.Dense(4, 5, dtype=F64)(torch.randn(1, 5, dtype=F64))  # an operator with nothing nested never warns
    assert calls == ["hook"]
    with pytest.warns(UserWarning, match=r"hooks registered on Dense\(5, 7\)"):  # a new hook: looked at again
        op(x)
    assert calls == ["hook", "outer"]  # the outermost operator's hook runs


@pytest.mark.parametrize("register", ["forward_pre_hook", "full_backward_hook", "legacy_weight_norm"])
def test_other_hooks_on_nested_leaf_warn(register):
    d = sm.Dense(5, 7, dtype=F64)
    op = sm.kron(sm.Dense(2, 2, dtype=F64), d.T.T)  # registered after the composition is built
    if register == "forward_pre_hook":
        d.register_forward_pre_hook(lambda mod, inp: None)
    elif register == "full_backward_hook":
        d.register_full_backward_hook(lambda mod, gin, gout: None)
    else:  # the pre-parametrize weight_norm recomputes the weight in a forward pre-hook
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of parametrizations.weight_norm
            torch.nn.utils.weight_norm(d, "weight")
    with pytest.warns(UserWarning, match=r"Kronecker\(10, 14\): hooks registered on Dense\(5, 7\)"):
        op(torch.randn(2, 14, dtype=F64))


def test_pruning_alone_does_not_warn():
    d = _pruned_dense(5, 7)
    op = sm.Dense(3, 5, dtype=F64) @ d
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op(torch.randn(2, 7, dtype=F64))
