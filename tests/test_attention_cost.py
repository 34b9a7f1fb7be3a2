"""Attention layer costs as exact integers, derived by hand in the comments (MACs: one per multiply-add;
FLOPs: a multiply-add counts 2; softmax 5 FLOPs and 0 MACs per score entry)."""

from __future__ import annotations

import pytest

from structmat_attention import (
    AttentionCost,
    CostPart,
    bilinear_btt_attention,
    bilinear_mlr_attention,
    mlr_attention,
    pairs_joined,
    sliding_window_attention,
    standard_attention,
)


def parts(cost: AttentionCost) -> dict[str, tuple[int, int]]:
    return {p.name: (p.flops, p.macs) for p in cost}


def test_standard_attention():
    # d_model 12, 3 heads of d_head 4; batch 2 of T = 5 -> 10 tokens.
    c = standard_attention(12, 3).cost(5, batch=2)
    assert parts(c) == {
        "query_features[0]": (2880, 1440),  # U^T x: 10 tokens * 3 heads * 4 * 12
        "key_features[0]": (2880, 1440),  # V x: the same
        "value_projection": (2880, 1440),  # W_V: 10 * 3 * 4 * 12
        "scores[0]": (1200, 600),  # 2 batch * 3 heads * 5 * 5 pairs * rank 4
        "softmax": (750, 0),  # 5 * (2 * 3 * 5 * 5) entries
        "attention_values": (1200, 600),  # 2 * 3 * 5 * 5 * d_v 4
        "output_projection": (2880, 1440),  # W_O: 10 * 12 * 12
    }
    assert (c.macs, c.flops) == (6960, 2 * 6960 + 750)
    assert (c.seq_len, c.batch, c.past, c.heads) == (5, 2, 0, 3)


def test_mlr_attention_scores_with_partial_blocks():
    # ranks [2, 1, 1], blocks [global, 4, 2], T = 7, 3 heads.
    c = mlr_attention(12, 3, ranks=[2, 1, 1], block_sizes=[None, 4, 2]).cost(7)
    p = parts(c)
    assert p["scores[0]"] == (588, 294)  # 3 * 7*7 * 2
    assert p["scores[1]"] == (150, 75)  # blocks of 4 and 3 tokens: 3 * (16 + 9) * 1
    assert p["scores[2]"] == (78, 39)  # blocks 2, 2, 2, 1: 3 * (4 + 4 + 4 + 1) * 1
    assert p["query_features[0]"] == (1008, 504)  # 7 * 3 * 2 * 12
    assert p["query_features[1]"] == p["key_features[2]"] == (504, 252)  # 7 * 3 * 1 * 12
    assert p["attention_values"] == (1176, 588)  # 3 * 49 * 4
    assert c.total("scores") == CostPart("scores", 816, 408)
    assert c.total("query_features").macs == 504 + 252 + 252


def test_mlr_scores_cost_sum_of_rank_times_block_per_query():
    # T = 8 divides the blocks: Σ_l r_l T_l = 2*8 + 1*4 + 1*2 = 22 per query and head; 8 queries, 3 heads.
    c = mlr_attention(12, 3, ranks=[2, 1, 1], max_seq_len=8).cost(8)
    assert c.total("scores").macs == 8 * 3 * 22 == 528


def test_sliding_window_pairs():
    # window 3, T = 6: |i - j| < 3 -> the diagonal 6, offsets ±1: 2*5, ±2: 2*4 -> 24 pairs; 2 heads, d_head 4.
    c = sliding_window_attention(8, 2, window=3).cost(6)
    assert parts(c)["scores[0]"] == (384, 192)  # 2 * 24 * 4
    assert parts(c)["softmax"] == (360, 0)  # the layer holds the (6, 6) matrix: 5 * 2 * 36
    # one decoding step: the query at 5 after 5 cached tokens, keys 3, 4, 5 in the window
    assert parts(sliding_window_attention(8, 2, window=3).cost(1, past=5))["scores[0]"] == (48, 24)  # 2 * 3 * 4


def test_bilinear_btt_queries_are_free():
    # BTT(16, 16), cores (4, 4) x (4, 4), bond 1: full rank, split (I, B). Each core holds 4*4*4 = 64 entries and
    # one application is 64 + 64 = 128 MACs per token and head. 3 tokens, 2 heads, d_v 8.
    c = bilinear_btt_attention(16, 2).cost(3)
    p = parts(c)
    assert p["query_features[0]"] == (0, 0)
    assert p["key_features[0]"] == (1536, 768)  # 3 * 2 * 128
    assert p["scores[0]"] == (576, 288)  # 2 heads * 9 pairs * width 16
    assert p["attention_values"] == (288, 144)  # 2 * 9 * 8


def test_bilinear_mlr_over_features():
    # MLR(16, 16, ranks [2, 1], blocks [1, 4]): split width 1*2 + 4*1 = 6; one side per token and head costs
    # 2*16 (level 0) + 4 blocks * 1 * 4 (level 1) = 48 MACs. 5 tokens, 2 heads.
    c = bilinear_mlr_attention(16, 2, ranks=[2, 1], blocks=[1, 4]).cost(5)
    assert parts(c)["query_features[0]"] == parts(c)["key_features[0]"] == (960, 480)  # 5 * 2 * 48
    assert parts(c)["scores[0]"] == (600, 300)  # 2 * 25 * 6


def test_decoding_step_and_qk_norm():
    # one new token after 4 cached: keys 5; standard(12, 3) with d_head 4.
    p = parts(standard_attention(12, 3).cost(1, past=4))
    assert p["query_features[0]"] == (288, 144)  # 1 * 3 * 4 * 12: only the new token
    assert p["scores[0]"] == (120, 60)  # 3 heads * 1 * 5 keys * 4
    assert p["softmax"] == (75, 0)  # 5 * 3 * 5
    # QK-norm: 5 FLOPs per feature element: (5 * 3 * 4) queries + as many keys, T = 5
    assert parts(standard_attention(12, 3, qk_norm=True).cost(5))["qk_norm"] == (600, 0)


def test_projection_entries_are_structmat_costs():
    layer = mlr_attention(12, 3, ranks=[2, 2], block_sizes=[None, 3])
    c = layer.cost(7, batch=3)
    assert parts(c)["value_projection"] == (layer.value.cost(21).flops, layer.value.cost(21).macs)
    assert parts(c)["output_projection"][0] == layer.output.cost(21).flops


def test_pairs_joined():
    assert pairs_joined(None, None, 3, 7) == 21
    assert pairs_joined(3, None, 7, 7) == 9 + 9 + 1
    assert pairs_joined(3, None, 2, 7, q_offset=5) == 3 * 1 + 1 * 1  # query 5 in block [3, 6), query 6 in [6, 9)
    assert pairs_joined(None, 1, 4, 4) == 4
    assert pairs_joined(None, 2, 1, 6, q_offset=5) == 2


def test_report_and_errors():
    c = standard_attention(8, 2).cost(4)
    text = str(c)
    assert "scores[0]" in text and "total" in text and f"{c.flops:,}" in text
    with pytest.raises(KeyError, match=r"no part 'scores'; parts are \['query_features\[0\]'"):
        c["scores"]
    with pytest.raises(KeyError, match=r"no part starts with 'attn'"):
        c.total("attn")
    layer = standard_attention(8, 2)
    with pytest.raises(ValueError, match=r"StructuredAttention.cost: seq_len must be >= 1, got 0"):
        layer.cost(0)
    with pytest.raises(ValueError, match=r"StructuredAttention.cost: past must be >= 0, got -1"):
        layer.cost(3, past=-1)
    with pytest.raises(TypeError, match=r"batch must be an int, got float 2.0"):
        layer.cost(3, batch=2.0)


def test_decoding_step_of_a_dropping_cache_counts_the_keys_it_holds():
    # window 3, one token at position 20: its cache holds tokens 18, 19 (window - 1) plus the new one -> 3 keys.
    p = parts(sliding_window_attention(12, 3, window=3).cost(1, past=20))
    assert p["scores[0]"] == (72, 36)  # 3 heads * 3 pairs * rank 4
    assert p["softmax"] == (45, 0)  # 5 * 3 heads * 1 * 3 keys (not 21)
    assert p["attention_values"] == (72, 36)  # 3 * 1 * 3 * d_v 4
    # blocks of 4 and 2, no global level: at position 13 the cache holds 12 and the two new tokens 13, 14
    q = parts(mlr_attention(12, 3, ranks=[2, 2], block_sizes=[4, 2]).cost(2, past=13))
    assert q["softmax"] == (5 * 3 * 2 * 3, 0)
    assert q["scores[0]"][1] == 3 * (2 * 3) * 2  # block [12, 16): 2 queries x keys 12, 13, 14 (before causality)
    # a global level keeps every key
    assert parts(standard_attention(12, 3).cost(1, past=20))["softmax"] == (5 * 3 * 21, 0)


def test_pairs_joined_errors():
    with pytest.raises(ValueError, match=r"pairs_joined: block_size must be None or an int >= 1, got 0"):
        pairs_joined(0, None, 3, 3)
    with pytest.raises(TypeError, match=r"pairs_joined: t_q must be an int, got str '3'"):
        pairs_joined(None, None, "3", 3)
    with pytest.raises(ValueError, match=r"pairs_joined: q_offset must be >= 0, got -1"):
        pairs_joined(None, 2, 3, 3, q_offset=-1)
    with pytest.raises(ValueError, match=r"give block_size=2 or window=3, not both"):
        pairs_joined(2, 3, 3, 3)
    with pytest.raises(TypeError, match=r"StructuredAttention.cost: past must be an int, got float 1.5"):
        standard_attention(8, 2).cost(3, past=1.5)
    assert "total" in str(AttentionCost(1, 1, 0, 1, ()))
