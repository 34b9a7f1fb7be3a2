"""Run an experiment's planned runs (in parallel processes on CPU, or under torchrun), then write and draw results.

An experiment module (``icl``, ``lm``, ``timeseries``) provides:

- ``NAME``, ``TITLE`` (the plots' title), ``LOG_METRIC`` (optional: a log metric axis, default True),
  ``SELECT_BY`` (optional: report each seed's point with the lowest value of this field instead of its last) and
  ``METRIC`` (the key of its ``evaluate`` dict that is the headline metric, lower is better),
  ``METRIC_LABEL`` (the plots' axis label) and ``PRESETS`` (name -> preset);
- ``add_arguments(parser)``: its own command-line options;
- ``plan(args) -> list[RunSpec]``: one spec per (variant, seed, ...) from the parsed arguments;
- ``run_one(spec, progress, position) -> (static, records)``: train one run; ``static`` holds the fields every record
  of the run shares (``width``, ``params``, ``flops_per_token``, ``macs_per_token``, grouping fields such as
  ``input_len``) and ``records`` are :func:`~structmat_attention.experiments._train.fit`'s.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import _report
from ._train import FLOPS_CONVENTION, distributed, rank, world_size

__all__ = ["RunSpec", "EXPERIMENTS", "experiment_module", "with_budget", "execute", "run_experiment", "report"]

#: The experiments, by command name.
EXPERIMENTS = {
    "icl": "structmat_attention.experiments.icl",
    "lm": "structmat_attention.experiments.lm",
    "timeseries": "structmat_attention.experiments.timeseries",
}


@dataclass(frozen=True)
class RunSpec:
    """One training run: an experiment's variant at one seed, with everything needed to rebuild it (JSON-ready).

    Args:
        experiment: the experiment's name (a key of :data:`EXPERIMENTS`).
        variant: the variant's name.
        seed: the run's seed (model init and data).
        preset: the preset it came from.
        device: 'cpu', 'cuda' or 'cuda:N'.
        config: the experiment's settings for this run (width, steps, learning rate, ...).
    """

    experiment: str
    variant: str
    seed: int
    preset: str
    device: str = "cpu"
    config: dict[str, Any] = field(default_factory=dict)


def experiment_module(name: str) -> Any:
    """The module of experiment ``name``."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name])


def with_budget(specs: Sequence[RunSpec], steps: int | None = None, eval_every: int | None = None) -> list[RunSpec]:
    """The runs with another step budget and evaluation interval (every experiment's config has ``steps``,
    ``eval_every`` and ``warmup``); warmup and the interval are capped at the steps.

    Example:
        >>> spec = RunSpec("icl", "btt-h2", 0, "quick", config=dict(steps=2000, eval_every=200, warmup=100))
        >>> with_budget([spec], steps=50)[0].config
        {'steps': 50, 'eval_every': 50, 'warmup': 50}
    """
    out = []
    for spec in specs:
        c = dict(spec.config)
        if steps is not None:
            c["steps"] = steps
        if eval_every is not None:
            c["eval_every"] = eval_every
        if "steps" in c:
            for key in ("eval_every", "warmup"):
                if key in c:
                    c[key] = min(c[key], c["steps"])
        out.append(replace(spec, config=c))
    return out


def execute(spec: RunSpec, progress: bool = True, position: int = 0) -> list[dict[str, Any]]:
    """Train one run and return its finished records (common fields added)."""
    module = experiment_module(spec.experiment)
    static, records = module.run_one(spec, progress=progress, position=position)
    out = []
    for r in records:
        value = r.get(module.METRIC)
        out.append(
            {
                "experiment": spec.experiment,
                "variant": spec.variant,
                "seed": spec.seed,
                "preset": spec.preset,
                "metric": module.METRIC,
                "value": value,
                "flops_convention": FLOPS_CONVENTION,
                **static,
                **r,
                "train_flops": 3.0 * static["flops_per_token"] * r["tokens"],
            }
        )
    return out


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _worker(spec: RunSpec, progress: bool, slots: Any) -> list[dict[str, Any]]:
    slot = slots.get()
    try:
        return execute(spec, progress=progress, position=slot)
    finally:
        slots.put(slot)


def _sort_key(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["variant"], r.get("width") or 0, r.get("input_len") or 0, r["seed"], r["step"])


def _environment(jobs: int, threads: int, device: str) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "jobs": jobs,
        "threads_per_job": threads,
        "device": device,
        "world_size": world_size(),
    }


def run_experiment(
    name: str,
    specs: Sequence[RunSpec],
    out: Path,
    *,
    jobs: int = 1,
    threads: int | None = None,
    progress: bool = True,
    plots: bool = True,
    settings: dict[str, Any] | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Train every run of ``specs`` and write ``out/results.jsonl``, ``out/summary.json`` and the plots.

    Args:
        name: the experiment.
        specs: the runs (from the module's ``plan``).
        out: the output directory (created; an existing ``results.jsonl`` is replaced).
        jobs: runs trained at once, in separate processes (CPU only; 1 under torchrun or on CUDA).
        threads: torch threads per process (default: the CPU count divided by ``jobs``).
        progress: tqdm bars.
        plots: draw the plots (needs matplotlib).
        settings: the preset and options, stored in the summary.
        log: where the table and messages go (rank 0 only).

    Returns:
        The summary (also written to ``summary.json``).
    """
    module = experiment_module(name)
    out = Path(out)
    lead = rank() == 0
    cpus = os.cpu_count() or 1
    if distributed() or any(s.device.startswith("cuda") for s in specs):
        jobs = 1
    jobs = max(1, min(jobs, len(specs)))
    # under torchrun the processes of one machine share its cores
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if distributed() else 1
    threads = threads or max(1, cpus // (jobs * local))
    if lead:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.jsonl").write_text("")
        log(f"{name}: {len(specs)} runs -> {out} ({jobs} at once, {threads} threads each, world size {world_size()})")
    start = time.perf_counter()
    records: list[dict[str, Any]] = []
    if jobs == 1:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for spec in specs:
                got = execute(spec, progress=progress and lead)
                records += got
                if lead:
                    _report.write_records(out / "results.jsonl", got, mode="a")
        finally:
            torch.set_num_threads(before)
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with ctx.Manager() as manager:
            slots = manager.Queue()
            for k in range(jobs):
                slots.put(k)
            with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads,)) as pool:
                futures = [pool.submit(_worker, s, progress, slots) for s in specs]
                for f in as_completed(futures):
                    got = f.result()
                    records += got
                    _report.write_records(out / "results.jsonl", got, mode="a")
    wall = time.perf_counter() - start
    summary: dict[str, Any] = {}
    if lead:
        records.sort(key=_sort_key)
        _report.write_records(out / "results.jsonl", records)
        select_by = getattr(module, "SELECT_BY", None)
        rows = _report.final_results(records, select_by)
        summary = {
            "experiment": name,
            "metric": module.METRIC,
            "command": " ".join(sys.argv),
            "settings": settings or {},
            "runs": [asdict(s) for s in specs],
            "environment": _environment(jobs, threads, specs[0].device if specs else "cpu"),
            "wall_time": wall,
            "flops_convention": FLOPS_CONVENTION,
            "final": rows,
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        log("\n" + _report.format_table(rows))
        if select_by:
            log(f"(each seed's point with the lowest {select_by}: early stopping on validation)")
        if plots:
            title = getattr(module, "TITLE", name)
            logy = getattr(module, "LOG_METRIC", True)
            paths = _report.draw_plots(
                records, out, title=title, ylabel=module.METRIC_LABEL, logy=logy, select_by=select_by
            )
            log("plots: " + ", ".join(str(p) for p in paths))
        log(f"wall time {wall:.1f} s; results in {out / 'results.jsonl'}, summary in {out / 'summary.json'}")
    return summary


def report(directory: Path, *, plots: bool = True, log: Any = print) -> list[dict[str, Any]]:
    """Re-read a finished run's ``results.jsonl``, print its table and redraw its plots; returns the final rows."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"report: {directory} is not a directory")
    records = _report.read_records(directory / "results.jsonl")
    name = records[0].get("experiment", "experiment")
    label, title, logy, select_by = None, name, True, None
    if name in EXPERIMENTS:
        module = experiment_module(name)
        label, title = module.METRIC_LABEL, getattr(module, "TITLE", name)
        logy, select_by = getattr(module, "LOG_METRIC", True), getattr(module, "SELECT_BY", None)
    rows = _report.final_results(records, select_by)
    log(_report.format_table(rows))
    if select_by:
        log(f"(each seed's point with the lowest {select_by}: early stopping on validation)")
    if plots:
        paths = _report.draw_plots(records, directory, title=title, ylabel=label, logy=logy, select_by=select_by)
        log("plots: " + ", ".join(str(p) for p in paths))
    return rows
