"""KV-cache decoding equals the full causal forward, for every variant, token by token and in chunks; the GPT model."""

from __future__ import annotations

import functools

import pytest
import torch
from test_attention_layers import VARIANTS, D, H, make

from structmat_attention import (
    GPT,
    KVCache,
    gswa_attention,
    mlr_attention,
    sliding_window_attention,
    standard_attention,
)

F64 = torch.float64


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def decode(layer, x, chunks, mask=None):
    """Feed x (B, T, D) in consecutive chunks of the given sizes through one cache; concatenate the outputs."""
    cache = KVCache()
    outs, start = [], 0
    for n in chunks:
        sub = None if mask is None else mask[start : start + n, : start + n]
        outs.append(layer(x[:, start : start + n], mask=sub, cache=cache))
        start += n
    assert start == x.shape[1] and len(cache) == start
    return torch.cat(outs, dim=1), cache


def chunking(t, size):
    return [min(size, t - k) for k in range(0, t, size)]


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("t", [7, 8, 11])  # 7 and 11 are not multiples of the block sizes 4, 2, 3
@pytest.mark.parametrize("size", [1, 3])
def test_decoding_equals_full_forward(name, t, size):
    layer = make(name)
    x = torch.randn(2, t, D, dtype=F64)
    full = layer(x)
    out, _ = decode(layer, x, chunking(t, size))
    torch.testing.assert_close(out, full)


@pytest.mark.parametrize("name", ["mlr", "gswa", "custom"])
def test_uneven_chunks_and_streamed_keys(name):
    layer = make(name)
    x = torch.randn(2, 12, D, dtype=F64)
    full = layer(x)
    torch.testing.assert_close(decode(layer, x, [5, 1, 2, 4])[0], full)
    layer.key_block = 2  # the online-softmax path with a cache
    torch.testing.assert_close(decode(layer, x, [3, 1, 4, 4])[0], full)


def test_decoding_with_a_padding_mask():
    layer = make("mlr")
    x = torch.randn(1, 9, D, dtype=F64)
    keep = torch.ones(9, 9, dtype=torch.bool)
    keep[:, 2] = False
    full = layer(x, mask=keep)
    torch.testing.assert_close(decode(layer, x, [4, 1, 1, 3], mask=keep)[0], full)


def test_cache_holds_key_features_and_values_per_head():
    layer = make("mlr")  # ranks [2, 1, 1]
    _, cache = decode(layer, torch.randn(2, 5, D, dtype=F64), [2, 3])
    assert [tuple(k.shape) for k in cache.keys] == [(2, H, 5, 2), (2, H, 5, 1), (2, H, 5, 1)]
    assert tuple(cache.values.shape) == (2, H, 5, 4)
    assert cache.batch_shape == (2,)
    assert cache.nbytes == 8 * 2 * H * 5 * (2 + 1 + 1 + 4)
    btt = make("bilinear_btt")  # queries are the raw tokens; only the keys B_h x_j are cached
    _, cache = decode(btt, torch.randn(1, 3, D, dtype=F64), [3])
    assert [tuple(k.shape) for k in cache.keys] == [(1, H, 3, D)]
    cache.reset()
    assert len(cache) == 0 and cache.batch_shape is None and cache.nbytes == 0
    btt(torch.randn(4, 2, D, dtype=F64), cache=cache)  # a reset cache binds again
    assert len(cache) == 2


def test_cache_errors():
    layer = make("standard")
    cache = KVCache()
    layer(torch.randn(2, 3, D, dtype=F64), cache=cache)
    with pytest.raises(ValueError, match=r"cache holds a batch of shape \(2,\), got tokens with batch shape \(3,\)"):
        layer(torch.randn(3, 1, D, dtype=F64), cache=cache)
    with pytest.raises(ValueError, match=r"this KVCache holds another layer's keys; use one cache per layer"):
        make("standard")(torch.randn(2, 1, D, dtype=F64), cache=cache)
    float32 = standard_attention(D, H)
    c32 = KVCache()
    float32(torch.randn(2, 1, D), cache=c32)
    float32.double()
    with pytest.raises(TypeError, match=r"the cache holds torch.float32, got tokens of torch.float64"):
        float32(torch.randn(2, 1, D, dtype=F64), cache=c32)


# -- the model -------------------------------------------------------------------------------------------------------

ATTENTIONS = {
    "standard": standard_attention,
    "mlr": functools.partial(mlr_attention, ranks=[2, 1, 1], max_seq_len=16),
    "sliding_window": functools.partial(sliding_window_attention, window=3),
    "gswa": functools.partial(gswa_attention, window=3),
}


def model(name, max_seq_len=16):
    torch.manual_seed(2)
    return GPT(13, D, H, 2, max_seq_len=max_seq_len, attention=ATTENTIONS[name], dtype=F64)


@pytest.mark.parametrize("name", list(ATTENTIONS))
def test_model_incremental_decoding_equals_full_forward(name):
    gpt = model(name)
    tokens = torch.randint(0, 13, (2, 11))
    full = gpt(tokens)
    cache = gpt.new_cache()
    steps = [gpt(tokens[:, a:b], cache=cache) for a, b in [(0, 4), (4, 5), (5, 8), (8, 11)]]
    torch.testing.assert_close(torch.cat(steps, dim=1), full)
    assert all(len(c) == 11 for c in cache)


def test_model_causal_and_generate_with_and_without_cache():
    gpt = model("mlr")
    tokens = torch.randint(0, 13, (2, 6))
    base = gpt(tokens)
    later = tokens.clone()
    later[:, 4] = (later[:, 4] + 1) % 13
    torch.testing.assert_close(gpt(later)[:, :4], base[:, :4], rtol=0, atol=0)
    greedy = gpt.generate(tokens, 7, greedy=True)
    assert greedy.shape == (2, 13) and torch.equal(greedy[:, :6], tokens)
    torch.testing.assert_close(greedy, gpt.generate(tokens, 7, greedy=True, use_cache=False))
    sampled = [
        gpt.generate(tokens, 5, top_k=4, use_cache=c, generator=torch.Generator().manual_seed(3)) for c in (True, False)
    ]
    torch.testing.assert_close(sampled[0], sampled[1])


def test_model_errors():
    gpt = model("standard", max_seq_len=8)
    msg = r"sequence of 9 tokens \(0 cached \+ 9 new\) is longer than the positional table, max_seq_len=8"
    with pytest.raises(ValueError, match=msg):
        gpt(torch.zeros(1, 9, dtype=torch.long))
    cache = gpt.new_cache()
    gpt(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=r"sequence of 9 tokens \(6 cached \+ 3 new\)"):
        gpt(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=r"cache must be a list of 2 KVCache \(one per block\)"):
        gpt(torch.zeros(1, 1, dtype=torch.long), cache=cache[:1])
    with pytest.raises(TypeError, match=r"tokens must be an integer tensor of shape \(\.\.\., T\), got torch.float32"):
        gpt(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"5 \+ 4 tokens exceed max_seq_len=8"):
        gpt.generate(torch.zeros(1, 5, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=r"temperature must be > 0"):
        gpt.generate(torch.zeros(1, 2, dtype=torch.long), 1, temperature=0.0)
    with pytest.raises(ValueError, match=r"n_heads=5 must divide d_model=12"):
        GPT(13, D, 5, 1, max_seq_len=8, attention=standard_attention)
    with pytest.raises(ValueError, match=r"GPT: max_seq_len must be >= 1, got 0"):
        GPT(13, D, H, 1, max_seq_len=0, attention=standard_attention)
    with pytest.raises(TypeError, match=r"attention must be a callable \(d_model, n_heads\) -> module"):
        GPT(13, D, H, 1, max_seq_len=8, attention="mlr")
