"""The paper's experiments (Kuang et al., ICML 2025), runnable from one command: ``structmat-attention``.

- :mod:`~structmat_attention.experiments.icl`: in-context linear regression (standard vs Bilinear BTT / MLR).
- :mod:`~structmat_attention.experiments.lm`: character-level language modelling (standard vs MLR, sliding window,
  GSWA).
- :mod:`~structmat_attention.experiments.timeseries`: ETT oil-temperature forecasting (standard vs MLR attention over
  patches, with a naive and a DLinear-style baseline).

Every variant is built by the attention constructors of :mod:`structmat_attention`; this package only adds data,
the shared training loop (:func:`fit`, µP learning rates from :func:`structmat.mup_param_groups`, DDP) and the
reporting (JSON lines, summary, table, plots). See docs/experiments.md.
"""

from ._report import final_results, format_table, read_records
from ._runner import EXPERIMENTS, RunSpec, execute, report, run_experiment
from ._train import TrainConfig, fit, shard, transformer_cost, zero_attention_outputs

__all__ = [
    "EXPERIMENTS",
    "RunSpec",
    "TrainConfig",
    "fit",
    "shard",
    "execute",
    "run_experiment",
    "report",
    "read_records",
    "final_results",
    "format_table",
    "transformer_cost",
    "zero_attention_outputs",
]
