"""The training loop every experiment shares: µP AdamW, warmup + cosine schedule, evaluation points, DDP, progress.

An experiment hands :func:`fit` a model, a :class:`TrainConfig`, a ``sample(step)`` that returns the step's *global*
batch (deterministic in the step: every rank draws the same one and keeps its own shard, so a run on N processes sees
exactly the batches of a run on one), a ``loss(model, batch)`` and an ``evaluate(model)``. :func:`fit` returns one
record per evaluation point.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from structmat.checks import check_int
from structmat.init import mup_param_groups

from ..layers import StructuredAttention
from ..model import TransformerBlock

__all__ = [
    "TrainConfig",
    "fit",
    "shard",
    "distributed",
    "rank",
    "world_size",
    "zero_attention_outputs",
    "transformer_cost",
    "count_params",
    "FLOPS_CONVENTION",
]

FLOPS_CONVENTION = (
    "forward FLOPs per token of the transformer blocks (attention from StructuredAttention.cost, the MLP's two "
    "matmuls), one multiply-add = 2 FLOPs; embeddings, read-in/read-out, LM head and LayerNorms excluded; "
    "macs_per_token is the paper's convention (multiply-add = 1); train_flops = 3 x flops_per_token x tokens"
)


@dataclass(frozen=True)
class TrainConfig:
    """One run's optimization settings.

    Args:
        steps: optimizer steps.
        batch_size: examples per step, over all processes (must divide by the number of processes).
        lr: AdamW learning rate tuned at ``base_width``; each tensor gets ``lr * base_width / fan_in`` (µP,
            :func:`structmat.mup_param_groups`), vectors keep ``lr``.
        base_width: the width at which ``lr`` holds unscaled.
        eval_every: steps between evaluation points (also evaluated at step 0 and at the last step).
        warmup: linear warmup steps.
        final_lr_ratio: the cosine schedule ends at ``final_lr_ratio * lr``.
        weight_decay: AdamW weight decay.
        eps: AdamW epsilon.
        betas: AdamW betas.
        grad_clip: clip the global gradient norm to this (None: no clipping).

    Example:
        >>> TrainConfig(steps=100, batch_size=8, lr=1e-3, base_width=32, eval_every=50).eval_steps()
        [0, 50, 100]
    """

    steps: int
    batch_size: int
    lr: float
    base_width: int
    eval_every: int
    warmup: int = 0
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    eps: float = 1e-8
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "base_width", "eval_every"):
            check_int("TrainConfig", name, getattr(self, name))
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or not 0 <= self.warmup <= self.steps:
            raise ValueError(f"TrainConfig: warmup must be an int in 0 .. steps={self.steps}, got {self.warmup!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig: lr must be a finite number > 0, got {self.lr!r}")
        if not 0 <= self.final_lr_ratio <= 1:
            raise ValueError(f"TrainConfig: final_lr_ratio must be in [0, 1], got {self.final_lr_ratio!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig: grad_clip must be > 0 or None, got {self.grad_clip!r}")

    def eval_steps(self) -> list[int]:
        """The steps after which the model is evaluated (0 = before training)."""
        return sorted({*range(0, self.steps, self.eval_every), self.steps})

    def lr_factor(self, step: int) -> float:
        """The schedule's multiplier of every group's learning rate at ``step`` (0-based)."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(self.steps - self.warmup, 1)
        progress = min((step - self.warmup) / span, 1.0)
        return self.final_lr_ratio + (1 - self.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def as_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


# -- processes ---------------------------------------------------------------------------------------------------------
def distributed() -> bool:
    """Whether a torch.distributed process group with more than one process is running."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and world_size() > 1


def rank() -> int:
    """This process's rank (0 without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of processes (1 without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def shard(batch: Any, index: int, count: int) -> Any:
    """Rows ``index * B/count .. (index + 1) * B/count`` of every tensor in ``batch`` (nested tuples/lists/dicts).

    Example:
        >>> import torch
        >>> x, y = shard((torch.arange(6), torch.arange(6) * 10), 1, 3)
        >>> x.tolist(), y.tolist()
        ([2, 3], [20, 30])
    """
    if isinstance(batch, torch.Tensor):
        n = batch.shape[0]
        if n % count:
            raise ValueError(f"shard: a global batch of {n} examples does not split over {count} processes")
        size = n // count
        return batch[index * size : (index + 1) * size]
    if isinstance(batch, Mapping):
        return {k: shard(v, index, count) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard(v, index, count) for v in batch)
    return batch


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


# -- model helpers -----------------------------------------------------------------------------------------------------
def zero_attention_outputs(model: torch.nn.Module) -> int:
    """Zero the output projection of every :class:`StructuredAttention` in ``model`` (the paper's µP init).

    Only a one-factor output operator (``Dense``, the default) is zeroed: zeroing every factor of a product would
    leave each with a zero gradient forever. Returns the number of layers zeroed.
    """
    zeroed = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, StructuredAttention):
                params = list(module.output.parameters())
                if len(params) == 1:
                    params[0].zero_()
                    zeroed += 1
    return zeroed


def transformer_cost(blocks: Any, seq_len: int) -> tuple[int, int]:
    """``(flops, macs)`` per token of a stack of :class:`TransformerBlock` on sequences of ``seq_len`` tokens.

    Attention from each layer's own ``cost(seq_len)`` (score, softmax, value and projection parts); the MLP's two
    matmuls ``2 · D · hidden`` MACs per token. LayerNorms and residual adds are left out (a few FLOPs per feature).
    """
    flops = macs = 0
    for block in blocks:
        if not isinstance(block, TransformerBlock):
            raise TypeError(f"transformer_cost: expected TransformerBlock modules, got {type(block).__name__}")
        c = block.attn.cost(seq_len)
        flops += c.flops
        macs += c.macs
        mlp_macs = sum(m.in_features * m.out_features for m in block.mlp if isinstance(m, torch.nn.Linear))
        flops += 2 * mlp_macs * seq_len
        macs += mlp_macs * seq_len
    return flops // seq_len, macs // seq_len


def count_params(module: torch.nn.Module) -> int:
    """Trainable parameter entries of ``module`` (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


# -- the loop ----------------------------------------------------------------------------------------------------------
def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = mup_param_groups(model, lr=config.lr, base_width=config.base_width)
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)


def fit(
    model: torch.nn.Module,
    config: TrainConfig,
    sample: Callable[[int], Any],
    loss: Callable[[torch.nn.Module, Any], torch.Tensor],
    evaluate: Callable[[torch.nn.Module], dict[str, float]],
    *,
    tokens_per_example: int | Callable[[int], int],
    device: torch.device | str = "cpu",
    desc: str = "train",
    progress: bool = True,
    position: int = 0,
) -> list[dict[str, Any]]:
    """Train ``model`` and return one record per evaluation point.

    Each record: ``step``, ``train_loss`` (the mean training loss over the steps since the previous point, over
    all processes; None at step 0), ``tokens`` (seen so far, all processes), ``wall_time`` (seconds since the start),
    ``lr`` (the schedule's factor) and whatever ``evaluate`` returns.

    Args:
        model: the module (moved to ``device``; wrapped in DistributedDataParallel when several processes run).
        config: the optimization settings.
        sample: ``sample(step)`` -> the global batch of that step (tensors with the examples on dim 0).
        loss: ``loss(model, batch)`` -> the mean loss over the batch's examples (a scalar tensor).
        evaluate: ``evaluate(model)`` -> metrics; called under ``torch.no_grad()`` in eval mode on rank 0, whose
            metrics every process records.
        tokens_per_example: tokens an example holds (for tokens/s and the compute axis), or ``f(step)`` when the
            length changes with the step (a curriculum).
        device: where to train.
        desc: the progress bar's label.
        progress: show a tqdm bar (rank 0 only).
        position: the bar's line (for several runs at once).
    """
    device = torch.device(device)
    model.to(device)
    count, index = world_size(), rank()
    if config.batch_size % count:
        raise ValueError(
            f"fit: batch_size={config.batch_size} does not split over {count} processes; use a multiple of {count}"
        )
    net: torch.nn.Module = model
    if distributed():
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    opt = _optimizer(model, config)
    evals = set(config.eval_steps())
    records: list[dict[str, Any]] = []
    bar = None
    if progress and index == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, desc=desc, position=position, leave=True, dynamic_ncols=True)
    start = time.perf_counter()
    running, seen, tokens = 0.0, 0, 0
    per_example = tokens_per_example if callable(tokens_per_example) else (lambda step: tokens_per_example)

    def point(step: int) -> None:
        nonlocal running, seen
        train_loss = None
        if seen:
            total = torch.tensor([running, float(seen)], dtype=torch.float64, device=device)
            if distributed():
                torch.distributed.all_reduce(total)
                total /= count
            train_loss = float(total[0] / total[1])
        running, seen = 0.0, 0
        metrics: dict[str, float] = {}
        if index == 0:  # rank 0 evaluates; the others receive its metrics
            model.train(False)  # evaluation mode
            with torch.no_grad():
                metrics = evaluate(model)
            model.train()
        if distributed():
            shared = [metrics]
            torch.distributed.broadcast_object_list(shared, src=0)
            metrics = shared[0]
        records.append(
            {
                "step": step,
                "train_loss": train_loss,
                "tokens": tokens,
                "wall_time": time.perf_counter() - start,
                "lr": config.lr_factor(max(step - 1, 0)),
                **{k: float(v) for k, v in metrics.items()},
            }
        )

    model.train()
    point(0)
    for step in range(config.steps):
        factor = config.lr_factor(step)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        batch = _to(shard(sample(step), index, count), device)
        value = loss(net, batch)
        current = float(value.detach())
        if not math.isfinite(current):
            raise FloatingPointError(f"{desc}: the training loss is {current} at step {step}; lower the lr")
        opt.zero_grad(set_to_none=True)
        value.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        running += current
        seen += 1
        tokens += config.batch_size * per_example(step)
        if bar is not None:
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{current:.4g}", tok_s=f"{tokens / max(elapsed, 1e-9):.3g}", refresh=False)
            bar.update(1)
        if step + 1 in evals:
            point(step + 1)
            if bar is not None:
                shown = {k: v for k, v in records[-1].items() if k not in ("step", "tokens", "wall_time", "lr")}
                bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items() if isinstance(v, float)}, refresh=True)
    if bar is not None:
        bar.close()
    return records
