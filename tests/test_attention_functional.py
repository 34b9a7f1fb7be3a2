"""The functional attention core against explicit float64 references: per-pair matrices A_ij built densely."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import structmat as sm
from structmat_attention import Level, bilinear_scores, functional, structured_attention

F64 = torch.float64


def dense_heads(op: sm.LinearOperator) -> torch.Tensor:
    """(H, D_q, D_k) for a stack, (1, D_q, D_k) for a single operator (references use dense())."""
    d = op.dense()
    return d if d.ndim == 3 else d.unsqueeze(0)


def reference_scores(x_q, x_k, levels, q_offset=0, scale=1.0):
    """s[h, i, j] = x_q[i]^T (Σ_l [pair in level l] c_l W_l[h]) x_k[j], one pair at a time."""
    t_q, t_k = x_q.shape[0], x_k.shape[0]
    heads = max(dense_heads(lv.op).shape[0] for lv in levels)
    s = torch.zeros(heads, t_q, t_k, dtype=F64)
    for i in range(t_q):
        for j in range(t_k):
            a = torch.zeros(heads, x_q.shape[1], x_k.shape[1], dtype=F64)
            for lv in levels:
                qi, kj = i + q_offset, j
                if lv.block_size is not None and qi // lv.block_size != kj // lv.block_size:
                    continue
                if lv.window is not None and abs(qi - kj) >= lv.window:
                    continue
                a = a + lv.scale * dense_heads(lv.op)
            s[:, i, j] = scale * torch.einsum("m,hmn,n->h", x_q[i], a, x_k[j])
    return s


def reference_attention(s, v, causal=False, q_offset=0, mask=None):
    s = s.clone()
    t_q, t_k = s.shape[-2:]
    for i in range(t_q):
        for j in range(t_k):
            if (causal and j > i + q_offset) or (mask is not None and not bool(mask[i, j])):
                s[..., i, j] = -math.inf
    p = torch.exp(s - s.amax(-1, keepdim=True))
    p = p / p.sum(-1, keepdim=True)
    return p @ v


def lowrank(d, r, heads=None):
    return sm.LowRank(d, d, rank=r, heads=heads, dtype=F64)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def test_standard_attention_is_lowrank_level():
    d, r, h, t = 12, 3, 2, 7
    W = lowrank(d, r, heads=h)
    x = torch.randn(t, d, dtype=F64)
    v = torch.randn(h, t, 5, dtype=F64)
    q = torch.einsum("tm,hmr->htr", x, W.U)  # W = U V: query features U^T x, key features V x
    k = torch.einsum("hrn,tn->htr", W.V, x)
    expected = torch.softmax(q @ k.mT / math.sqrt(r), dim=-1) @ v
    out = structured_attention(x, x, v, W, scale="sqrt")
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(bilinear_scores(x, x, W, scale="mup") * r, q @ k.mT)


@pytest.mark.parametrize("t", [8, 7, 5])  # blocks divide T, and blocks that don't
def test_multilevel_matches_pairwise_reference(t):
    d, h = 6, 3
    levels = [
        Level(None, lowrank(d, 2, heads=h), 0.7),
        Level(4, lowrank(d, 1, heads=h), 1.3),
        Level(2, sm.BTT(d, d, ranks=1, in_factors=(2, 3), out_factors=(3, 2), heads=h, dtype=F64)),
        Level(None, window=3, op=lowrank(d, 2, heads=h), scale=-0.4),
    ]
    x = torch.randn(2, t, d, dtype=F64)
    s = bilinear_scores(x, x, levels)
    for b in range(2):
        torch.testing.assert_close(s[b], reference_scores(x[b], x[b], levels))
    v = torch.randn(2, h, t, 4, dtype=F64)
    out = structured_attention(x, x, v, levels, causal=True)
    for b in range(2):
        torch.testing.assert_close(out[b], reference_attention(reference_scores(x[b], x[b], levels), v[b], True))


def test_rectangular_queries_keys_and_offset():
    levels = [Level(None, sm.LowRank(5, 7, rank=2, dtype=F64)), Level(3, sm.Dense(5, 7, dtype=F64), 0.5)]
    x_q, x_k = torch.randn(4, 5, dtype=F64), torch.randn(9, 7, dtype=F64)
    s = bilinear_scores(x_q, x_k, levels, q_offset=5)
    torch.testing.assert_close(s, reference_scores(x_q, x_k, levels, q_offset=5)[0])


def test_one_level_mlr_equals_standard_attention():
    d, t = 8, 6
    W = lowrank(d, 4, heads=2)
    x, v = torch.randn(t, d, dtype=F64), torch.randn(2, t, 3, dtype=F64)
    torch.testing.assert_close(
        structured_attention(x, x, v, [Level(t, W)], causal=True), structured_attention(x, x, v, W, causal=True)
    )


def test_identity_gives_dot_product_attention():
    d, t = 5, 6
    x, v = torch.randn(t, d, dtype=F64), torch.randn(t, 2, dtype=F64)
    expected = torch.softmax(x @ x.T, dim=-1) @ v
    torch.testing.assert_close(structured_attention(x, x, v, sm.Identity(d)), expected)


def test_bilinear_btt_uses_raw_query_and_full_rank():
    d = 16
    W = sm.BTT(d, d, ranks=2, heads=2, dtype=F64)
    L, R = sm.bilinear_split(W)
    assert isinstance(L, sm.Identity) and R is W  # full rank: queries are the raw tokens
    x = torch.randn(5, d, dtype=F64)
    torch.testing.assert_close(bilinear_scores(x, x, W), torch.einsum("im,hmn,jn->hij", x, W.dense(), x))


def test_key_block_streaming_matches():
    d, h, t = 6, 2, 11
    levels = [
        Level(None, lowrank(d, 2, heads=h)),
        Level(4, lowrank(d, 1, heads=h)),
        Level(None, lowrank(d, 1, heads=h), window=2),
    ]
    x = torch.randn(t, d, dtype=F64)
    v = torch.randn(h, t, 3, dtype=F64)
    pad = torch.ones(t, t, dtype=torch.bool)
    pad[:, -2:] = False
    for causal in (False, True):
        full = structured_attention(x, x, v, levels, causal=causal, mask=pad)
        for kb in (1, 3, 5):
            torch.testing.assert_close(
                structured_attention(x, x, v, levels, causal=causal, mask=pad, key_block=kb), full
            )


def test_padding_mask_and_fully_masked_rows():
    d, t = 4, 5
    x, v = torch.randn(t, d, dtype=F64), torch.randn(t, 3, dtype=F64)
    W = sm.Dense(d, d, dtype=F64)
    mask = torch.rand(t, t) > 0.3
    mask[2] = False  # a query that sees nothing gets zeros
    out = structured_attention(x, x, v, W, mask=mask)
    s = reference_scores(x, x, [Level(None, W)])[0]
    ref = reference_attention(s, v, mask=mask)
    keep = mask.any(-1)
    torch.testing.assert_close(out[keep], ref[keep])
    assert torch.equal(out[2], torch.zeros(3, dtype=F64))
    additive = torch.zeros(t, t, dtype=F64).masked_fill(~mask, -math.inf)
    torch.testing.assert_close(structured_attention(x, x, v, W, mask=additive)[keep], ref[keep])


def test_causal_does_not_leak():
    d, t = 6, 9
    levels = [
        Level(None, lowrank(d, 2, heads=2)),
        Level(4, lowrank(d, 2, heads=2)),
        Level(None, lowrank(d, 1, heads=2), window=3),
    ]
    x, v = torch.randn(t, d, dtype=F64), torch.randn(t, 3, dtype=F64)
    base = structured_attention(x, x, v, levels, causal=True)
    for pos in range(t):
        x2, v2 = x.clone(), v.clone()
        x2[pos] += 10.0
        v2[pos] -= 5.0
        out = structured_attention(x2, x2, v2, levels, causal=True)
        torch.testing.assert_close(out[:, :pos], base[:, :pos])
        assert not torch.allclose(out[:, pos:], base[:, pos:])


def test_qk_norm():
    d, t = 8, 5
    W = lowrank(d, 4)
    x = torch.randn(t, d, dtype=F64)
    L, R = sm.bilinear_split(W)
    q = torch.nn.functional.layer_norm(L(x), (4,))
    k = torch.nn.functional.layer_norm(R(x), (4,))
    torch.testing.assert_close(bilinear_scores(x, x, W, qk_norm=True), q @ k.T)


def test_gradcheck():
    d, t = 4, 5
    W = lowrank(d, 2, heads=2)
    levels = [Level(None, W), Level(2, sm.Dense(d, d, heads=2, dtype=F64), 0.5)]
    x = torch.randn(t, d, dtype=F64, requires_grad=True)
    v = torch.randn(2, t, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v: structured_attention(x, x, v, levels, causal=True), (x, v))
    assert torch.autograd.gradcheck(
        lambda x, v: structured_attention(x, x, v, levels, causal=True, key_block=2), (x, v)
    )
    out = structured_attention(x, x, v, levels).sum()
    out.backward()
    assert W.U.grad is not None and W.U.grad.abs().sum() > 0


def test_errors():
    W = sm.Dense(4, 4)
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"Dense\(4, 4\) needs x_q \(\.\.\., T_q, 4\)"):
        bilinear_scores(torch.randn(5, 3), x, W)
    with pytest.raises(ValueError, match=r"x_q must be a tensor of shape \(\.\.\., T, D\), got \(4,\)"):
        bilinear_scores(torch.randn(4), x, W)
    with pytest.raises(TypeError, match="expected an operator, a Level or a non-empty list of Levels"):
        bilinear_scores(x, x, [])
    with pytest.raises(ValueError, match=r"v must have shape \(\.\.\., T_k=5, D_v\), got \(4, 2\)"):
        structured_attention(x, x, torch.randn(4, 2), W)
    with pytest.raises(ValueError, match="scale must be a number, 'sqrt' .* got 'cube'"):
        bilinear_scores(x, x, W, scale="cube")
    with pytest.raises(ValueError, match=r"block_size must be None or an int >= 1, got 0"):
        Level(0, W)
    with pytest.raises(ValueError, match="give block_size=2 or window=3, not both"):
        Level(2, W, window=3)
    with pytest.raises(TypeError, match="op must be a structmat LinearOperator, got Tensor"):
        Level(None, torch.eye(4))
    with pytest.raises(ValueError, match=r"stacks of different numbers of heads \[2, 3\]"):
        bilinear_scores(x, x, [Level(None, sm.Dense(4, 4, heads=2)), Level(None, sm.Dense(4, 4, heads=3))])
    with pytest.raises(ValueError, match="key_block must be None or an int >= 1, got 0"):
        structured_attention(x, x, x, W, key_block=0)


@pytest.mark.parametrize("method", ["scores", "sdpa", "streamed", "auto"])
@pytest.mark.parametrize("t", [8, 7])
def test_every_method_matches_reference(method, t):
    d, h = 6, 2
    levels = [
        Level(None, lowrank(d, 2, heads=h), 0.7),
        Level(4, lowrank(d, 1, heads=h), 1.3),
        Level(2, lowrank(d, 2, heads=h)),
    ]
    x = torch.randn(t, d, dtype=F64)
    v = torch.randn(h, t, 3, dtype=F64)
    s = reference_scores(x, x, levels)
    for causal in (False, True):
        out = structured_attention(x, x, v, levels, causal=causal, method=method, key_block=3)
        torch.testing.assert_close(out, reference_attention(s, v, causal))
    mask = torch.rand(t, t) > 0.3
    mask[1] = False
    out = structured_attention(x, x, v, levels, causal=True, mask=mask, method=method, key_block=3)
    ref = reference_attention(s, v, True, mask=mask)
    keep = (mask & torch.ones(t, t, dtype=torch.bool).tril()).any(-1)
    torch.testing.assert_close(out[:, keep], ref[:, keep])
    assert torch.equal(out[:, ~keep], torch.zeros_like(out[:, ~keep]))
    # decoding: the last 3 queries at their absolute positions against all keys
    out = structured_attention(x[-3:], x, v, levels, causal=True, q_offset=t - 3, method=method, key_block=3)
    torch.testing.assert_close(out, reference_attention(s, v, True)[:, -3:])
    x_g = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: structured_attention(x, x, v, levels, causal=True, method=method, key_block=3), (x_g,)
    )


def test_sdpa_method_rejects_windows():
    W = lowrank(4, 2)
    x = torch.randn(5, 4, dtype=F64)
    with pytest.raises(ValueError, match="method='sdpa' cannot express a sliding-window level"):
        structured_attention(x, x, x, [Level(None, W, window=2)], method="sdpa")
    with pytest.raises(ValueError, match="method must be 'auto', 'pieces', 'sdpa', 'scores' or 'streamed', got 'fast'"):
        structured_attention(x, x, x, W, method="fast")


# -- the split is kept on the operator (issue 8, item 8) -------------------------------------------------------------


def test_operator_used_in_attention_is_freed():
    import gc
    import weakref

    W = lowrank(6, 2, heads=2)
    levels = [Level(None, W), Level(3, sm.Dense(6, 6, heads=2, dtype=F64))]
    x, v = torch.randn(5, 6, dtype=F64), torch.randn(2, 5, 3, dtype=F64)
    structured_attention(x, x, v, levels).sum().backward()
    refs = [weakref.ref(lv.op) for lv in levels]
    del W, levels
    gc.collect()
    assert [r() for r in refs] == [None, None]


def test_split_is_kept_on_the_operator_outside_its_state():
    W = sm.LowRank(7, 5, rank=2, dtype=F64) + sm.LowRank(7, 5, rank=1, dtype=F64)
    keys, params, modules = list(W.state_dict()), list(W.parameters()), list(W.modules())
    L, R = sm.bilinear_split(W)
    again = sm.bilinear_split(W)
    assert again[0] is L and again[1] is R  # computed once
    assert list(W.state_dict()) == keys
    assert list(W.parameters()) == params and list(W.modules()) == modules
    x, y = torch.randn(4, 7, dtype=F64), torch.randn(4, 5, dtype=F64)
    with torch.no_grad():
        for p in W.parameters():
            p.mul_(-2.0)  # the kept split reads the current parameters
    torch.testing.assert_close(torch.einsum("ir,jr->ij", L(x), R(y)), x @ W.dense() @ y.T)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_compute_their_own_split(how):
    import copy
    import io

    W = lowrank(6, 2, heads=3)
    L, R = sm.bilinear_split(W)
    if how == "deepcopy":
        W2 = copy.deepcopy(W)
    else:
        buf = io.BytesIO()
        torch.save(W, buf)
        buf.seek(0)
        W2 = torch.load(buf, weights_only=False)
    L2, R2 = sm.bilinear_split(W2)
    assert L2 is not L and R2 is not R
    x = torch.randn(4, 6, dtype=F64)
    before = L(x)
    with torch.no_grad():
        W2.U.add_(1.0)
    torch.testing.assert_close(L(x), before)  # the original's split reads the original
    torch.testing.assert_close(L2(x), torch.einsum("tm,hmr->thr", x, W2.U))
    torch.testing.assert_close(
        torch.einsum("tm,hmn,sn->hts", x, W2.dense(), x), L2(x).movedim(-2, -3) @ R2(x).movedim(-2, -3).mT
    )


def test_split_under_torch_compile():
    W = lowrank(6, 2, heads=2)
    x = torch.randn(4, 6, dtype=F64)

    def scores(x):
        L, R = sm.bilinear_split(W)
        return L(x).movedim(-2, -3) @ R(x).movedim(-2, -3).mT

    expected = torch.einsum("tm,hmn,sn->hts", x, W.dense(), x)
    torch.testing.assert_close(torch.compile(scores, backend="eager")(x), expected)  # first call: computed eagerly
    assert sm.bilinear_split(W) is sm.bilinear_split(W)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(scores, backend="eager", fullgraph=True)(x), expected)  # kept: traced


# -- pairs that no level joins (issue 8, item 3) ---------------------------------------------------------------------


def reference_joined(levels, t_q, t_k, q_offset=0):
    """(T_q, T_k) bool: some level joins query q_offset + i and key j (a global level joins every pair)."""
    joined = torch.zeros(t_q, t_k, dtype=torch.bool)
    for i in range(t_q):
        for j in range(t_k):
            qi = i + q_offset
            for lv in levels:
                if lv.block_size is not None:
                    joined[i, j] |= qi // lv.block_size == j // lv.block_size
                elif lv.window is not None:
                    joined[i, j] |= abs(qi - j) < lv.window
                else:
                    joined[i, j] = True
    return joined


def reference_masked_attention(x_q, x_k, v, levels, causal=False, q_offset=0, mask=None, unjoined="mask"):
    """softmax over the pairs that are visible (causal, joined unless unjoined='zero', mask), zeros for none."""
    s = reference_scores(x_q, x_k, levels, q_offset)
    t_q, t_k = s.shape[-2:]
    visible = torch.ones(t_q, t_k, dtype=torch.bool)
    if causal:
        visible &= torch.arange(t_k)[None, :] <= torch.arange(t_q)[:, None] + q_offset
    if unjoined == "mask":
        visible &= reference_joined(levels, t_q, t_k, q_offset)
    if mask is not None:
        visible = visible & mask
    s = s.masked_fill(~visible, -math.inf)
    heads = s.shape[0]
    v = v.expand(heads, *v.shape[-2:])
    out = torch.zeros(heads, t_q, v.shape[-1], dtype=F64)
    for i in range(t_q):
        if visible[i].any():
            out[:, i] = torch.einsum("hk,hkd->hd", torch.softmax(s[:, i], dim=-1), v)
    return out if any(lv.op.heads for lv in levels) else out[0]


LOCAL_LEVELS = {
    "window": lambda h: [Level(None, lowrank(6, 2, heads=h), window=3)],
    "blocks": lambda h: [Level(4, lowrank(6, 2, heads=h)), Level(2, lowrank(6, 1, heads=h), 0.6)],
    "window+blocks": lambda h: [Level(None, lowrank(6, 1, heads=h), window=2), Level(3, lowrank(6, 2, heads=h))],
}


@pytest.mark.parametrize("kind", sorted(LOCAL_LEVELS))
@pytest.mark.parametrize("method", ["scores", "sdpa", "streamed", "auto"])
def test_local_levels_mask_unjoined_pairs_by_default(kind, method):
    h, t = 2, 9
    levels = LOCAL_LEVELS[kind](h)
    if method == "sdpa" and any(lv.window is not None for lv in levels):
        pytest.skip("sdpa rejects windows (tested elsewhere)")
    x, v = torch.randn(t, 6, dtype=F64), torch.randn(h, t, 3, dtype=F64)
    for causal in (False, True):
        out = structured_attention(x, x, v, levels, causal=causal, method=method, key_block=4)
        torch.testing.assert_close(out, reference_masked_attention(x, x, v, levels, causal))
        explicit = structured_attention(x, x, v, levels, causal=causal, method=method, key_block=4, unjoined="mask")
        torch.testing.assert_close(explicit, out)
    # decoding: the last 4 queries at their absolute positions
    out = structured_attention(x[-4:], x, v, levels, causal=True, q_offset=t - 4, method=method, key_block=4)
    torch.testing.assert_close(out, reference_masked_attention(x[-4:], x, v, levels, True, q_offset=t - 4))
    # a padding mask on top
    pad = torch.ones(t, t, dtype=torch.bool)
    pad[:, 1] = False
    out = structured_attention(x, x, v, levels, mask=pad, method=method, key_block=4)
    torch.testing.assert_close(out, reference_masked_attention(x, x, v, levels, mask=pad))


@pytest.mark.parametrize("method", ["scores", "sdpa", "streamed", "auto"])
def test_unjoined_zero_keeps_the_plain_sum(method):
    h, t = 2, 7
    levels = LOCAL_LEVELS["blocks"](h)
    x, v = torch.randn(t, 6, dtype=F64), torch.randn(h, t, 3, dtype=F64)
    out = structured_attention(x, x, v, levels, causal=True, method=method, key_block=3, unjoined="zero")
    torch.testing.assert_close(out, reference_masked_attention(x, x, v, levels, True, unjoined="zero"))
    assert not torch.allclose(out, structured_attention(x, x, v, levels, causal=True, method=method, key_block=3))


@pytest.mark.parametrize("method", ["scores", "sdpa", "streamed"])
def test_global_level_joins_every_pair_whatever_unjoined(method):
    h, t = 2, 7
    levels = [Level(None, lowrank(6, 1, heads=h)), *LOCAL_LEVELS["blocks"](h)]
    x, v = torch.randn(t, 6, dtype=F64), torch.randn(h, t, 3, dtype=F64)
    ref = reference_masked_attention(x, x, v, levels, True)
    for unjoined in (None, "zero", "mask"):
        out = structured_attention(x, x, v, levels, causal=True, method=method, key_block=3, unjoined=unjoined)
        torch.testing.assert_close(out, ref)


def test_bilinear_scores_unjoined():
    h, t = 3, 7
    levels = LOCAL_LEVELS["window+blocks"](h)
    x = torch.randn(t, 6, dtype=F64)
    s = reference_scores(x, x, levels)
    joined = reference_joined(levels, t, t)
    assert not joined.all()
    torch.testing.assert_close(bilinear_scores(x, x, levels, unjoined="zero"), s)
    torch.testing.assert_close(bilinear_scores(x, x, levels), s.masked_fill(~joined, -math.inf))
    torch.testing.assert_close(
        bilinear_scores(x[2:5], x, levels, q_offset=2), s[:, 2:5].masked_fill(~joined[2:5], -math.inf)
    )
    both = [*levels, Level(None, lowrank(6, 1, heads=h))]
    torch.testing.assert_close(bilinear_scores(x, x, both), bilinear_scores(x, x, both, unjoined="zero"))


@pytest.mark.parametrize("method", ["scores", "sdpa", "streamed"])
def test_query_with_no_joined_key_gets_zeros(method):
    # keys at 0..3 in blocks of 2: queries at positions 4 and 5 share a block with no key
    W = lowrank(6, 2)
    x_q, x_k, v = torch.randn(3, 6, dtype=F64), torch.randn(4, 6, dtype=F64), torch.randn(4, 3, dtype=F64)
    out = structured_attention(x_q, x_k, v, Level(2, W), q_offset=3, method=method, key_block=2)
    torch.testing.assert_close(out, reference_masked_attention(x_q, x_k, v, [Level(2, W)], q_offset=3))
    assert torch.equal(out[1:], torch.zeros(2, 3, dtype=F64))
    x_g = x_q.clone().requires_grad_(True)
    structured_attention(x_g, x_k, v, Level(2, W), q_offset=3, method=method, key_block=2).sum().backward()
    assert torch.isfinite(x_g.grad).all() and torch.equal(x_g.grad[1:], torch.zeros(2, 6, dtype=F64))


@pytest.mark.parametrize("method", ["scores", "streamed", "auto"])
def test_local_levels_gradcheck(method):
    levels = LOCAL_LEVELS["window+blocks"](2)
    x = torch.randn(6, 6, dtype=F64, requires_grad=True)
    v = torch.randn(2, 6, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, v: structured_attention(x, x, v, levels, causal=True, method=method, key_block=4), (x, v)
    )


@settings(max_examples=25, deadline=None)
@given(
    t=st.integers(1, 8),
    sizes=st.lists(st.tuples(st.sampled_from(["block", "window"]), st.integers(1, 5)), min_size=1, max_size=3),
    causal=st.booleans(),
    offset=st.integers(0, 3),
    key_block=st.integers(1, 4),
)
def test_local_levels_property(t, sizes, causal, offset, key_block):
    torch.manual_seed(t)
    levels = [
        Level(size, lowrank(4, 1)) if kind == "block" else Level(None, lowrank(4, 1), window=size)
        for kind, size in sizes
    ]
    x_k = torch.randn(t + offset, 4, dtype=F64)
    x_q, v = x_k[offset:], torch.randn(t + offset, 2, dtype=F64)
    ref = reference_masked_attention(x_q, x_k, v, levels, causal, q_offset=offset)
    for method in ("scores", "streamed"):
        out = structured_attention(x_q, x_k, v, levels, causal, q_offset=offset, method=method, key_block=key_block)
        torch.testing.assert_close(out, ref)


# -- an additive mask that requires grad (issue 8, item 9) -----------------------------------------------------------


@pytest.mark.parametrize("mask_shape", [(2, 7, 7), (7, 7), (1, 7), (7, 1)])
@pytest.mark.parametrize("method", ["scores", "sdpa", "streamed"])
def test_additive_mask_gets_its_gradient(method, mask_shape):
    h, t = 2, 7
    levels = [Level(None, lowrank(6, 2, heads=h)), Level(3, lowrank(6, 1, heads=h))]
    x, v = torch.randn(t, 6, dtype=F64), torch.randn(h, t, 3, dtype=F64)
    weight = torch.randn(h, t, 3, dtype=F64)
    mask = torch.randn(mask_shape, dtype=F64, requires_grad=True)
    # reference from the math: dense scores + mask, causal -inf, softmax, values
    s = reference_scores(x, x, levels) + mask
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -math.inf)
    ((torch.softmax(s, -1) @ v) * weight).sum().backward()
    expected, mask.grad = mask.grad.clone(), None
    out = structured_attention(x, x, v, levels, causal=True, mask=mask, method=method, key_block=3)
    (out * weight).sum().backward()
    assert mask.grad is not None and mask.grad.shape == mask_shape
    torch.testing.assert_close(mask.grad, expected)


def test_streamed_mask_gradcheck():
    levels = [Level(None, lowrank(4, 2, heads=2)), Level(2, lowrank(4, 1, heads=2))]
    x, v = torch.randn(5, 4, dtype=F64), torch.randn(2, 5, 3, dtype=F64)
    mask = torch.randn(2, 5, 5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda m: structured_attention(x, x, v, levels, causal=True, mask=m, method="streamed", key_block=2), (mask,)
    )


# -- edge values (issue 8, item 14) ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["scores", "sdpa", "streamed", "auto"])
def test_no_keys_gives_zeros_on_every_method(method):
    W = lowrank(6, 2, heads=2)
    x_q = torch.randn(3, 6, dtype=F64, requires_grad=True)
    x_k, v = torch.randn(0, 6, dtype=F64), torch.randn(2, 0, 4, dtype=F64)
    out = structured_attention(x_q, x_k, v, W, causal=True, method=method, key_block=2)
    assert torch.equal(out, torch.zeros(2, 3, 4, dtype=F64))
    out.sum().backward()
    assert torch.equal(x_q.grad, torch.zeros(3, 6, dtype=F64))


@pytest.mark.parametrize("method", ["scores", "sdpa", "streamed", "auto"])
def test_no_queries_on_every_method(method):
    W = lowrank(6, 2, heads=2)
    x, v = torch.randn(5, 6, dtype=F64), torch.randn(2, 5, 4, dtype=F64)
    out = structured_attention(x[:0], x, v, W, causal=True, q_offset=5, method=method, key_block=2)
    assert out.shape == (2, 0, 4)


@pytest.mark.parametrize("method", ["scores", "sdpa", "streamed", "auto"])
def test_no_queries_with_two_global_levels(method):
    # the second global level is added in place through a (batch, T_q, T_k) view: T_q = 0 must not make it ambiguous
    levels = [Level(None, lowrank(6, 2, heads=2)), Level(None, lowrank(6, 1, heads=2))]
    x, v = torch.randn(5, 6, dtype=F64), torch.randn(2, 5, 4, dtype=F64)
    out = structured_attention(x[:0], x, v, levels, method=method)
    assert out.shape == (2, 0, 4)
    assert bilinear_scores(x[:0], x, levels).shape == (2, 0, 5)


@pytest.mark.parametrize("method", ["scores", "sdpa", "streamed", "auto"])
def test_zero_dim_additive_mask(method):
    # a 0-dim mask broadcasts to every pair: it shifts every score alike (no change) and its gradient is the sum of
    # the scores' gradients, 0 up to rounding
    W = lowrank(6, 2, heads=2)
    x, v = torch.randn(5, 6, dtype=F64), torch.randn(2, 5, 3, dtype=F64)
    mask = torch.tensor(0.7, dtype=F64, requires_grad=True)
    out = structured_attention(x, x, v, W, causal=True, mask=mask, method=method, key_block=2)
    s = reference_scores(x, x, [Level(None, W)])
    torch.testing.assert_close(out, reference_attention(s, v, causal=True))
    (grad,) = torch.autograd.grad((out * torch.randn_like(out)).sum(), mask)
    assert grad.shape == () and abs(grad.item()) < 1e-10
    blocked = structured_attention(x, x, v, W, causal=True, mask=torch.tensor(False), method=method, key_block=2)
    assert torch.equal(blocked, torch.zeros_like(blocked))


def test_numpy_integers_are_accepted():
    np = pytest.importorskip("numpy")
    W = lowrank(6, 2)
    x, v = torch.randn(7, 6, dtype=F64), torch.randn(7, 3, dtype=F64)
    expected = structured_attention(x[3:], x, v, Level(2, W), causal=True, q_offset=3, key_block=2)
    out = structured_attention(
        x[3:], x, v, Level(np.int64(2), W), causal=True, q_offset=np.int64(3), key_block=np.int64(2)
    )
    torch.testing.assert_close(out, expected)
    assert type(Level(np.int64(2), W).block_size) is int and type(Level(None, W, window=np.int32(3)).window) is int


@pytest.mark.parametrize("method", ["scores", "sdpa", "streamed"])
def test_structured_attention_compiles_fullgraph(method):
    levels = [Level(4, lowrank(6, 2, heads=2)), Level(2, lowrank(6, 1, heads=2))]  # no global level: masked
    x, v = torch.randn(7, 6, dtype=F64), torch.randn(2, 7, 3, dtype=F64)
    mask = torch.randn(7, 7, dtype=F64)

    def f(x, v, mask):
        return structured_attention(x, x, v, levels, causal=True, mask=mask, method=method, key_block=3)

    torch._dynamo.reset()
    out = torch.compile(f, backend="eager", fullgraph=True)(x, v, mask)
    torch.testing.assert_close(out, f(x, v, mask))  # eager is checked against the references above


@pytest.mark.parametrize("method", ["scores", "sdpa", "streamed", "auto"])
def test_a_level_covering_the_sequence_builds_no_mask(method, monkeypatch):
    """MLR levels of blocks T, T/2, T/4 join every pair (the first block holds the whole sequence): no pair-mask is
    built (it cost the default path a T x T boolean mask and torch's masked SDPA, 2x its time at T = 4096), and the
    result is the plain multi-level sum, the same as with ``unjoined="zero"``."""
    torch.manual_seed(0)
    t, d = 12, 6
    x = torch.randn(2, t, d, dtype=torch.float64)
    v = torch.randn(2, t, 5, dtype=torch.float64)
    levels = [Level(t // 2**lvl, sm.LowRank(d, d, rank=2, dtype=torch.float64)) for lvl in range(3)]
    expected = structured_attention(x, x, v, levels, causal=True, unjoined="zero", method="scores")
    windowed = [Level(None, sm.LowRank(d, d, rank=2, dtype=torch.float64), window=t)]
    expected_w = structured_attention(x, x, v, windowed, causal=True, unjoined="zero", method="scores")

    def no_mask(*args, **kwargs):
        raise AssertionError("a pair mask was built although every pair is joined")

    monkeypatch.setattr(functional, "_joined", no_mask)
    kw = {"key_block": 5} if method == "streamed" else {}
    got = structured_attention(x, x, v, levels, causal=True, method=method, **kw)
    torch.testing.assert_close(got, expected)
    if method != "sdpa":  # windows run on the score paths
        got_w = structured_attention(x, x, v, windowed, causal=True, method=method, **kw)
        torch.testing.assert_close(got_w, expected_w)
    # decoding the last 3 queries: positions 9 .. 11 still lie in the first block
    got = structured_attention(x[:, -3:], x, v, levels, causal=True, q_offset=t - 3, method=method, **kw)
    torch.testing.assert_close(got, expected[:, -3:])


STREAMED_CASES = {
    "global+blocks causal": ([(None, None, 2), (4, None, 1), (2, None, 1)], True, 0, None),
    "blocks masked": ([(6, None, 2), (3, None, 1)], False, 0, None),
    "blocks masked causal, decoding": ([(6, None, 2), (3, None, 1)], True, 5, None),
    "window causal": ([(None, 3, 2)], True, 0, None),
    "window + blocks, additive mask": ([(None, 2, 1), (4, None, 2)], True, 0, "additive"),
    "global, key mask": ([(None, None, 2)], False, 0, "keys"),
}


@pytest.mark.parametrize("case", sorted(STREAMED_CASES))
@pytest.mark.parametrize("key_block", [1, 2, 3])
def test_streamed_skips_masked_tiles_exactly(case, key_block):
    """The streamed path computes only the rows of a tile that may see one of its keys, and a blocked or windowed
    level only on the rows it joins: values and gradients (tokens, values, parameters, an additive mask) equal the
    one-score-matrix path's."""
    spec, causal, offset, mask_kind = STREAMED_CASES[case]
    levels = [Level(b, lowrank(5, r, heads=2), window=w) for b, w, r in spec]
    t_k = 11
    x_k = torch.randn(t_k, 5, dtype=F64, requires_grad=True)
    x_q = x_k[offset:]
    v = torch.randn(2, t_k, 3, dtype=F64, requires_grad=True)
    mask = None
    if mask_kind == "additive":
        mask = torch.randn(t_k - offset, t_k, dtype=F64, requires_grad=True)
    elif mask_kind == "keys":
        mask = torch.ones(t_k, dtype=torch.bool)
        mask[3] = False
    params = [x_k, v, *(p for lv in levels for p in lv.op.parameters())] + ([mask] if mask_kind == "additive" else [])
    results = []
    for method in ("streamed", "scores"):
        out = structured_attention(
            x_q, x_k, v, levels, causal, mask, q_offset=offset, method=method, key_block=key_block
        )
        results.append((out, torch.autograd.grad(out.square().sum(), params)))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)
