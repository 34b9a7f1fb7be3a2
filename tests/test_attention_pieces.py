"""The pieces path (method="pieces": fused calls on sibling blocks merged by log-sum-exp) against the one-score-matrix
path ("scores"), values and gradients in float64, and the automatic choice between the paths.

Every configuration runs with the default leaf (small blocks computed with explicit scores), with no leaf (every
piece through the fused kernel) and with a tiny leaf, so that each code path meets partial blocks, ratios 2 and 3,
masks and shared sides.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import structmat as sm
from structmat_attention import Level, attend, attention_features, functional, mlr_attention, structured_attention
from structmat_attention import _pieces as pieces
from structmat_attention.functional import attention_path

F64 = torch.float64
LEAVES = [None, 0, 3]  # the default leaf, none (the fused kernel everywhere), a tiny one


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.fixture(params=LEAVES, ids=["leaf-default", "no-leaf", "leaf-3"])
def leaf(request, monkeypatch):
    if request.param is not None:
        monkeypatch.setattr(pieces, "LEAF", request.param)
    return request.param


def make_levels(blocks, ranks, d=5, heads=2, scales=None):
    scales = scales or [1.0] * len(blocks)
    return [Level(b, sm.LowRank(d, d, rank=r, heads=heads, dtype=F64), c) for b, r, c in zip(blocks, ranks, scales)]


def compare(levels, t, *, causal=True, unjoined=None, batch=(2,), d_v=3, qk_norm=False, scale="sqrt", v_heads=True):
    """Pieces vs scores: outputs and gradients for x, v and every operator parameter."""
    d = levels[0].op.shape[0]
    heads = levels[0].op.heads
    x = torch.randn(*batch, t, d, dtype=F64, requires_grad=True)
    v_shape = (*batch, heads, t, d_v) if heads is not None and v_heads else (*batch, t, d_v)
    v = torch.randn(v_shape, dtype=F64, requires_grad=True)
    params = [p for lv in levels for p in lv.op.parameters()]
    results = []
    for method in ("pieces", "scores"):
        out = structured_attention(
            x, x, v, levels, causal, scale=scale, qk_norm=qk_norm, method=method, unjoined=unjoined
        )
        weight = torch.linspace(-1.0, 2.0, out.numel(), dtype=F64).reshape(out.shape)
        grads = torch.autograd.grad((out * weight).sum(), [x, v, *params])
        results.append((out, grads))
    (out, grads), (ref, ref_grads) = results
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("t", [16, 13, 7])  # whole blocks, a partial last block, shorter than the coarsest block
def test_global_and_two_binary_levels(leaf, causal, t):
    compare(make_levels([None, 8, 4], [3, 2, 2], scales=[1.0, 0.5, 2.0]), t, causal=causal)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("unjoined", ["mask", "zero"])
@pytest.mark.parametrize("t", [12, 17])
def test_no_global_level(leaf, causal, unjoined, t):
    compare(make_levels([6, 3], [2, 3]), t, causal=causal, unjoined=unjoined)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("t", [27, 25, 9])
def test_ratio_three_nesting(leaf, causal, t):
    compare(make_levels([None, 9, 3], [2, 2, 1]), t, causal=causal)


@pytest.mark.parametrize("causal", [True, False])
def test_mixed_ratios_and_non_powers_of_two(leaf, causal):
    """96 / 48 / 24 style (scaled down: 12 / 6 / 3 / 1) with a partial last block, and two levels of one size."""
    levels = make_levels([None, 12, 6, 3, 1, 6], [2, 1, 2, 1, 1, 1])
    compare(levels, 29, causal=causal)


@pytest.mark.parametrize("t", [1, 2])
def test_tiny_sequences(leaf, t):
    compare(make_levels([None, 4, 2], [2, 1, 1]), t)
    compare(make_levels([4, 2], [2, 1]), t, causal=False)


def test_batch_dims_qk_norm_and_shared_values(leaf):
    levels = make_levels([None, 6, 2], [2, 2, 1], heads=3)
    compare(levels, 14, batch=(2, 3), qk_norm=True, v_heads=False, d_v=4)


def test_single_operators_without_heads(leaf):
    levels = [Level(b, sm.LowRank(5, 5, rank=r, dtype=F64)) for b, r in [(None, 2), (4, 2), (2, 1)]]
    compare(levels, 11, batch=(3,), causal=False)
    compare(levels, 11, batch=(), causal=True)


def test_values_wider_and_narrower_than_the_features(leaf):
    levels = make_levels([None, 4, 2], [2, 2, 1])
    compare(levels, 10, d_v=1)
    compare(levels, 10, d_v=9)


def test_non_lowrank_operators(leaf):
    """Dense and BTT levels: the split's sides differ per operator (a side shared by the heads is broadcast)."""
    levels = [
        Level(None, sm.Dense(4, 4, heads=2, dtype=F64)),
        Level(4, sm.BTT(4, 4, ranks=1, heads=2, dtype=F64)),
        Level(2, sm.LowRank(4, 4, rank=1, heads=2, dtype=F64)),
    ]
    compare(levels, 9, causal=True)


def test_attend_from_features(leaf):
    """attend() with features given directly (constants not 1), as a KV cache's first call does."""
    levels = make_levels([None, 4, 2], [2, 1, 1])
    x = torch.randn(2, 10, 5, dtype=F64)
    v = torch.randn(2, 2, 10, 3, dtype=F64)
    feats = attention_features(x, x, levels, "mup")
    torch.testing.assert_close(
        attend(feats, v, True, method="pieces"), attend(feats, v, True, method="scores"), rtol=1e-10, atol=1e-12
    )


def test_gradcheck_tiny():
    levels = make_levels([None, 4, 2], [2, 1, 1], d=3)
    x = torch.randn(7, 3, dtype=F64, requires_grad=True)
    v = torch.randn(2, 7, 2, dtype=F64, requires_grad=True)
    for leaf in (0, 2):
        pieces.LEAF, old = leaf, pieces.LEAF
        try:
            for causal in (True, False):
                torch.autograd.gradcheck(
                    lambda x, v, c=causal: structured_attention(x, x, v, levels, c, method="pieces"), (x, v)
                )
        finally:
            pieces.LEAF = old


@st.composite
def nested_configs(draw):
    factors = draw(st.lists(st.sampled_from([2, 3]), min_size=1, max_size=3))
    finest = draw(st.integers(1, 3))
    sizes = [finest]
    for f in factors:
        sizes.append(sizes[-1] * f)
    sizes = sorted(sizes, reverse=True)
    with_global = draw(st.booleans())
    blocks = ([None] if with_global else []) + sizes
    ranks = [draw(st.integers(1, 3)) for _ in blocks]
    t = draw(st.integers(1, 2 * sizes[0] + 3))
    causal = draw(st.booleans())
    unjoined = draw(st.sampled_from(["mask", "zero"]))
    leaf = draw(st.sampled_from([0, 2, 4, 64]))
    return blocks, ranks, t, causal, unjoined, leaf


@settings(max_examples=40)
@given(nested_configs())
def test_random_nested_configs(config):
    blocks, ranks, t, causal, unjoined, leaf = config
    torch.manual_seed(len(blocks) * 100 + t)
    old = pieces.LEAF
    pieces.LEAF = leaf
    try:
        compare(make_levels(blocks, ranks, d=4), t, causal=causal, unjoined=unjoined, batch=(1,))
    finally:
        pieces.LEAF = old


def test_memory_is_linear_in_t():
    """What the autograd function keeps: buffers of T · D, no (T, T) matrix."""
    levels = make_levels([None, 64, 32], [4, 2, 2], d=8, heads=2)
    x = torch.randn(256, 8, dtype=F64, requires_grad=True)
    v = torch.randn(2, 256, 8, dtype=F64, requires_grad=True)
    out = structured_attention(x, x, v, levels, True, method="pieces")
    assert type(out.grad_fn).__name__ == "_PiecesAttentionBackward"
    saved = out.grad_fn.saved_tensors
    assert max(t.numel() for t in saved) <= 2 * 256 * 2 * 16  # (1, H, T, 2 D): D = max(Σ r, d_v) = 8


# -- which path runs ---------------------------------------------------------------------------------------------------


def issue_levels(t, heads=4, d=32, dtype=torch.float32):
    """Global + T/2 + T/4 (the issue's configuration, narrower)."""
    return [
        Level(b, sm.LowRank(d, d, rank=r, heads=heads, dtype=dtype)) for b, r in [(None, 8), (t // 2, 4), (t // 4, 4)]
    ]


def test_auto_picks_pieces_for_the_issue_config():
    levels = issue_levels(1024)
    assert attention_path(levels, 1024) == "pieces"
    layer = mlr_attention(32, 4, ranks=[8, 4, 4], max_seq_len=1024)
    assert layer.attention_path(1024) == "pieces"
    cost = layer.cost(1024)
    assert cost.method == "pieces"
    paper = mlr_attention(64, 1, ranks=[32, 8, 6, 4, 4, 4, 4, 2], max_seq_len=1024, qk_norm=True)
    assert paper.attention_path(1024) == "pieces"
    assert paper.attention_path(1000) == "pieces"  # a partial last block


def test_auto_falls_back_and_says_so():
    levels = issue_levels(64)
    assert attention_path(levels, 10, 74, q_offset=64) in ("sdpa", "scores")  # decoding
    assert attention_path(levels, 64, mask=True) in ("sdpa", "scores")
    assert attention_path(levels, 64, key_block=16) == "streamed"
    assert attention_path(levels, 64, method="scores") == "scores"
    assert attention_path(levels, 64, dtype=torch.bfloat16) in ("sdpa", "scores")
    assert attention_path(levels, 64, device="meta") in ("sdpa", "scores")
    assert attention_path(levels, 0) == "empty"
    assert attention_path(levels[:1], 64) == "sdpa"  # one global level: sdpa is one fused call already
    not_nested = [Level(None, levels[0].op), Level(12, levels[1].op), Level(8, levels[2].op)]
    assert attention_path(not_nested, 64) in ("sdpa", "scores")
    windowed = [Level(None, levels[0].op), Level(None, levels[1].op, window=4)]
    assert attention_path(windowed, 64) == "scores"
    layer = mlr_attention(32, 4, ranks=[8, 4, 4], max_seq_len=64)
    assert layer.attention_path(1, past=63) in ("sdpa", "scores")
    assert layer.cost(1, past=63).method == layer.attention_path(1, past=63)
    assert layer.cost(64).method == "pieces"


def test_auto_result_matches_the_reported_path():
    levels = issue_levels(32, heads=2, d=8, dtype=F64)
    x = torch.randn(32, 8, dtype=F64)
    v = torch.randn(2, 32, 3, dtype=F64)
    for path in ("pieces", "sdpa", "scores"):
        torch.testing.assert_close(
            structured_attention(x, x, v, levels, True, method=path), structured_attention(x, x, v, levels, True)
        )


def test_explicit_pieces_that_cannot_run_raises():
    levels = issue_levels(64)
    x = torch.randn(64, 32)
    v = torch.randn(4, 64, 8)
    with pytest.raises(ValueError, match=r"structured_attention: method='pieces' does not apply: a user mask"):
        structured_attention(x, x, v, levels, mask=torch.ones(64, 64, dtype=torch.bool), method="pieces")
    not_nested = [Level(None, levels[0].op), Level(12, levels[1].op), Level(8, levels[2].op)]
    with pytest.raises(ValueError, match=r"block sizes \[12, 8\] are not nested \(8 does not divide 12\)"):
        structured_attention(x, x, v, not_nested, method="pieces")
    with pytest.raises(ValueError, match=r"attention_path: method='pieces' does not apply: .*decoding"):
        attention_path(levels, 1, 65, q_offset=64, method="pieces")
    with pytest.raises(ValueError, match=r"attention_path: method must be 'auto', 'pieces'"):
        attention_path(levels, 64, method="fast")
    with pytest.raises(TypeError, match=r"attention_path: mask must be a bool"):
        attention_path(levels, 64, mask=None)


def test_fused_projections_equal_per_level_features():
    """Sides that cost as much as their dense matrix (low-rank, dense) run as one stacked matmul per token set; the
    features and their gradients equal each level's own (unfused) features. BTT sides and identity sides are not
    fused; a single operator (no heads) mixes with stacks."""
    levels = [
        Level(None, sm.LowRank(6, 6, rank=2, heads=2, dtype=F64)),
        Level(4, sm.Dense(6, 6, heads=2, dtype=F64)),
        Level(2, sm.LowRank(6, 6, rank=1, heads=2, dtype=F64)),
        Level(2, sm.BTT(6, 6, ranks=1, in_factors=(2, 3), out_factors=(2, 3), heads=2, dtype=F64)),
    ]
    assert [lv._dense_sides for lv in levels][::3] == [(True, True), (False, False)]
    assert levels[0]._side_params == (("U", True), ("V", False))  # the low-rank factors are read directly
    assert levels[1]._side_params == (None, ("weight", False))  # Dense: identity query side, the weight
    for same in (True, False):
        x_q = torch.randn(2, 7, 6, dtype=F64, requires_grad=True)
        x_k = x_q if same else torch.randn(2, 5, 6, dtype=F64, requires_grad=True)
        fused = attention_features(x_q, x_k, levels)
        params = [x_q, *(p for lv in levels for p in lv.op.parameters())]
        weights = [torch.randn(t.shape, dtype=F64) for f in fused for t in (f.q, f.k)]
        got = [t for f in fused for t in (f.q, f.k)]
        ref = [t for lv in levels for t in functional.level_features(lv, x_q, x_k)]
        ref = [b.unsqueeze(-3) if b.ndim < a.ndim else b for a, b in zip(got, ref)]  # a side shared by the heads
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b)
        g1 = torch.autograd.grad(sum((a * w).sum() for a, w in zip(got, weights)), params)
        g2 = torch.autograd.grad(sum((b * w).sum() for b, w in zip(ref, weights)), params)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b)
