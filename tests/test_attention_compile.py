"""Attention layers under ``torch.compile(layer, fullgraph=True)``: the first call may be the compiled one (the
level splits are computed at construction, so dynamo never traces the min cut), and the batch and sequence sizes
may change between calls, for ``dynamic=None``, ``True`` and ``False``.

Compiling is slow on CPU, so the layers are tiny, the three ``dynamic`` modes run on one layer (global + window: the
score-matrix path with its tiles), an MLR layer with nested blocks runs the pieces path (fused kernel calls in a
custom autograd function, traced whole) and the backend is dynamo's ``"eager"`` (what failed was the trace; the graph it
produces runs in eager PyTorch), except for one ``aot_eager`` check (AOT autograd, as inductor uses) of the backward.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from structmat_attention import gswa_attention, mlr_attention, standard_attention

F64 = torch.float64
D, H = 6, 2

LAYERS = {
    "standard": functools.partial(standard_attention, D, H),  # one global level: the fused sdpa path
    "gswa": functools.partial(gswa_attention, D, H, window=2),  # global + window: the scores path and its tiles
    "blocks": functools.partial(mlr_attention, D, H, ranks=[2, 1], block_sizes=[3, 2]),  # no global level: masked
    "mlr": functools.partial(mlr_attention, D, H, ranks=[2, 1, 1], max_seq_len=8),  # nested blocks: pieces path
    "mlr-bidirectional": functools.partial(mlr_attention, D, H, ranks=[2, 1, 1], max_seq_len=8, causal=False),
}
SHAPES = [(2, 5), (3, 7), (1, 4)]  # (batch, T): the second call changes both, the third shrinks them


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def build(name):
    torch.manual_seed(0)
    return LAYERS[name](dtype=F64)


@pytest.mark.parametrize(
    "name,dynamic",
    [
        ("gswa", None),
        ("gswa", True),
        ("gswa", False),
        ("standard", None),
        ("blocks", False),
        ("mlr", None),
        ("mlr", True),
        ("mlr-bidirectional", False),
    ],
)
def test_compiled_first_call_and_changing_sizes(name, dynamic):
    layer = build(name)
    compiled = torch.compile(layer, fullgraph=True, dynamic=dynamic, backend="eager")
    for batch, t in SHAPES:  # compiled before any eager call
        x = torch.randn(batch, t, D, dtype=F64)
        torch.testing.assert_close(compiled(x), layer(x))
        if name.startswith("mlr"):
            assert layer.attention_path(t) == "pieces"


@pytest.mark.parametrize("name", ["gswa", "mlr"])
def test_compiled_copy_and_backward(name):
    """A deep copy (fresh operators without their splits) compiles too; gradients match the eager layer's (for
    "mlr": through the pieces path's autograd function)."""
    layer = copy.deepcopy(build(name))
    compiled = torch.compile(layer, fullgraph=True, dynamic=False, backend="aot_eager")
    for batch, t in SHAPES[:2]:
        x = torch.randn(batch, t, D, dtype=F64, requires_grad=True)
        compiled(x).square().sum().backward()
        got = [x.grad, *(p.grad for p in layer.parameters())]
        x.grad = None
        layer.zero_grad()
        layer(x).square().sum().backward()
        for a, b in zip(got, [x.grad, *(p.grad for p in layer.parameters())]):
            torch.testing.assert_close(a, b)
        layer.zero_grad()
