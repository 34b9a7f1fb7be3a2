"""KV-cache decoding equals the full causal forward, for every variant, token by token and in chunks; the GPT model."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_attention_layers import VARIANTS, D, H, make

import structmat as sm
from structmat_attention import (
    GPT,
    KVCache,
    LevelSpec,
    StructuredAttention,
    TransformerBlock,
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
    with pytest.raises(ValueError, match=r"cache must be a list of 2 KVCache \(one per block\), got 1"):
        gpt(torch.zeros(1, 1, dtype=torch.long), cache=cache[:1])
    with pytest.raises(TypeError, match=r"tokens must be an integer tensor of shape \(\.\.\., T\), got torch.float32"):
        gpt(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"5 \+ 4 tokens exceed max_seq_len=8"):
        gpt.generate(torch.zeros(1, 5, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=r"temperature must be finite and > 0 \(or use greedy=True\), got 0.0"):
        gpt.generate(torch.zeros(1, 2, dtype=torch.long), 1, temperature=0.0)
    with pytest.raises(ValueError, match=r"n_heads=5 must divide d_model=12"):
        GPT(13, D, 5, 1, max_seq_len=8, attention=standard_attention)
    with pytest.raises(ValueError, match=r"GPT: max_seq_len must be >= 1, got 0"):
        GPT(13, D, H, 1, max_seq_len=0, attention=standard_attention)
    with pytest.raises(TypeError, match=r"attention must be a callable \(d_model, n_heads\) -> module"):
        GPT(13, D, H, 1, max_seq_len=8, attention="mlr")


# -- what the cache keeps --------------------------------------------------------------------------------------------


def test_a_non_causal_layer_refuses_a_cache():
    layer = make("standard", causal=False)  # its first token attends to the last one in the full forward
    msg = r"StructuredAttention\(d_model=12, n_heads=3\): a KVCache needs a causal layer, this one has causal=False"
    with pytest.raises(ValueError, match=msg):
        layer(torch.randn(2, 3, D, dtype=F64), cache=KVCache())
    gpt = GPT(13, D, H, 1, max_seq_len=8, attention=functools.partial(standard_attention, causal=False), dtype=F64)
    with pytest.raises(ValueError, match=r"a KVCache needs a causal layer"):
        gpt.generate(torch.zeros(1, 2, dtype=torch.long), 2)
    assert gpt.generate(torch.zeros(1, 2, dtype=torch.long), 2, use_cache=False).shape == (1, 4)


def stored_lengths(layer, x, chunks):
    """Decode x in chunks; after each call, (tokens seen, tokens held, each level's keys held, values held)."""
    cache, out, start, seen = KVCache(), [], 0, []
    for n in chunks:
        out.append(layer(x[:, start : start + n], cache=cache))
        start += n
        seen.append((len(cache), cache.stored, [k.shape[-2] for k in cache.keys], cache.values.shape[-2]))
    return torch.cat(out, dim=1), seen


@pytest.mark.parametrize("window,chunk", [(3, 1), (5, 1), (3, 4), (5, 3)])
def test_sliding_window_cache_holds_only_the_window(window, chunk):
    """40 tokens through a window of w: the cache never holds more than w - 1 tokens between calls."""
    layer = sliding_window_attention(D, H, window=window, dtype=F64)
    x = torch.randn(2, 40, D, dtype=F64)
    out, seen = stored_lengths(layer, x, chunking(40, chunk))
    torch.testing.assert_close(out, layer(x))  # the full causal forward over the whole sequence
    for p, held, keys, values in seen:
        assert held == min(p, window - 1) and keys == [held] and values == held
    cache = KVCache()
    layer(x[:, :30], cache=cache)
    assert (len(cache), cache.start, cache.stored) == (30, 31 - window, window - 1)
    assert cache.nbytes == 8 * 2 * H * (window - 1) * (4 + 4)  # float64, batch 2, rank 4 keys + d_v 4 values


def test_block_levels_drop_finished_blocks():
    """Blocks of 4 and 2, no global level: a query at p sees keys from 4 * (p // 4) on, so p % 4 are held."""
    layer = mlr_attention(D, H, ranks=[2, 2], block_sizes=[4, 2], dtype=F64)
    assert layer.masks_unjoined
    x = torch.randn(2, 13, D, dtype=F64)
    out, seen = stored_lengths(layer, x, [1] * 13)
    torch.testing.assert_close(out, layer(x))
    assert [held for _, held, _, _ in seen] == [p % 4 for p in range(1, 14)]
    out, seen = stored_lengths(layer, x, [3, 3, 3, 4])
    torch.testing.assert_close(out, layer(x))
    assert [held for _, held, _, _ in seen] == [3, 2, 1, 1]  # 3 % 4, 6 % 4, 9 % 4, 13 % 4


@pytest.mark.parametrize(
    "levels,held",
    [
        # blocks 2 and 3: the first key kept is rounded down to a multiple of 6, so both levels' blocks line up
        ([(2, None), (3, None)], lambda p: p - min(p // 2 * 2, p // 3 * 3) // 6 * 6),
        # blocks of 3 and a window of 2: a query at p needs keys from min(3 * (p // 3), p - 1), rounded to 3
        ([(3, None), (None, 2)], lambda p: p - max(min(p // 3 * 3, p - 1), 0) // 3 * 3),
    ],
)
def test_mixed_levels_keep_what_some_level_needs(levels, held):
    specs = [
        LevelSpec(lambda d, h, **k: sm.LowRank(d, d, rank=2, heads=h, **k), block_size=b, window=w) for b, w in levels
    ]
    layer = StructuredAttention(D, H, specs, dtype=F64)
    x = torch.randn(2, 17, D, dtype=F64)
    out, seen = stored_lengths(layer, x, [1] * 17)
    torch.testing.assert_close(out, layer(x))
    assert [h for _, h, _, _ in seen] == [held(p) for p in range(1, 18)]
    out, _ = stored_lengths(layer, x, [2, 5, 1, 4, 5])
    torch.testing.assert_close(out, layer(x))


@pytest.mark.parametrize("name,kw", [("gswa", {}), ("mlr", {}), ("sliding_window", {"unjoined": "zero"})])
def test_cache_keeps_every_token_some_level_or_the_softmax_needs(name, kw):
    """A global level sees every key; with unjoined='zero' a far key still gets the weight exp(0) / Z."""
    layer = make(name, **kw)
    x = torch.randn(2, 11, D, dtype=F64)
    out, seen = stored_lengths(layer, x, [1] * 11)
    torch.testing.assert_close(out, layer(x))
    assert [held for _, held, _, _ in seen] == list(range(1, 12))


def test_dropping_cache_with_a_padding_mask_over_all_positions():
    layer = make("sliding_window")
    x = torch.randn(1, 10, D, dtype=F64)
    keep = torch.ones(10, 10, dtype=torch.bool)
    keep[:, 4] = False
    keep[7, 6] = False
    out, cache = decode(layer, x, [3, 1, 1, 2, 3], mask=keep)
    torch.testing.assert_close(out, layer(x, mask=keep))
    assert cache.stored == 2
    additive = torch.zeros(10, 10, dtype=F64).masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(decode(layer, x, [1] * 10, mask=additive)[0], layer(x, mask=additive))


def test_model_generates_many_tokens_with_a_window_sized_cache():
    gpt = model("sliding_window", max_seq_len=48)
    prompt = torch.randint(0, 13, (2, 5))
    cached = gpt.generate(prompt, 40, greedy=True)
    torch.testing.assert_close(cached, gpt.generate(prompt, 40, greedy=True, use_cache=False))
    cache = gpt.new_cache()
    gpt(cached[:, :44], cache=cache)
    assert all((len(c), c.stored) == (44, 2) for c in cache)


def test_model_argument_errors():
    gpt = model("standard", max_seq_len=8)
    prompt = torch.zeros(1, 2, dtype=torch.long)
    msg = r"GPT: attention must be a factory \(d_model, n_heads\) -> module .* got the module StructuredAttention"
    with pytest.raises(TypeError, match=msg):
        GPT(13, D, H, 1, max_seq_len=8, attention=standard_attention(D, H))
    with pytest.raises(TypeError, match=r"GPT: attention\(d_model=12, n_heads=3\) must return an nn.Module, got int"):
        GPT(13, D, H, 1, max_seq_len=8, attention=lambda d, h: 3)
    with pytest.raises(TypeError, match=r"GPT: dtype must be a floating-point torch.dtype, got torch.int64"):
        GPT(13, D, H, 1, max_seq_len=8, attention=standard_attention, dtype=torch.long)
    with pytest.raises(TypeError, match=r"GPT: vocab_size must be an int, got float 13.0"):
        GPT(13.0, D, H, 1, max_seq_len=8, attention=standard_attention)
    with pytest.raises(ValueError, match=r"TransformerBlock: d_model=8 but the attention layer has d_model=12"):
        TransformerBlock(8, standard_attention(D, H))
    for k in (0, -1):
        with pytest.raises(ValueError, match=rf"GPT.generate: top_k must be >= 1, got {k}"):
            gpt.generate(prompt, 2, top_k=k)
    with pytest.raises(TypeError, match=r"GPT.generate: top_k must be an int, got float 2.5"):
        gpt.generate(prompt, 2, top_k=2.5)
    with pytest.raises(ValueError, match=r"GPT.generate: the prompt is empty \(tokens of shape \(2, 0\)\)"):
        gpt.generate(torch.zeros(2, 0, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"GPT.generate: token id 13 is outside the vocabulary 0 \.\. 12"):
        gpt.generate(torch.tensor([[1, 13]]), 2)
    with pytest.raises(ValueError, match=r"GPT: token id -1 is outside the vocabulary 0 \.\. 12"):
        gpt(torch.tensor([[-1, 2]]))
    with pytest.raises(
        TypeError, match=r"GPT: tokens must be an integer tensor of shape \(\.\.\., T\), got torch.bool"
    ):
        gpt(torch.zeros(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"GPT: tokens must have shape \(\.\.\., T\), got a 0-d tensor"):
        gpt(torch.tensor(3))
    with pytest.raises(TypeError, match=r"GPT.generate: tokens must be an integer tensor .* got list"):
        gpt.generate([[1, 2]], 2)
    with pytest.raises(TypeError, match=r"GPT.generate: max_new_tokens must be an int, got float 1.0"):
        gpt.generate(prompt, 1.0)
    with pytest.raises(ValueError, match=r"GPT.generate: max_new_tokens must be >= 0, got -1"):
        gpt.generate(prompt, -1)
    with pytest.raises(TypeError, match=r"GPT.generate: temperature must be a number, got str 'hot'"):
        gpt.generate(prompt, 1, temperature="hot")
    with pytest.raises(ValueError, match=r"GPT.generate: temperature must be finite and > 0 .* got nan"):
        gpt.generate(prompt, 1, temperature=float("nan"))
    with pytest.raises(TypeError, match=r"GPT.generate: generator must be a torch.Generator or None, got int"):
        gpt.generate(prompt, 1, generator=3)
    with pytest.raises(TypeError, match=r"GPT.generate: greedy must be a bool, got str 'yes'"):
        gpt.generate(prompt, 1, greedy="yes")
    with pytest.raises(TypeError, match=r"GPT: cache must be a list of 2 KVCache \(one per block\), got KVCache"):
        gpt(prompt, cache=KVCache())
    assert gpt.generate(torch.tensor([[1, 12]], dtype=torch.int32), 2, top_k=30).shape == (1, 4)  # top_k > vocab: all


@settings(max_examples=25, deadline=None)
@given(
    levels=st.lists(
        st.one_of(st.tuples(st.integers(1, 5), st.none()), st.tuples(st.none(), st.integers(1, 5))),
        min_size=1,
        max_size=3,
    ),
    chunks=st.lists(st.integers(1, 4), min_size=1, max_size=8),
)
def test_property_dropping_cache_equals_full_forward(levels, chunks):
    """Any blocks and windows (no global level), any chunking: decoding equals the full forward, and between calls the
    cache holds no more than the widest reach back (w - 1 for a window, b - 1 for a block) plus the rounding down to a
    multiple of every block size."""
    specs = [LevelSpec(_rank1, block_size=b, window=w) for b, w in levels]
    torch.manual_seed(0)
    layer = StructuredAttention(4, 2, specs, dtype=F64)
    x = torch.randn(1, sum(chunks), 4, dtype=F64)
    out, seen = stored_lengths(layer, x, chunks)
    torch.testing.assert_close(out, layer(x))
    step = math.lcm(*(b for b, _ in levels if b is not None))
    reach = max((b if b is not None else w) - 1 for b, w in levels)  # a block's last query sees b - 1 before it
    for p, held, keys, values in seen:
        assert keys == [held] * len(levels) and values == held
        assert held <= min(p, reach + step - 1)


def _rank1(d, h, **k):
    return sm.LowRank(d, d, rank=1, heads=h, **k)
