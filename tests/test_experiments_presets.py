"""The `paper` presets (meant for a GPU, never trained in CI) build every variant and take a training step.

A preset that only fails at the start of a multi-hour GPU job is the worst kind of bug: these tests build each paper
variant at the preset's sizes (the smallest width for the forward pass, every width for the layer shapes), run one
forward and backward pass on a short input, and check the compute fields the records will carry.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from structmat_attention.experiments import icl, lm
from structmat_attention.experiments import timeseries as ts
from structmat_attention.experiments._train import transformer_cost


def _step(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    out = model(inputs)
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    return out


@pytest.mark.parametrize("variant", icl.PRESETS["paper"].variants)
def test_icl_paper_variants_build_and_step(variant):
    preset = icl.PRESETS["paper"]
    for width in preset.widths:  # every width divides by the variant's heads
        icl.build_attention(variant, width)
    width = min(preset.widths)
    torch.manual_seed(0)
    model = icl.ICLModel(preset.d, width, preset.n_layers, 4 * preset.d, lambda w: icl.build_attention(variant, w))
    tokens, _ = icl.RegressionTask(preset.d).sample(torch.Generator().manual_seed(0), 2, 2 * preset.d)
    assert _step(model, tokens).shape == (2, 2 * preset.d)
    flops, macs = transformer_cost(model.blocks, 4 * preset.d)
    assert flops > 2 * macs > 0


@pytest.mark.parametrize("variant", lm.PRESETS["paper"].variants)
def test_lm_paper_variants_build_and_step(variant):
    preset = lm.PRESETS["paper"]
    config = dataclasses.asdict(preset)
    torch.manual_seed(0)
    model = lm.build_model(variant, 96, min(preset.widths), config)
    assert len(model.blocks) == 6 and model.blocks[0].attn.n_heads == min(preset.widths) // 64
    if variant == "mlr":  # the paper's eight sequence levels: global, T/2, ..., T/128
        assert [lv.block_size for lv in model.blocks[0].attn.levels] == [None, 512, 256, 128, 64, 32, 16, 8]
    tokens = torch.randint(0, 96, (1, 64))
    assert _step(model, tokens).shape == (1, 64, 96)
    flops, _ = transformer_cost(model.blocks, preset.seq_len)
    assert flops > 0


@pytest.mark.parametrize("variant", ["standard", "mlr", "dlinear"])
@pytest.mark.parametrize("input_len", ts.PRESETS["paper"].input_lengths)
def test_timeseries_paper_variants_build_and_step(variant, input_len):
    preset = ts.PRESETS["paper"]
    torch.manual_seed(0)
    model = ts.build_model(variant, preset, input_len, preset.horizon)
    assert _step(model, torch.randn(2, input_len)).shape == (2, preset.horizon)
