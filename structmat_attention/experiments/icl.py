"""In-context linear regression: can attention with a small head dimension learn least squares in context?

The task of Garg et al. (2022) as the structured-attention paper (Kuang et al., ICML 2025) sets it: each prompt draws
``w ~ N(0, I_d)`` and ``n`` points ``x_i ~ N(0, I_d / d)`` with ``y_i = w · x_i``, interleaved as tokens
``x_1, y_1, ..., x_n, y_n`` (a ``y`` token is ``(y, 0, ..., 0)``). A pre-LN transformer (:class:`TransformerBlock`
with a linear read-in and a linear read-out, learned positions) predicts ``y_i`` at the position of ``x_i`` from the
pairs before it; the loss is the mean squared error over the ``x`` positions. A curriculum grows the effective
dimension (coordinates beyond it are zero) and the number of points from ``curriculum_dims`` /
``curriculum_points`` to ``d`` / ``2d`` over the first ``curriculum_fraction`` of training.

Metric: the squared error at the last position (``n = 2d``: the query after ``2d - 1`` examples, where least squares
is exact) over a fixed held-out set; predicting 0 scores ``E[y^2] = 1``.

Variants are named ``<family>-h<heads>``: ``standard-h16`` (standard attention, 16 heads of ``width / 16``),
``btt-h2`` (Bilinear BTT attention, 2 heads), ``mlr-h2`` (Bilinear MLR attention over the features, 2 heads).
The paper's claim: Bilinear BTT (and MLR) beat standard attention at equal compute when the head dimension is below
``d``; standard attention needs ``d_head`` close to ``d``.
"""

from __future__ import annotations

import argparse
import functools
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

import structmat as sm
from structmat.checks import check_int

from ..model import TransformerBlock
from ..variants import bilinear_btt_attention, bilinear_mlr_attention, standard_attention
from ._runner import RunSpec
from ._train import TrainConfig, count_params, fit, transformer_cost, zero_attention_outputs

__all__ = [
    "NAME",
    "TITLE",
    "METRIC",
    "METRIC_LABEL",
    "ICLPreset",
    "PRESETS",
    "RegressionTask",
    "ICLModel",
    "parse_variant",
    "build_attention",
    "add_arguments",
    "plan",
    "run_one",
]

NAME = "icl"
TITLE = "In-context linear regression"
METRIC = "last_mse"
METRIC_LABEL = "squared error at the last position"

FAMILIES = ("standard", "btt", "mlr")


@dataclass(frozen=True)
class ICLPreset:
    """One size of the experiment.

    Args:
        d: the regression dimension.
        widths: model widths (one run per width, variant and seed).
        n_layers: transformer blocks.
        variants: default variants (``<family>-h<heads>``).
        seeds: seeds per variant.
        steps: optimizer steps.
        batch_size: prompts per step.
        lr: AdamW learning rate at ``width`` (µP per-tensor rates around it).
        warmup: warmup steps.
        eval_every: steps between evaluation points.
        eval_prompts: held-out prompts (full dimension and length).
        curriculum_dims: the starting effective dimension.
        curriculum_points: the starting number of points.
        curriculum_fraction: the part of training over which both grow to ``d`` and ``2d``.
        qk_norm: layer-normalize the query and key features (the paper's QK-LayerNorm).
    """

    d: int
    widths: tuple[int, ...]
    n_layers: int
    variants: tuple[str, ...]
    seeds: int
    steps: int
    batch_size: int
    lr: float
    warmup: int
    eval_every: int
    eval_prompts: int
    curriculum_dims: int
    curriculum_points: int
    curriculum_fraction: float = 0.5
    qk_norm: bool = True


#: ``smoke`` runs in seconds (tests); ``quick`` shows the ordering on a 2-core CPU in about 10 minutes;
#: ``paper`` is the paper's setting (6 layers, batch 64, curriculum from 4 dimensions / 8 points) at d = 32 over
#: widths 64 .. 512 (its step count is ours: the paper trains until the curves flatten), for a GPU.
PRESETS: dict[str, ICLPreset] = {
    "smoke": ICLPreset(
        d=4,
        widths=(16,),
        n_layers=1,
        variants=("standard-h1", "standard-h8", "btt-h1", "mlr-h1"),
        seeds=1,
        steps=6,
        batch_size=8,
        lr=1e-3,
        warmup=2,
        eval_every=3,
        eval_prompts=16,
        curriculum_dims=2,
        curriculum_points=3,
    ),
    "quick": ICLPreset(
        d=8,
        widths=(32,),
        n_layers=3,
        variants=("standard-h2", "standard-h8", "btt-h8", "mlr-h8"),
        seeds=3,
        steps=2000,
        batch_size=64,
        lr=1e-3,
        warmup=100,
        eval_every=200,
        eval_prompts=512,
        curriculum_dims=4,
        curriculum_points=8,
        curriculum_fraction=0.4,
    ),
    "paper": ICLPreset(
        d=32,
        widths=(64, 128, 256, 512),
        n_layers=6,
        variants=("standard-h2", "standard-h8", "standard-h32", "btt-h8", "mlr-h8"),
        seeds=3,
        steps=50_000,
        batch_size=64,
        lr=1e-3,
        warmup=1000,
        eval_every=1000,
        eval_prompts=4096,
        curriculum_dims=4,
        curriculum_points=8,
    ),
}


# -- data --------------------------------------------------------------------------------------------------------------
class RegressionTask:
    """Prompts of noiseless linear regression, interleaved as tokens.

    Args:
        d: the dimension of ``x`` and ``w``.

    Example:
        >>> task = RegressionTask(3)
        >>> tokens, ys = task.sample(torch.Generator().manual_seed(0), batch=2, points=4, dims=3)
        >>> tokens.shape, ys.shape                     # 2 * points tokens of width d
        (torch.Size([2, 8, 3]), torch.Size([2, 4]))
        >>> torch.equal(tokens[:, 1::2, 0], ys), bool((tokens[:, 1::2, 1:] == 0).all())
        (True, True)
    """

    def __init__(self, d: int) -> None:
        self.d = check_int("RegressionTask", "d", d)

    def sample(
        self, generator: torch.Generator, batch: int, points: int, dims: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens (batch, 2 points, d), y (batch, points))``; coordinates ``dims ..`` of ``x`` and ``w`` are 0."""
        d = self.d
        dims = d if dims is None else dims
        if not 1 <= dims <= d:
            raise ValueError(f"RegressionTask.sample: dims must be in 1 .. d={d}, got {dims}")
        w = torch.randn(batch, d, generator=generator)
        x = torch.randn(batch, points, d, generator=generator) / d**0.5
        if dims < d:
            w[:, dims:] = 0
            x[:, :, dims:] = 0
        y = torch.einsum("bpd,bd->bp", x, w)
        tokens = torch.zeros(batch, 2 * points, d)
        tokens[:, 0::2] = x
        tokens[:, 1::2, 0] = y
        return tokens, y


class ICLModel(torch.nn.Module):
    """Read-in ``Linear(d, width)`` + learned positions, pre-LN blocks, final LN, read-out ``Linear(width, 1)``.

    Args:
        d: token width of the task.
        width: the model width.
        n_layers: blocks.
        max_len: the longest prompt in tokens.
        attention: ``attention(width) -> module``, one per block.

    Example:
        >>> model = ICLModel(3, 8, 1, 10, lambda w: standard_attention(w, 2))
        >>> model(torch.randn(2, 6, 3)).shape            # one prediction per x position
        torch.Size([2, 3])
    """

    def __init__(self, d: int, width: int, n_layers: int, max_len: int, attention: Any) -> None:
        super().__init__()
        self.read_in = torch.nn.Linear(d, width)
        self.pos = torch.nn.Parameter(torch.randn(max_len, width) * 0.02)
        self.blocks = torch.nn.ModuleList(TransformerBlock(width, attention(width)) for _ in range(n_layers))
        self.ln_f = torch.nn.LayerNorm(width)
        self.read_out = torch.nn.Linear(width, 1)
        with torch.no_grad():  # the paper's zero readout
            self.read_out.weight.zero_()
            self.read_out.bias.zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, 2n, d) -> (B, n)``: the prediction of each ``y_i`` at the position of ``x_i``."""
        h = self.read_in(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.read_out(self.ln_f(h))[:, 0::2, 0]


# -- variants ----------------------------------------------------------------------------------------------------------
_VARIANT = re.compile(r"^(standard|btt|mlr)-h([1-9][0-9]*)$")


def parse_variant(name: str) -> tuple[str, int]:
    """``'btt-h2' -> ('btt', 2)``; anything else is a ValueError naming the accepted forms.

    Example:
        >>> parse_variant("standard-h16")
        ('standard', 16)
    """
    m = _VARIANT.match(name) if isinstance(name, str) else None
    if m is None:
        raise ValueError(
            f"icl: unknown variant {name!r}; variants are <family>-h<heads> with family one of "
            f"{', '.join(FAMILIES)} (e.g. standard-h16, btt-h2, mlr-h2)"
        )
    return m.group(1), int(m.group(2))


def _mlr_ranks(d_head: int) -> tuple[list[int], list[int]]:
    """Feature levels of 1, 2, 4 blocks with ranks ``d_head/2, d_head/4, d_head/4`` (summing to ``d_head``)."""
    if d_head < 4:
        return [d_head], [1]
    return [d_head - 2 * (d_head // 4), d_head // 4, d_head // 4], [1, 2, 4]


def build_attention(variant: str, width: int, *, qk_norm: bool = True) -> torch.nn.Module:
    """The causal attention layer of ``variant`` at ``width``, from the package's constructors.

    Example:
        >>> layer = build_attention("mlr-h2", 32)
        >>> layer.levels[0].op.name
        'MLR(32, 32, ranks=[8, 4, 4], blocks=[1, 2, 4], heads=2)'
    """
    family, heads = parse_variant(variant)
    if width % heads:
        raise ValueError(f"icl: variant {variant!r} needs a width divisible by {heads} heads, got width {width}")
    if family == "standard":
        return standard_attention(width, heads, qk_norm=qk_norm)
    if family == "btt":
        return bilinear_btt_attention(width, heads, qk_norm=qk_norm)
    ranks, blocks = _mlr_ranks(width // heads)
    return bilinear_mlr_attention(width, heads, ranks=ranks, blocks=blocks, qk_norm=qk_norm)


# -- the experiment ----------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--d`` (regression dimension), ``--widths``, ``--layers``, ``--batch-size``, ``--lr`` override the preset
    (``--steps`` and ``--eval-every`` are common to every experiment)."""
    parser.add_argument("--d", type=int, default=None, help="regression dimension (default: the preset's)")
    parser.add_argument("--widths", type=int, nargs="+", default=None, help="model widths (default: the preset's)")
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per step (default: the preset's)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate at the width (default: the preset's)")


def plan(args: argparse.Namespace) -> list[RunSpec]:
    """One :class:`RunSpec` per width, variant and seed."""
    preset = PRESETS[args.preset]
    given = {"d": args.d, "n_layers": args.layers, "batch_size": args.batch_size, "lr": args.lr}
    changes: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    for k, v in changes.items():
        if not v > 0:
            raise ValueError(f"icl: {k} must be > 0, got {v}")
    if args.widths:
        if min(args.widths) < 1:
            raise ValueError(f"icl: widths must be >= 1, got {args.widths}")
        changes["widths"] = tuple(args.widths)
    preset = replace(preset, **changes)
    variants = list(args.variants or preset.variants)
    for v in variants:
        family, heads = parse_variant(v)
        for width in preset.widths:
            if width % heads:
                raise ValueError(f"icl: variant {v!r} needs a width divisible by {heads} heads, got width {width}")
    seeds = args.seeds or preset.seeds
    config = asdict(preset)
    specs = [
        RunSpec(NAME, v, args.seed + s, args.preset, args.device, {**config, "width": width})
        for width in preset.widths
        for v in variants
        for s in range(seeds)
    ]
    # the slowest runs first, so that parallel workers finish together: wide, then BTT, MLR, many heads
    slow = {"btt": 0, "mlr": 1, "standard": 2}
    return sorted(
        specs, key=lambda r: (-r.config["width"], slow[parse_variant(r.variant)[0]], -parse_variant(r.variant)[1])
    )


def _curriculum(c: dict[str, Any], step: int) -> tuple[int, int]:
    """``(dims, points)`` at ``step``: linear growth from the starting values to ``d``, ``2d``."""
    d, n = c["d"], 2 * c["d"]
    ramp = max(int(c["curriculum_fraction"] * c["steps"]), 1)
    t = min(step / ramp, 1.0)
    dims = min(d, max(1, round(c["curriculum_dims"] + t * (d - c["curriculum_dims"]))))
    points = min(n, max(2, round(c["curriculum_points"] + t * (n - c["curriculum_points"]))))
    return dims, points


def run_one(spec: RunSpec, progress: bool = True, position: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train one variant at one seed; returns the static fields and the evaluation records."""
    c = spec.config
    d, width, points = c["d"], c["width"], 2 * c["d"]
    torch.manual_seed(spec.seed)
    model = ICLModel(d, width, c["n_layers"], 2 * points, functools.partial(_attention, spec.variant, c["qk_norm"]))
    zero_attention_outputs(model)
    task = RegressionTask(d)
    held_out = task.sample(torch.Generator().manual_seed(10_000 + spec.seed), c["eval_prompts"], points)

    def sample(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        dims, n = _curriculum(c, step)
        gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + step)
        return task.sample(gen, c["batch_size"], n, dims)

    def loss(net: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        tokens, y = batch
        return torch.nn.functional.mse_loss(net(tokens), y)

    def evaluate(net: torch.nn.Module) -> dict[str, float]:
        device = next(net.parameters()).device
        errors = []
        for tokens, y in zip(held_out[0].split(256), held_out[1].split(256)):
            errors.append((net(tokens.to(device)) - y.to(device)).square().cpu())
        err = torch.cat(errors)
        return {"last_mse": float(err[:, -1].mean()), "mse": float(err.mean())}

    config = TrainConfig(
        steps=c["steps"],
        batch_size=c["batch_size"],
        lr=c["lr"],
        base_width=width,
        eval_every=c["eval_every"],
        warmup=min(c["warmup"], c["steps"]),
    )
    records = fit(
        model,
        config,
        sample,
        loss,
        evaluate,
        tokens_per_example=lambda step: 2 * _curriculum(c, step)[1],
        device=spec.device,
        desc=f"icl {spec.variant} w{width} s{spec.seed}",
        progress=progress,
        position=position,
    )
    family, heads = parse_variant(spec.variant)
    flops, macs = transformer_cost(model.blocks, 2 * points)
    static = {
        "width": width,
        "d": d,
        "family": family,
        "n_heads": heads,
        "d_head": width // heads,
        "qk_width": _qk_width(model.blocks[0].attn),
        "n_layers": c["n_layers"],
        "params": count_params(model.blocks),
        "flops_per_token": flops,
        "macs_per_token": macs,
    }
    return static, records


def _qk_width(layer: Any) -> int:
    """The query/key feature width per head: the cut width of the layer's split (``d_head`` for standard)."""
    return sum(sm.bilinear_split(lv.op)[0].shape[0] for lv in layer.levels)


def _attention(variant: str, qk_norm: bool, width: int) -> torch.nn.Module:
    return build_attention(variant, width, qk_norm=qk_norm)
