"""Every argument of the functional attention API is checked once: ValueError for a bad value, TypeError for a bad
type, each naming the function and the bad value (issue 8, item 14)."""

from __future__ import annotations

import math

import pytest
import torch

import structmat as sm
from structmat_attention import (
    Level,
    LevelFeatures,
    attend,
    attention_features,
    bilinear_scores,
    level_features,
    resolve_scale,
    structured_attention,
)

F64 = torch.float64
METHODS = ["scores", "sdpa", "streamed", "auto"]


@pytest.fixture
def setup():
    torch.manual_seed(0)
    W = sm.LowRank(6, 6, rank=2, heads=2, dtype=F64)
    x, v = torch.randn(5, 6, dtype=F64), torch.randn(2, 5, 3, dtype=F64)
    return W, x, v


@pytest.mark.parametrize("method", METHODS)
def test_q_offset(setup, method):
    W, x, v = setup
    with pytest.raises(ValueError, match=r"structured_attention: q_offset must be >= 0, got -1"):
        structured_attention(x, x, v, W, causal=True, q_offset=-1, method=method, key_block=2)
    for bad in (1.5, True, "2"):
        with pytest.raises(TypeError, match=r"structured_attention: q_offset must be an int, got \w+ "):
            structured_attention(x, x, v, W, causal=True, q_offset=bad, method=method, key_block=2)
    with pytest.raises(ValueError, match=r"bilinear_scores: q_offset must be >= 0, got -2"):
        bilinear_scores(x, x, W, q_offset=-2)
    with pytest.raises(ValueError, match=r"attend: q_offset must be >= 0, got -1"):
        attend(attention_features(x, x, W), v, q_offset=-1)


@pytest.mark.parametrize("method", METHODS)
def test_mask_shape_and_type(setup, method):
    W, x, v = setup
    with pytest.raises(
        ValueError, match=r"mask of shape \(3, 5, 5\) does not broadcast to the scores' shape \(2, 5, 5\)"
    ):
        structured_attention(x, x, v, W, mask=torch.ones(3, 5, 5, dtype=torch.bool), method=method, key_block=2)
    with pytest.raises(ValueError, match=r"mask of shape \(5, 4\) does not broadcast .* T_q=5, T_k=5"):
        structured_attention(x, x, v, W, mask=torch.zeros(5, 4, dtype=F64), method=method, key_block=2)
    with pytest.raises(ValueError, match=r"mask of shape \(4, 2, 5, 5\) does not broadcast"):  # no batch here
        structured_attention(x, x, v, W, mask=torch.zeros(4, 2, 5, 5, dtype=F64), method=method, key_block=2)
    with pytest.raises(TypeError, match=r"mask must be boolean .* or floating .*, got torch.int64"):
        structured_attention(x, x, v, W, mask=torch.ones(5, 5, dtype=torch.long), method=method, key_block=2)
    with pytest.raises(TypeError, match="mask must be a tensor or None, got list"):
        structured_attention(x, x, v, W, mask=[[True]], method=method, key_block=2)


@pytest.mark.parametrize("method", METHODS)
def test_values_shape_heads_and_dtype(setup, method):
    W, x, v = setup
    with pytest.raises(ValueError, match=r"v of shape \(3, 5, 3\) has 3 heads \(dim -3\), the levels are stacks of 2"):
        structured_attention(x, x, torch.randn(3, 5, 3, dtype=F64), W, method=method, key_block=2)
    with pytest.raises(ValueError, match=r"v's batch dims \(4, 2\) do not broadcast with the scores' \(3, 2\)"):
        structured_attention(
            torch.randn(3, 5, 6, dtype=F64), x, torch.randn(4, 2, 5, 3, dtype=F64), W, method=method, key_block=2
        )
    with pytest.raises(ValueError, match=r"v must have shape \(\.\.\., T_k=5, D_v\), got \(2, 4, 3\)"):
        structured_attention(x, x, v[:, :4], W, method=method, key_block=2)
    with pytest.raises(TypeError, match=r"v must have the features' dtype torch.float64, got torch.float32"):
        structured_attention(x, x, v.float(), W, method=method, key_block=2)
    with pytest.raises(TypeError, match=r"v must be a tensor of shape \(\.\.\., T_k=5, D_v\), got list"):
        structured_attention(x, x, [1.0], W, method=method, key_block=2)


def test_key_block_causal_method_unjoined(setup):
    W, x, v = setup
    for bad in (2.0, True, "2"):
        with pytest.raises(TypeError, match=r"key_block must be None or an int >= 1, got \w+ "):
            structured_attention(x, x, v, W, key_block=bad)
    with pytest.raises(ValueError, match=r"key_block must be None or an int >= 1, got -3"):
        structured_attention(x, x, v, W, key_block=-3)
    with pytest.raises(TypeError, match=r"structured_attention: causal must be a bool, got str 'yes'"):
        structured_attention(x, x, v, W, causal="yes")
    with pytest.raises(ValueError, match=r"unjoined must be None, 'zero' or 'mask', got 'drop'"):
        structured_attention(x, x, v, W, unjoined="drop")
    with pytest.raises(ValueError, match=r"bilinear_scores: unjoined must be None, 'zero' or 'mask', got 0"):
        bilinear_scores(x, x, W, unjoined=0)
    with pytest.raises(ValueError, match=r"attend: method must be 'auto', 'pieces', 'sdpa', 'scores' or 'streamed'"):
        attend(attention_features(x, x, W), v, method="flash")
    with pytest.raises(TypeError, match=r"attention_features: qk_norm must be a bool, got int 1"):
        attention_features(x, x, W, qk_norm=1)


def test_tokens(setup):
    W, x, _ = setup
    with pytest.raises(TypeError, match=r"bilinear_scores: x_k must be a tensor of shape \(\.\.\., T, D\), got list"):
        bilinear_scores(x, [[1.0]], W)
    with pytest.raises(TypeError, match=r"x_q must be a floating-point tensor, got torch.int64"):
        bilinear_scores(torch.ones(5, 6, dtype=torch.long), x, W)
    with pytest.raises(TypeError, match=r"x_q and x_k must have one dtype, got torch.float32 and torch.float64"):
        bilinear_scores(x.float(), x, W)
    with pytest.raises(TypeError, match=r"LowRank\(6, 6, rank=2, heads=2\) has torch.float64 parameters, the tokens"):
        bilinear_scores(x.float(), x.float(), W)
    with pytest.raises(ValueError, match=r"batch dims of x_q \(2, 5, 6\) and x_k \(3, 5, 6\) do not broadcast"):
        bilinear_scores(torch.randn(2, 5, 6, dtype=F64), torch.randn(3, 5, 6, dtype=F64), W)


def test_scale():
    with pytest.raises(ValueError, match=r"bilinear_scores: scale must be finite, got nan"):
        resolve_scale(math.nan, 4)
    with pytest.raises(ValueError, match=r"resolve_scale: the feature width must be >= 1, got 0"):
        resolve_scale("sqrt", 0, "resolve_scale")
    with pytest.raises(TypeError, match=r"scale must be a number, 'sqrt' or 'mup', got NoneType"):
        resolve_scale(None, 4)
    W = sm.Dense(4, 4)
    with pytest.raises(ValueError, match=r"Level\(Dense\(4, 4\)\): scale must be finite, got inf"):
        Level(None, W, math.inf)
    with pytest.raises(TypeError, match=r"Level\(Dense\(4, 4\)\): block_size must be None or an int >= 1, got float"):
        Level(2.5, W)
    with pytest.raises(TypeError, match=r"window must be None or an int >= 1, got bool True"):
        Level(None, W, window=True)


def test_attend_features(setup):
    W, x, v = setup
    f = attention_features(x, x, W)
    with pytest.raises(TypeError, match=r"attend: features must be a non-empty list of LevelFeatures, got dict"):
        attend({}, v)
    with pytest.raises(TypeError, match=r"attend: features\[0\] must be a LevelFeatures \(level, q, k, scale\)"):
        attend([(f[0].q, f[0].k)], v)
    with pytest.raises(TypeError, match=r"attend: features\[0\] must hold a Level and two tensors"):
        attend([(W, f[0].q, f[0].k, 1.0)], v)
    with pytest.raises(ValueError, match=r"features\[0\] needs q \(\.\.\., T_q, r\) and k \(\.\.\., T_k, r\) of one"):
        attend([LevelFeatures(f[0].level, f[0].q, f[0].k[..., :1], 1.0)], v)
    with pytest.raises(ValueError, match=r"every level needs the same T_k, got \[5, 4\]"):
        attend([f[0], LevelFeatures(f[0].level, f[0].q, f[0].k[..., :4, :], 1.0)], v)
    with pytest.raises(ValueError, match=r"H = 2 or 1, got \(3, 5, 2\) and \(2, 5, 2\)"):
        attend([LevelFeatures(f[0].level, torch.randn(3, 5, 2, dtype=F64), f[0].k, 1.0)], v)
    with pytest.raises(ValueError, match=r"features\[0\].scale must be finite, got nan"):
        attend([LevelFeatures(f[0].level, f[0].q, f[0].k, math.nan)], v)
    with pytest.raises(TypeError, match=r"features\[0\].scale must be a real number, got str 'a'"):
        attend([LevelFeatures(f[0].level, f[0].q, f[0].k, "a")], v)
    with pytest.raises(TypeError, match=r"features must be floating-point tensors of one dtype"):
        attend([LevelFeatures(f[0].level, f[0].q.float(), f[0].k, 1.0)], v)


def test_level_features(setup):
    W, x, _ = setup
    with pytest.raises(TypeError, match=r"level_features: level must be a Level, got LowRank"):
        level_features(W, x, x)
    with pytest.raises(ValueError, match=r"level_features: LowRank\(6, 6, rank=2, heads=2\) needs x_q"):
        level_features(Level(None, W), x[:, :4], x)


@pytest.mark.parametrize("method", METHODS)
def test_dtype_checks_leave_autocast_alone(method):
    torch.manual_seed(0)
    levels = [Level(None, sm.LowRank(6, 6, rank=2, heads=2)), Level(2, sm.LowRank(6, 6, rank=1, heads=2))]
    x, v = torch.randn(5, 6), torch.randn(2, 5, 3)
    expected = structured_attention(x, x, v, levels, causal=True, method=method, key_block=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 tokens, float32 parameters, values and mask
        out = structured_attention(
            x.bfloat16(), x.bfloat16(), v, levels, causal=True, mask=torch.zeros(5, 5), method=method, key_block=2
        )
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.1)
