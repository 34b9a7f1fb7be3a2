"""ETT oil-temperature forecasting: standard vs MLR attention over input patches, with naive and DLinear baselines.

The paper's claim (Kuang et al., ICML 2025): MLR attention's gain over standard attention grows with the input length.
Data: an ETT CSV (``date`` and ``OT`` columns, e.g. ETTh1.csv), univariate OT, the standard split of the forecasting
literature (Informer and later: the first 12 months train, the next 4 validation, the next 4 test; hourly
8640 / 2880 / 2880 rows; the validation and test windows' inputs reach back ``input_len`` rows into the previous
split), standardized with the training split's mean and (population) standard deviation. Every window is an input of
``input_len`` values and a target of the ``horizon`` values after it; metrics are MSE and MAE on the standardized
scale over every window (stride 1) of the test split (``test_mse`` is the headline) and the validation MSE.
Early stopping on validation, as the forecasting literature reports: every run trains its full budget and is
evaluated at every point, and the final table (and the input-length plot) takes each seed's point with the lowest
``val_mse`` (:data:`SELECT_BY`); ``results.jsonl`` keeps every point. Training batches draw window starts uniformly
from the training split with a generator seeded from ``(seed, step)``.

Variants (``--variants``):

- ``standard`` / ``mlr``: a small non-causal transformer over patches of the input (PatchTST-like). The window is cut
  to the values its ``N`` patches cover (``patch_len`` values every ``patch_stride`` values, aligned to the window's
  end: the oldest ``(L - patch_len) % patch_stride`` values are dropped), normalized by its own mean and standard
  deviation (``(x - mean) / sqrt(var + 1e-5)``; the forecast is multiplied back by the std and the mean re-added, as
  RevIN without affine parameters), patched, embedded by a ``patch_len x width`` matrix plus learned positions,
  passed through pre-LN :class:`~structmat_attention.TransformerBlock` s and read out by a LayerNorm, a flatten and a
  ``Linear(N * width, horizon)`` (zero init: an untrained model forecasts the window's mean). ``standard`` uses
  ``standard_attention(..., causal=False, qk_norm=True)``; ``mlr`` uses ``mlr_attention(..., causal=False,
  qk_norm=True)`` with levels over the patch sequence: global, blocks of ``N // 2``, ``N // 4``, ... patches (one
  level per entry of the preset's ``mlr_ranks``, which sum to the head dimension; a block size that does not divide
  ``N`` ends in a partial block). Every attention output projection starts at zero (:func:`zero_attention_outputs`).
  µP (:func:`structmat.mup_param_groups` through :func:`fit`): the blocks' matrices and the head get
  ``lr * base_width / fan_in``; the patch embedding (a plain parameter, an input weight), positions, biases and
  LayerNorms get ``lr``; the default torch init otherwise (positions N(0, 0.02^2), patch embedding N(0, 1/patch_len)).
- ``dlinear``: DLinear-style (Zeng et al., 2023): a moving average (kernel 25, the series' ends replicated) is the
  trend, the remainder the seasonal part, one ``Linear(input_len, horizon)`` on each, summed; no per-window
  normalization (the series is already standardized). Trained with the same loop.
- ``naive``: the last input value repeated ``horizon`` times; no training (one evaluation point at step 0, zero
  parameters, zero FLOPs).

Compute: a *token* is one patch of the input, ``tokens_per_example = n_patches`` for every variant (the same
patching of the same window), so ``train_flops = 3 x flops_per_token x tokens`` is ``3 x`` the forward FLOPs per window
times the windows seen. The transformer's ``flops_per_token`` follows the framework's convention (its blocks only:
:func:`transformer_cost` over ``n_patches`` tokens; the patch embedding and the head are excluded). DLinear has no
blocks: its ``flops_per_token`` is its two ``input_len x horizon`` matmuls per window (the whole model; the moving
average's additions are not counted) divided by ``n_patches``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from structmat.checks import check_int

from ..model import TransformerBlock
from ..variants import mlr_attention, standard_attention
from ._runner import RunSpec
from ._train import TrainConfig, count_params, fit, transformer_cost, zero_attention_outputs

__all__ = [
    "NAME",
    "TITLE",
    "SELECT_BY",
    "METRIC",
    "METRIC_LABEL",
    "VARIANTS",
    "SPLIT_ROWS",
    "TimeSeriesPreset",
    "PRESETS",
    "ETTData",
    "read_ett_ot",
    "load_ett",
    "split_windows",
    "moving_average",
    "DLinear",
    "PatchTransformer",
    "NaiveLast",
    "n_patches",
    "build_model",
    "evaluate_windows",
    "add_arguments",
    "plan",
    "run_one",
]

NAME = "timeseries"
TITLE = "ETT oil temperature (OT) forecasting"
#: The reported point of each seed: the one with the lowest validation MSE (early stopping).
SELECT_BY = "val_mse"
METRIC = "test_mse"
METRIC_LABEL = "test MSE (standardized OT)"
#: The variants, in the order they are planned.
VARIANTS = ("standard", "mlr", "dlinear", "naive")
#: Rows of the standard ETT-hourly split (Informer): 12 months train, 4 validation, 4 test, 30-day months.
SPLIT_ROWS = {"train": 12 * 30 * 24, "val": 4 * 30 * 24, "test": 4 * 30 * 24}
_WINDOW_EPS = 1e-5


# -- presets -----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TimeSeriesPreset:
    """One preset's settings (every run of the preset shares them but the input length, variant and seed).

    Args:
        input_lengths: the input lengths ``L`` compared (one set of runs each).
        horizon: values forecast (overridden by ``--horizon``).
        variants: the variants run by default.
        seeds: seeds per trained variant (``naive`` is deterministic and runs once).
        patch_len: values per patch ``P``.
        patch_stride: values between patch starts ``S``.
        width: the transformer's ``d_model``.
        depth: transformer blocks.
        heads: attention heads (``d_head = width // heads``).
        mlp_ratio: the blocks' MLP hidden width over ``width``.
        mlr_ranks: MLR attention's rank per level (global, ``N // 2``, ``N // 4``, ...), summing to ``d_head``.
        steps: optimizer steps of every trained run.
        batch_size: training windows per step.
        lr: AdamW learning rate at ``base_width`` (µP per-tensor rates, see :func:`fit`).
        base_width: the width at which ``lr`` holds unscaled.
        dlinear_lr: DLinear's learning rate (its linear maps get exactly this rate).
        warmup: linear warmup steps.
        eval_every: steps between evaluation points.
        eval_windows: validation/test windows evaluated (evenly spaced; None: every window, stride 1).
        eval_batch: windows per evaluation batch.
    """

    input_lengths: tuple[int, ...]
    horizon: int = 96
    variants: tuple[str, ...] = VARIANTS
    seeds: int = 2
    patch_len: int = 16
    patch_stride: int = 8
    width: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: int = 2
    mlr_ranks: tuple[int, ...] = (8, 4, 4)
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    base_width: int = 64
    dlinear_lr: float = 5e-3
    warmup: int = 20
    eval_every: int = 100
    eval_windows: int | None = None
    eval_batch: int = 512

    def as_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TimeSeriesPreset:
        """The preset back from :meth:`as_dict` (extra keys ignored)."""
        names = {f.name for f in fields(cls)}
        kept = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in names}
        return cls(**kept)


#: smoke: seconds, for the tests. quick: a 2-core CPU in a few minutes (2 runs at once, 1 thread each).
#: paper: PatchTST-sized (width 128, 3 blocks, 16 heads, patches 16 / stride 8; the paper's own time-series
#: configuration is not in its public facts we used), all four input lengths, three seeds, for a GPU.
PRESETS: dict[str, TimeSeriesPreset] = {
    "smoke": TimeSeriesPreset(
        input_lengths=(32, 48),
        seeds=1,
        patch_len=8,
        patch_stride=4,
        width=16,
        depth=1,
        heads=2,
        mlp_ratio=2,
        mlr_ranks=(4, 2, 2),
        steps=6,
        batch_size=8,
        warmup=2,
        eval_every=3,
        eval_windows=64,
        eval_batch=64,
    ),
    "quick": TimeSeriesPreset(input_lengths=(96, 192, 336, 720), seeds=3, steps=1000, eval_every=250),
    "paper": TimeSeriesPreset(
        input_lengths=(96, 192, 336, 720),
        seeds=3,
        width=128,
        depth=3,
        heads=16,
        mlp_ratio=2,
        mlr_ranks=(4, 2, 2),
        steps=10000,
        batch_size=128,
        lr=1e-3,
        base_width=128,
        dlinear_lr=5e-3,
        warmup=500,
        eval_every=1000,
    ),
}


# -- data --------------------------------------------------------------------------------------------------------------
def read_ett_ot(path: str | Path) -> tuple[list[str], list[float]]:
    """The ``date`` and ``OT`` columns of an ETT CSV, as read (no standardization).

    Raises:
        ValueError: the file is missing or empty, has no ``date`` or ``OT`` column, or a row's OT is missing, not a
            number or not finite (the message names the file and the line).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "tiny.csv"
        >>> _ = p.write_text("date,HUFL,OT\\n2016-07-01 00:00:00,5.8,30.5\\n2016-07-01 01:00:00,5.6,27.8\\n")
        >>> read_ett_ot(p)
        (['2016-07-01 00:00:00', '2016-07-01 01:00:00'], [30.5, 27.8])
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"timeseries: the ETT file {path} does not exist (pass --data PATH/TO/ETTh1.csv)")
    dates: list[str] = []
    values: list[float] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"timeseries: the ETT file {path} is empty (expected a header with 'date' and 'OT')")
        header = [h.strip() for h in header]
        for column in ("date", "OT"):
            if column not in header:
                raise ValueError(f"timeseries: {path} has no {column!r} column (columns: {', '.join(header)})")
        i_date, i_ot = header.index("date"), header.index("OT")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) <= max(i_date, i_ot):
                raise ValueError(f"timeseries: {path} line {line} has {len(row)} fields, the header {len(header)}")
            text = row[i_ot].strip()
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"timeseries: {path} line {line}: OT value {text!r} is not a number") from None
            if not math.isfinite(value):
                raise ValueError(f"timeseries: {path} line {line}: OT value {text!r} is NaN or infinite")
            dates.append(row[i_date].strip())
            values.append(value)
    return dates, values


@dataclass(frozen=True)
class ETTData:
    """The standardized OT series and the standard split's row ranges.

    Args:
        path: the CSV.
        input_len: window input length ``L``.
        horizon: window target length ``H``.
        series: the whole OT column standardized with the training rows' statistics, float32, shape ``(rows,)``.
        mean: the training rows' mean (raw scale).
        std: the training rows' population standard deviation (raw scale).
        splits: per split, the ``(start, end)`` rows its windows are cut from: train ``(0, 8640)``, val
            ``(8640 - L, 11520)``, test ``(11520 - L, 14400)`` (the usual look-back into the previous split).
    """

    path: str
    input_len: int
    horizon: int
    series: torch.Tensor
    mean: float
    std: float
    splits: dict[str, tuple[int, int]]

    def n_windows(self, split: str) -> int:
        """Windows (stride 1) of a split: its rows minus ``L + H`` plus one."""
        start, end = self.splits[split]
        return end - start - self.input_len - self.horizon + 1

    def segment(self, split: str) -> torch.Tensor:
        """The standardized rows of a split (with its look-back)."""
        start, end = self.splits[split]
        return self.series[start:end]


def load_ett(path: str | Path, input_len: int, horizon: int) -> ETTData:
    """Read an ETT CSV's OT column and cut the standard split, standardized with the training rows.

    Raises:
        ValueError: a :func:`read_ett_ot` error, or the file is shorter than the split's 14400 rows, or
            ``input_len + horizon`` does not fit in the training rows / ``horizon`` in the validation rows.
        TypeError: ``input_len`` or ``horizon`` is not an int.
    """
    where = f"timeseries: {path}"
    input_len = check_int(where, "input_len", input_len)
    horizon = check_int(where, "horizon", horizon)
    _, values = read_ett_ot(path)
    n_train, n_val, n_test = SPLIT_ROWS["train"], SPLIT_ROWS["val"], SPLIT_ROWS["test"]
    needed = n_train + n_val + n_test
    if len(values) < needed:
        raise ValueError(
            f"{where} is too short: {len(values)} rows, the standard split needs {needed} "
            f"({n_train} train + {n_val} validation + {n_test} test)"
        )
    if input_len + horizon > n_train or horizon > min(n_val, n_test):
        raise ValueError(
            f"{where} is too short for input_len={input_len} + horizon={horizon}: the training split has {n_train} "
            f"rows and the validation/test splits {n_val} (input_len + horizon <= {n_train}, horizon <= {n_val})"
        )
    raw = torch.tensor(values, dtype=torch.float64)
    train = raw[:n_train]
    mean = float(train.mean())
    std = float(train.std(unbiased=False))
    if not std > 0:
        raise ValueError(f"{where}: the training rows' OT values are constant (std 0); cannot standardize")
    splits = {
        "train": (0, n_train),
        "val": (n_train - input_len, n_train + n_val),
        "test": (n_train + n_val - input_len, needed),
    }
    series = ((raw - mean) / std).to(torch.float32)
    return ETTData(str(path), input_len, horizon, series, mean, std, splits)


@functools.lru_cache(maxsize=8)
def _cached_ett(path: str, input_len: int, horizon: int) -> ETTData:
    return load_ett(path, input_len, horizon)


def split_windows(data: ETTData, split: str, starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(n, L)`` and targets ``(n, H)`` of a split's windows starting at ``starts`` (offsets into the split's
    rows; default every window, stride 1). Window ``k`` is rows ``k .. k+L-1`` then ``k+L .. k+L+H-1``.

    Example:
        >>> series = torch.arange(20.0)
        >>> data = ETTData("x", 3, 2, series, 0.0, 1.0, {"train": (0, 10), "val": (7, 15), "test": (12, 20)})
        >>> x, y = split_windows(data, "val", torch.tensor([0, 3]))
        >>> x.tolist(), y.tolist()
        ([[7.0, 8.0, 9.0], [10.0, 11.0, 12.0]], [[10.0, 11.0], [13.0, 14.0]])
    """
    if split not in data.splits:
        raise ValueError(f"split_windows: split must be one of {', '.join(data.splits)}, got {split!r}")
    segment = data.segment(split)
    count = data.n_windows(split)
    if starts is None:
        starts = torch.arange(count)
    span = data.input_len + data.horizon
    rows = segment[starts.reshape(-1, 1) + torch.arange(span)]
    return rows[:, : data.input_len], rows[:, data.input_len :]


def _eval_starts(count: int, limit: int | None) -> torch.Tensor:
    """Every start, or ``limit`` evenly spaced ones (first and last included)."""
    if limit is None or limit >= count:
        return torch.arange(count)
    return torch.linspace(0, count - 1, limit).round().long()


# -- models ------------------------------------------------------------------------------------------------------------
def moving_average(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """DLinear's trend: the mean over ``kernel`` values centred on each position of the last dim, the series' first and
    last values repeated ``(kernel - 1) // 2`` times at its ends (odd ``kernel`` keeps the length).

    Example:
        >>> moving_average(torch.tensor([[0.0, 3.0, 6.0]]), 3).tolist()
        [[1.0, 3.0, 5.0]]
    """
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"moving_average: kernel must be an odd int >= 1, got {kernel!r}")
    pad = (kernel - 1) // 2
    front = x[..., :1].expand(*x.shape[:-1], pad)
    back = x[..., -1:].expand(*x.shape[:-1], pad)
    padded = torch.cat([front, x, back], dim=-1)
    return padded.unfold(-1, kernel, 1).mean(dim=-1)


class DLinear(torch.nn.Module):
    """DLinear-style forecaster: ``Linear_t(trend) + Linear_s(x - trend)`` with the trend a moving average.

    Args:
        input_len: input values ``L``.
        horizon: forecast values ``H``.
        kernel: the moving average's kernel (odd).

    Example:
        >>> DLinear(24, 6)(torch.randn(3, 24)).shape
        torch.Size([3, 6])
    """

    def __init__(self, input_len: int, horizon: int, kernel: int = 25) -> None:
        super().__init__()
        self.input_len = check_int("DLinear", "input_len", input_len)
        self.horizon = check_int("DLinear", "horizon", horizon)
        moving_average(torch.zeros(1, 1), kernel)  # validate the kernel
        self.kernel = kernel
        self.trend = torch.nn.Linear(input_len, horizon)
        self.seasonal = torch.nn.Linear(input_len, horizon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L) -> (B, H)``."""
        trend = moving_average(x, self.kernel)
        return self.trend(trend) + self.seasonal(x - trend)

    def macs_per_window(self) -> int:
        """Multiply-adds of the two linear maps per window."""
        return 2 * self.input_len * self.horizon


class NaiveLast(torch.nn.Module):
    """The last input value repeated ``horizon`` times (no parameters).

    Example:
        >>> NaiveLast(2)(torch.tensor([[1.0, 5.0]])).tolist()
        [[5.0, 5.0]]
    """

    def __init__(self, horizon: int) -> None:
        super().__init__()
        self.horizon = check_int("NaiveLast", "horizon", horizon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L) -> (B, H)``."""
        return x[:, -1:].expand(x.shape[0], self.horizon)


def n_patches(input_len: int, patch_len: int, stride: int) -> int:
    """Patches of ``patch_len`` every ``stride`` values that fit in ``input_len`` (aligned to its end).

    Example:
        >>> n_patches(96, 16, 8), n_patches(336, 16, 8), n_patches(100, 16, 8)
        (11, 41, 11)
    """
    where = f"n_patches(input_len={input_len}, patch_len={patch_len}, stride={stride})"
    for what, v in (("input_len", input_len), ("patch_len", patch_len), ("stride", stride)):
        check_int(where, what, v)
    if patch_len > input_len:
        raise ValueError(f"{where}: patch_len must be <= input_len")
    return (input_len - patch_len) // stride + 1


class PatchTransformer(torch.nn.Module):
    """A non-causal transformer over patches of a per-window normalized input (PatchTST-like, univariate).

    Args:
        input_len: input values ``L``.
        horizon: forecast values ``H``.
        patch_len: values per patch.
        stride: values between patch starts.
        width: ``d_model``.
        depth: blocks.
        heads: attention heads.
        attention: 'standard' or 'mlr'.
        mlr_ranks: MLR ranks per level over the patches (global, ``N // 2``, ``N // 4``, ...); only for 'mlr'.
        mlp_ratio: MLP hidden width over ``width``.

    Example:
        >>> m = PatchTransformer(32, 8, patch_len=8, stride=4, width=8, depth=1, heads=2, attention="mlr",
        ...                      mlr_ranks=(2, 1, 1))
        >>> m.n_patches, m(torch.randn(3, 32)).shape
        (7, torch.Size([3, 8]))
    """

    def __init__(
        self,
        input_len: int,
        horizon: int,
        *,
        patch_len: int,
        stride: int,
        width: int,
        depth: int,
        heads: int,
        attention: str = "standard",
        mlr_ranks: Sequence[int] = (),
        mlp_ratio: int = 2,
    ) -> None:
        super().__init__()
        where = f"PatchTransformer(input_len={input_len}, attention={attention!r})"
        self.input_len = input_len
        self.horizon = check_int(where, "horizon", horizon)
        self.patch_len, self.stride = patch_len, stride
        self.n_patches = n = n_patches(input_len, patch_len, stride)
        self.span = patch_len + stride * (n - 1)
        width = check_int(where, "width", width)
        depth = check_int(where, "depth", depth)
        # The patch embedding is a plain parameter (not an nn.Linear): µP treats it as an input weight, lr unscaled.
        self.patch_weight = torch.nn.Parameter(torch.randn(patch_len, width) / math.sqrt(patch_len))
        self.patch_bias = torch.nn.Parameter(torch.zeros(width))
        self.positions = torch.nn.Parameter(0.02 * torch.randn(n, width))
        if attention == "standard":

            def make() -> torch.nn.Module:
                return standard_attention(width, heads, causal=False, qk_norm=True)
        elif attention == "mlr":
            ranks = list(mlr_ranks)
            if not ranks:
                raise ValueError(f"{where}: give mlr_ranks (one rank per level) for MLR attention")

            def make() -> torch.nn.Module:
                return mlr_attention(width, heads, ranks, max_seq_len=n, causal=False, qk_norm=True)
        else:
            raise ValueError(f"{where}: attention must be 'standard' or 'mlr', got {attention!r}")
        self.blocks = torch.nn.ModuleList(TransformerBlock(width, make(), mlp_ratio) for _ in range(depth))
        self.ln_out = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(n * width, horizon)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()
        zero_attention_outputs(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L) -> (B, H)``: keep the values the patches cover, normalize, patch, embed, blocks, head,
        de-normalize."""
        x = x[:, -self.span :]
        mean = x.mean(dim=-1, keepdim=True)
        scale = torch.sqrt(x.var(dim=-1, keepdim=True, unbiased=False) + _WINDOW_EPS)
        z = (x - mean) / scale
        patches = z.unfold(-1, self.patch_len, self.stride)  # (B, N, P)
        h = patches @ self.patch_weight + self.patch_bias + self.positions
        for block in self.blocks:
            h = block(h)
        out = self.head(self.ln_out(h).flatten(1))
        return out * scale + mean


def build_model(variant: str, preset: TimeSeriesPreset, input_len: int, horizon: int) -> torch.nn.Module:
    """The model of one variant (parameters drawn from torch's current RNG state)."""
    if variant in ("standard", "mlr"):
        return PatchTransformer(
            input_len,
            horizon,
            patch_len=preset.patch_len,
            stride=preset.patch_stride,
            width=preset.width,
            depth=preset.depth,
            heads=preset.heads,
            attention=variant,
            mlr_ranks=preset.mlr_ranks,
            mlp_ratio=preset.mlp_ratio,
        )
    if variant == "dlinear":
        return DLinear(input_len, horizon)
    if variant == "naive":
        return NaiveLast(horizon)
    raise ValueError(f"timeseries: unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


# -- evaluation and training -------------------------------------------------------------------------------------------
def evaluate_windows(
    model: torch.nn.Module, data: ETTData, *, limit: int | None = None, batch: int = 512, device: Any = "cpu"
) -> dict[str, float]:
    """``test_mse``, ``test_mae`` and ``val_mse`` (standardized scale) over the split's windows (all, or ``limit``
    evenly spaced), averaged over windows and horizon steps."""
    out: dict[str, float] = {}
    for split in ("val", "test"):
        starts = _eval_starts(data.n_windows(split), limit)
        sq = ab = 0.0
        for chunk in starts.split(batch):
            x, y = split_windows(data, split, chunk)
            pred = model(x.to(device)).to(y.device, torch.float64)
            err = pred - y.to(torch.float64)
            sq += float((err**2).sum())
            ab += float(err.abs().sum())
        n = starts.numel() * data.horizon
        out[f"{split}_mse"] = sq / n
        if split == "test":
            out["test_mae"] = ab / n
    return {"test_mse": out["test_mse"], "test_mae": out["test_mae"], "val_mse": out["val_mse"]}


def _sampler(data: ETTData, batch_size: int, seed: int) -> Any:
    count = data.n_windows("train")

    def sample(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, count, (batch_size,), generator=gen)
        return split_windows(data, "train", starts)

    return sample


def _mse(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def _train_config(variant: str, preset: TimeSeriesPreset, input_len: int) -> TrainConfig:
    lr, base = preset.lr, preset.base_width
    if variant == "dlinear":  # fan-in of both linear maps is input_len: each gets exactly dlinear_lr
        lr, base = preset.dlinear_lr, input_len
    return TrainConfig(
        steps=preset.steps,
        batch_size=preset.batch_size,
        lr=lr,
        base_width=base,
        eval_every=preset.eval_every,
        warmup=preset.warmup,
    )


def run_one(spec: RunSpec, progress: bool = True, position: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train (or, for ``naive``, just evaluate) one run; returns its static fields and evaluation records."""
    preset = TimeSeriesPreset.from_dict(spec.config)
    input_len, horizon = int(spec.config["input_len"]), int(spec.config["horizon"])
    data = _cached_ett(str(spec.config["data"]), input_len, horizon)
    device = torch.device(spec.device)
    torch.manual_seed(spec.seed)
    model = build_model(spec.variant, preset, input_len, horizon)
    n = n_patches(input_len, preset.patch_len, preset.patch_stride)
    limit = preset.eval_windows
    static: dict[str, Any] = {
        "width": preset.width if isinstance(model, PatchTransformer) else None,
        "input_len": input_len,
        "horizon": horizon,
        "n_patches": n,
        "params": count_params(model),
        "n_test_windows": min(data.n_windows("test"), limit or data.n_windows("test")),
    }
    if isinstance(model, PatchTransformer):
        static["flops_per_token"], static["macs_per_token"] = transformer_cost(model.blocks, n)
    elif isinstance(model, DLinear):
        static["macs_per_token"] = model.macs_per_window() // n
        static["flops_per_token"] = 2 * static["macs_per_token"]
    else:
        static["flops_per_token"] = static["macs_per_token"] = 0

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        return evaluate_windows(m, data, limit=limit, batch=preset.eval_batch, device=device)

    if isinstance(model, NaiveLast):
        start = time.perf_counter()
        with torch.no_grad():
            metrics = evaluate(model.to(device))
        record = {"step": 0, "train_loss": None, "tokens": 0, "wall_time": time.perf_counter() - start, "lr": 0.0}
        return static, [{**record, **metrics}]
    records = fit(
        model,
        _train_config(spec.variant, preset, input_len),
        _sampler(data, preset.batch_size, spec.seed),
        _mse,
        evaluate,
        tokens_per_example=n,
        device=device,
        desc=f"{spec.variant} L={input_len} s{spec.seed}",
        progress=progress,
        position=position,
    )
    return static, records


# -- command line ------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data`` (required), ``--horizon``, ``--input-lengths``."""
    parser.add_argument("--data", type=Path, required=True, help="an ETT CSV with 'date' and 'OT' columns (ETTh1.csv)")
    parser.add_argument("--horizon", type=int, default=96, help="values forecast (default 96)")
    parser.add_argument(
        "--input-lengths", type=int, nargs="+", default=None, help="input lengths (default: the preset's)"
    )


def _expected_cost(spec: RunSpec) -> float:
    """A rough relative cost, to start the slowest runs first."""
    if spec.variant == "naive":
        return 0.0
    weight = 1.0 if spec.variant == "dlinear" else 20.0
    return weight * spec.config["input_len"]


def plan(args: argparse.Namespace) -> list[RunSpec]:
    """One run per input length, variant and seed (``naive`` once per input length), slowest first."""
    preset = PRESETS[args.preset]
    lengths = tuple(args.input_lengths) if args.input_lengths else preset.input_lengths
    variants = tuple(args.variants) if args.variants else preset.variants
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"timeseries: unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    for length in lengths:
        if length < preset.patch_len:
            raise ValueError(
                f"timeseries: input length {length} is shorter than the preset's patch_len={preset.patch_len}"
            )
        levels = len(preset.mlr_ranks)
        if "mlr" in variants and n_patches(length, preset.patch_len, preset.patch_stride) < 2 ** (levels - 1):
            raise ValueError(
                f"timeseries: input length {length} gives {n_patches(length, preset.patch_len, preset.patch_stride)} "
                f"patches, too few for {levels} MLR levels (needs >= {2 ** (levels - 1)})"
            )
        load_ett(args.data, length, args.horizon)  # fail early on a bad file or lengths
    seeds = args.seeds or preset.seeds
    base = {**preset.as_dict(), "data": str(args.data), "horizon": args.horizon}
    specs = []
    for length in lengths:
        for variant in variants:
            for k in range(1 if variant == "naive" else seeds):
                config = {**base, "input_len": length}
                specs.append(RunSpec(NAME, variant, args.seed + k, args.preset, args.device, config))
    specs.sort(key=_expected_cost, reverse=True)
    return specs
