"""Attention layers against explicit float64 references: each head's per-pair matrix A_ij built densely."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import structmat as sm
from structmat_attention import (
    KVCache,
    Level,
    LevelSpec,
    StructuredAttention,
    bilinear_btt_attention,
    bilinear_mlr_attention,
    gswa_attention,
    mlr_attention,
    sliding_window_attention,
    standard_attention,
)

F64 = torch.float64
D, H = 12, 3  # d_head = 4


def _custom(**kw):
    """Full-rank BTT locally (blocks of 3, c = 0.7) plus low-rank globally: a variant the paper does not name."""
    specs = [
        LevelSpec(lambda d, h, **k: sm.LowRank(d, d, rank=2, heads=h, **k)),
        LevelSpec(
            lambda d, h, **k: sm.BTT(d, d, ranks=1, heads=h, in_factors=[3, 4], out_factors=[3, 4], **k),
            block_size=3,
            scale=0.7,
        ),
    ]
    return StructuredAttention(D, H, specs, **kw)


# name -> (constructor taking StructuredAttention options, the feature width d that scale='sqrt' divides by)
VARIANTS = {
    "standard": (functools.partial(standard_attention, D, H), 4),  # rank d_head = 4
    # cores (3, 4) x (3, 4): the default bond 2 is the smallest with the cut 3 * 3 * 2 >= 12, so the split is (I, BTT)
    "bilinear_btt": (functools.partial(bilinear_btt_attention, D, H), 12),
    "bilinear_mlr": (functools.partial(bilinear_mlr_attention, D, H, ranks=[2, 1], blocks=[1, 2]), 4),  # 1*2 + 2*1
    "mlr": (functools.partial(mlr_attention, D, H, ranks=[2, 1, 1], max_seq_len=8), 4),  # blocks [None, 4, 2]
    "sliding_window": (functools.partial(sliding_window_attention, D, H, window=3), 4),
    "gswa": (functools.partial(gswa_attention, D, H, window=3), 4),  # ranks 2 + 2
    "custom": (_custom, 11),  # 2 + BTT bond 1: its cut 3 * 3 * 1 = 9 < 12
}


def make(name: str, **kw) -> StructuredAttention:
    torch.manual_seed(1)
    return VARIANTS[name][0](dtype=F64, **kw)


def dense_heads(op: sm.LinearOperator) -> torch.Tensor:
    """(H, D, D): LowRank from its factors, anything else through dense()."""
    if isinstance(op, sm.LowRank):
        return (op.U @ op.V).detach()
    return op.dense().detach()


def reference_layer(layer, x, width, causal=True, mask=None):
    """out = W_O concat_h(softmax_j(s_h(i, j)) W_V[h] x_j), s_h(i, j) = x_i^T (Σ_l [joined] c_l W_l[h]) x_j / sqrt(d).

    Pairs no level joins get -inf when the layer masks them (layer.masks_unjoined); causal and padding masks likewise.
    """
    t = x.shape[0]
    c = 1.0 / math.sqrt(width)
    mats = [dense_heads(lv.op) for lv in layer.levels]
    heads = []
    for h in range(layer.n_heads):
        s = torch.empty(t, t, dtype=F64)
        for i in range(t):
            for j in range(t):
                a = torch.zeros(D, D, dtype=F64)
                joined = False
                for lv, w in zip(layer.levels, mats):
                    if lv.block_size is not None and i // lv.block_size != j // lv.block_size:
                        continue
                    if lv.window is not None and abs(i - j) >= lv.window:
                        continue
                    a = a + lv.scale * w[h]
                    joined = True
                s[i, j] = c * x[i] @ a @ x[j]
                if (causal and j > i) or (layer.masks_unjoined and not joined):
                    s[i, j] = -math.inf
                if mask is not None and not bool(mask[i, j]):
                    s[i, j] = -math.inf
        p = torch.exp(s - s.amax(-1, keepdim=True))
        p = p / p.sum(-1, keepdim=True)
        heads.append(p @ (x @ layer.value.weight[h].detach().T))
    return torch.cat(heads, dim=-1) @ layer.output.weight.detach().T


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("t,causal", [(7, True), (8, True), (11, True), (7, False)])  # 7, 11: partial last blocks
def test_variant_matches_dense_reference(name, t, causal):
    layer = make(name, causal=causal)
    x = torch.randn(2, t, D, dtype=F64)
    out = layer(x)
    assert out.shape == (2, t, D)
    for b in range(2):
        torch.testing.assert_close(out[b], reference_layer(layer, x[b], VARIANTS[name][1], causal))


@pytest.mark.parametrize("name", ["standard", "sliding_window", "mlr"])
def test_padding_mask_combines_with_levels(name):
    t = 7
    layer = make(name)
    x = torch.randn(t, D, dtype=F64)
    keep = torch.ones(t, t, dtype=torch.bool)
    keep[:, 1] = False  # key 1 is padding
    ref = reference_layer(layer, x, VARIANTS[name][1], mask=keep)
    torch.testing.assert_close(layer(x, mask=keep), ref)  # every query still sees key 0 or itself
    additive = torch.zeros(t, t, dtype=F64).masked_fill(~keep, -math.inf)
    torch.testing.assert_close(layer(x, mask=additive), ref)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_key_block_streaming_matches(name):
    layer = make(name, key_block=3)
    x = torch.randn(2, 10, D, dtype=F64)
    streamed = layer(x)
    layer.key_block = None
    torch.testing.assert_close(streamed, layer(x))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_causal_does_not_leak(name):
    t = 9
    layer = make(name)
    x = torch.randn(t, D, dtype=F64)
    base = layer(x)
    for pos in range(t):
        x2 = x.clone()
        x2[pos] += 3.0
        out = layer(x2)
        torch.testing.assert_close(out[:pos], base[:pos], rtol=0, atol=0)
        assert not torch.allclose(out[pos], base[pos])


def test_bilinear_btt_is_full_rank_by_default():
    assert make("bilinear_btt").levels[0].op.ranks == (2,)  # bond 1 would leave rank 3 * 3 * 1 = 9 < 12
    assert bilinear_btt_attention(16, 2).levels[0].op.ranks == (1,)  # (4, 4) x (4, 4): 4 * 4 * 1 = 16
    narrow = bilinear_btt_attention(
        D, H, ranks=1, in_factors=[3, 4], out_factors=[3, 4], dtype=F64
    )  # rank 9: splits at the cut, 9 features per side
    assert narrow.cost(1)["scores[0]"].macs == H * 9
    x = torch.randn(5, D, dtype=F64)
    torch.testing.assert_close(narrow(x), reference_layer(narrow, x, 9))


def test_mlr_with_one_level_equals_standard_attention():
    std = make("standard")
    for mlr in (
        mlr_attention(D, H, ranks=[4], max_seq_len=16, dtype=F64),  # level 0 global
        mlr_attention(D, H, ranks=[4], block_sizes=[16], dtype=F64),  # one block holding the whole sequence
    ):
        mlr.load_state_dict(std.state_dict())  # same names: level_ops.0.U/V, value.weight, output.weight
        x = torch.randn(2, 13, D, dtype=F64)
        torch.testing.assert_close(mlr(x), std(x))


def test_standard_attention_is_textbook_multihead():
    """W_Q[h] = U_h^T, W_K[h] = V_h: softmax(Q K^T / sqrt(d_head)) V per head, concatenated, projected."""
    layer = make("standard")
    x = torch.randn(6, D, dtype=F64)
    op = layer.levels[0].op
    q = torch.einsum("td,hdr->htr", x, op.U)
    k = torch.einsum("hrd,td->htr", op.V, x)
    v = torch.einsum("hed,td->hte", layer.value.weight, x)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    p = torch.softmax((q @ k.mT / 2.0).masked_fill(~causal, -math.inf), dim=-1)  # sqrt(4) = 2
    expected = (p @ v).permute(1, 0, 2).reshape(6, H * 4) @ layer.output.weight.T
    torch.testing.assert_close(layer(x), expected)


def test_identity_levels_give_dot_product_attention():
    ident = Level(None, sm.Dense.from_tensor(torch.eye(D, dtype=F64).expand(H, D, D).clone()))
    layer = StructuredAttention(D, H, [ident], scale=1.0, causal=False, dtype=F64)
    x = torch.randn(5, D, dtype=F64)
    p = torch.softmax(x @ x.T, dim=-1)
    v = torch.einsum("hed,td->hte", layer.value.weight, x)
    expected = (p @ v).permute(1, 0, 2).reshape(5, -1) @ layer.output.weight.T
    torch.testing.assert_close(layer(x), expected)


def test_scales_and_qk_norm():
    layer = make("mlr", scale="mup")
    x = torch.randn(7, D, dtype=F64)
    layer.scale = 1.0 / 4  # 'mup' is 1/d with d = 2 + 1 + 1
    ref = layer(x)
    layer.scale = "mup"
    torch.testing.assert_close(layer(x), ref)
    normed = make("standard", qk_norm=True)
    op = normed.levels[0].op
    q = torch.nn.functional.layer_norm(torch.einsum("td,hdr->htr", x, op.U), (4,))
    k = torch.nn.functional.layer_norm(torch.einsum("hrd,td->htr", op.V, x), (4,))
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    p = torch.softmax((q @ k.mT / 2.0).masked_fill(~causal, -math.inf), dim=-1)
    v = torch.einsum("hed,td->hte", normed.value.weight, x)
    expected = (p @ v).permute(1, 0, 2).reshape(7, -1) @ normed.output.weight.T
    torch.testing.assert_close(normed(x), expected)


def test_level_spec_builds_fresh_parameters_and_level_ops_register():
    build = functools.partial(mlr_attention, ranks=[2, 1], block_sizes=[None, 2])
    a, b = build(8, 2), build(8, 2)
    assert a.levels[0].op is not b.levels[0].op
    # 2 levels * (U + V) * 2 heads * rank * 8, values 2*4*8, output 8*8
    assert sum(p.numel() for p in a.parameters()) == 2 * 2 * 8 * (2 + 1) + 64 + 64
    assert "block=2" in repr(a)


def test_gradcheck_tiny_layer():
    layer = mlr_attention(4, 2, ranks=[1, 1], block_sizes=[None, 2], dtype=F64)
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    gsw = gswa_attention(4, 2, window=2, dtype=F64, key_block=2)
    assert torch.autograd.gradcheck(gsw, (x,))
    layer(x).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_float32_default_and_meta_device_cost():
    layer = standard_attention(16, 4)
    assert layer(torch.randn(3, 16)).dtype == torch.float32
    meta = standard_attention(1024, 8, device="meta")
    assert meta.cost(8).macs > 0  # costs from shapes, no data


def test_errors():
    with pytest.raises(ValueError, match=r"n_heads=3 must divide d_model=10"):
        standard_attention(10, 3)
    with pytest.raises(ValueError, match=r"n_heads=4 must divide d_model=10"):
        mlr_attention(10, 4, ranks=[1], max_seq_len=8)
    with pytest.raises(ValueError, match=r"ranks has 2 entries but block_sizes has 1"):
        mlr_attention(8, 2, ranks=[2, 2], block_sizes=[None])
    with pytest.raises(ValueError, match=r"block_sizes\[1\] must be None or an int >= 1, got 0"):
        mlr_attention(8, 2, ranks=[2, 2], block_sizes=[None, 0])
    with pytest.raises(ValueError, match=r"ranks\[0\] must be >= 1, got -1"):
        mlr_attention(8, 2, ranks=[-1], block_sizes=[None])
    with pytest.raises(TypeError, match=r"ranks must be a non-empty list"):
        mlr_attention(8, 2, ranks=[], block_sizes=[])
    with pytest.raises(ValueError, match=r"give block_sizes, or max_seq_len"):
        mlr_attention(8, 2, ranks=[2, 2])
    with pytest.raises(ValueError, match=r"max_seq_len=2 is too short to halve into 3 levels \(needs >= 4\)"):
        mlr_attention(8, 2, ranks=[1, 1, 1], max_seq_len=2)
    with pytest.raises(ValueError, match=r"window must be >= 1, got 0"):
        sliding_window_attention(8, 2, window=0)
    with pytest.raises(ValueError, match=r"window must be >= 1, got 0"):
        gswa_attention(8, 2, window=0)
    with pytest.raises(ValueError, match=r"d_head=1 cannot be split between a global and a windowed level"):
        gswa_attention(4, 4, window=2)
    with pytest.raises(ValueError, match=r"LowRank\(8, 8, rank=9\): rank must be <= min\(m, n\) = 8"):
        standard_attention(8, 2, d_head=9)
    with pytest.raises(ValueError, match=r"give block_size=2 or window=3, not both"):
        LevelSpec(lambda d, h, **k: sm.Dense(d, d, heads=h, **k), block_size=2, window=3)
    with pytest.raises(ValueError, match=r"LevelSpec: window must be None or an int >= 1, got 0"):
        LevelSpec(lambda d, h, **k: sm.Dense(d, d, heads=h, **k), window=0)
    with pytest.raises(TypeError, match=r"LevelSpec: make must be a factory .* got the operator Dense\(4, 4\)"):
        LevelSpec(sm.Dense(4, 4))
    with pytest.raises(TypeError, match=r"LevelSpec: make must be a callable"):
        LevelSpec(3)
    msg = r"levels\[0\]\.op must be a stack of n_heads=2 operators of shape \(8, 8\), got LowRank\(8, 8, rank=2\)"
    with pytest.raises(ValueError, match=msg):
        StructuredAttention(8, 2, [Level(None, sm.LowRank(8, 8, rank=2))])
    with pytest.raises(ValueError, match=r"got Dense\(6, 6, heads=2\)"):
        StructuredAttention(8, 2, [Level(None, sm.Dense(6, 6, heads=2))])
    with pytest.raises(TypeError, match=r"levels must be a non-empty list of Level or LevelSpec"):
        StructuredAttention(8, 2, [])
    with pytest.raises(TypeError, match=r"levels\[0\] must be a Level or a LevelSpec, got Dense"):
        StructuredAttention(8, 2, [sm.Dense(8, 8, heads=2)])
    spec = [LevelSpec(lambda d, h, **k: sm.Dense(d, d, heads=h, **k))]
    with pytest.raises(ValueError, match=r"unjoined must be None, 'zero' or 'mask', got 'drop'"):
        StructuredAttention(8, 2, spec, unjoined="drop")
    with pytest.raises(ValueError, match=r"scale must be a number, 'sqrt' \(1/sqrt\(d\)\) or 'mup' .* got 'cube'"):
        StructuredAttention(8, 2, spec, scale="cube")
    with pytest.raises(ValueError, match=r"key_block must be None or an int >= 1, got 0"):
        StructuredAttention(8, 2, spec, key_block=0)
    with pytest.raises(ValueError, match=r"d_model must be >= 1, got 0"):
        StructuredAttention(0, 2, spec)
    msg = r"value must be a stack of n_heads=2 operators of shape \(4, 8\), got Dense\(4, 8\)"
    with pytest.raises(ValueError, match=msg):
        StructuredAttention(8, 2, spec, value=sm.Dense(4, 8))
    with pytest.raises(ValueError, match=r"output must be one operator of shape \(8, 8\), got Dense\(8, 6\)"):
        StructuredAttention(8, 2, spec, output=sm.Dense(8, 6))
    layer = StructuredAttention(8, 2, spec)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., T, d_model=8\), got \(5, 7\)"):
        layer(torch.randn(5, 7))
    with pytest.raises(TypeError, match=r"mask must be a tensor or None, got list"):
        layer(torch.randn(5, 8), mask=[[True]])
    with pytest.raises(TypeError, match=r"cache must be a KVCache or None, got dict"):
        layer(torch.randn(5, 8), cache={})


def _rank2(d, h, **k):
    return sm.LowRank(d, d, rank=2, heads=h, **k)


@pytest.mark.parametrize("causal", [True, False])
def test_levels_without_a_global_one_mask_unjoined_pairs_by_default(causal):
    """Block-only and window-only layers: a pair no level joins gets no attention unless unjoined='zero'."""
    x = torch.randn(7, D, dtype=F64)
    blocks = StructuredAttention(D, H, [LevelSpec(_rank2, block_size=3)], causal=causal, dtype=F64)
    assert blocks.unjoined is None and blocks.masks_unjoined
    out = blocks(x)
    torch.testing.assert_close(out, reference_layer(blocks, x, 2, causal))
    if causal:  # tokens 0, 3 and 6 open a block: each sees itself only, so its output is W_O concat_h(W_V[h] x_i)
        alone = torch.einsum("hed,td->the", blocks.value.weight, x).reshape(7, -1) @ blocks.output.weight.T
        torch.testing.assert_close(out[[0, 3, 6]], alone[[0, 3, 6]].detach())
    else:  # token 6 is alone in the last block
        alone = (blocks.value.weight @ x[6]).reshape(-1) @ blocks.output.weight.T
        torch.testing.assert_close(out[6], alone.detach())
    zero = StructuredAttention(D, H, [LevelSpec(_rank2, block_size=3)], causal=causal, unjoined="zero", dtype=F64)
    zero.load_state_dict(blocks.state_dict())
    assert not zero.masks_unjoined
    torch.testing.assert_close(zero(x), reference_layer(zero, x, 2, causal))  # far pairs score 0, still weighted
    assert not torch.allclose(zero(x), out)
    window = StructuredAttention(D, H, [LevelSpec(_rank2, window=2)], causal=causal, dtype=F64)
    assert window.masks_unjoined
    torch.testing.assert_close(window(x), reference_layer(window, x, 2, causal))
    explicit = StructuredAttention(D, H, [LevelSpec(_rank2, window=2)], causal=causal, unjoined="mask", dtype=F64)
    explicit.load_state_dict(window.state_dict())
    torch.testing.assert_close(explicit(x), window(x))


def test_a_global_level_joins_every_pair_whatever_unjoined_says():
    for unjoined in (None, "mask", "zero"):
        layer = gswa_attention(D, H, window=2, unjoined=unjoined, dtype=F64)
        assert not layer.masks_unjoined
    assert sliding_window_attention(D, H, window=2).masks_unjoined
    assert "masks_unjoined=True" in repr(sliding_window_attention(D, H, window=2))


def test_argument_types_and_ranges():
    spec = [LevelSpec(_rank2)]
    where = r"StructuredAttention\(d_model=8, n_heads=2\)"
    with pytest.raises(TypeError, match=rf"{where}: causal must be a bool, got str 'no'"):
        StructuredAttention(8, 2, spec, causal="no")
    with pytest.raises(TypeError, match=rf"{where}: qk_norm must be a bool, got int 1"):
        StructuredAttention(8, 2, spec, qk_norm=1)
    with pytest.raises(TypeError, match=rf"{where}: key_block must be None or an int >= 1, got float 2.0"):
        StructuredAttention(8, 2, spec, key_block=2.0)
    with pytest.raises(TypeError, match=rf"{where}: value must be a structmat LinearOperator or None, got int"):
        StructuredAttention(8, 2, spec, value=3)
    with pytest.raises(TypeError, match=rf"{where}: d_value must be an int, got str '4'"):
        StructuredAttention(8, 2, spec, d_value="4")
    with pytest.raises(TypeError, match=r"LevelSpec: block_size must be None or an int >= 1, got str '3'"):
        LevelSpec(_rank2, block_size="3")
    with pytest.raises(TypeError, match=r"LevelSpec: scale must be a real number, got str 'x'"):
        LevelSpec(_rank2, scale="x")
    with pytest.raises(TypeError, match=r"mlr_attention\(d_model=8, n_heads=2\): ranks\[0\] must be an int, got float"):
        mlr_attention(8, 2, ranks=[1.5], block_sizes=[None])
    with pytest.raises(TypeError, match=r"block_sizes\[0\] must be None or an int >= 1, got str '4'"):
        mlr_attention(8, 2, ranks=[1], block_sizes=["4"])
    with pytest.raises(TypeError, match=r"sliding_window_attention.*: window must be an int, got float 2.0"):
        sliding_window_attention(8, 2, window=2.0)
    layer = StructuredAttention(8, 2, spec)
    msg = r"StructuredAttention: mask must be broadcastable to \(\.\.\., 2, T=3, T_k=3\) .* got \(4, 4\)"
    with pytest.raises(ValueError, match=msg):
        layer(torch.randn(3, 8), mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"StructuredAttention: mask must be boolean .* got torch.int64"):
        layer(torch.randn(3, 8), mask=torch.ones(3, 3, dtype=torch.long))
    cache = KVCache()
    layer(torch.randn(3, 8), cache=cache)
    with pytest.raises(ValueError, match=r"T=1, T_k=4\) \(T_k counts cached tokens too\), got \(1, 1, 3\)"):
        layer(torch.randn(1, 8), mask=torch.ones(1, 1, 3, dtype=torch.bool), cache=cache)
