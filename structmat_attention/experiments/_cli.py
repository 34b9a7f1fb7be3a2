"""``structmat-attention`` (also ``python -m structmat_attention``): run an experiment, or redraw a finished one."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ._runner import EXPERIMENTS, experiment_module, report, run_experiment, with_budget

__all__ = ["main", "build_parser"]

_HELP = {
    "icl": "in-context linear regression: standard vs Bilinear BTT / Bilinear MLR attention",
    "lm": "character-level language modelling: standard vs MLR, sliding-window and GSWA attention",
    "timeseries": "ETT oil-temperature forecasting: standard vs MLR attention over patches, with baselines",
}


def _common(p: argparse.ArgumentParser, module: object) -> None:
    presets = list(module.PRESETS)  # type: ignore[attr-defined]
    p.add_argument("--preset", choices=presets, default="quick", help="the run's size (default quick)")
    p.add_argument("--variants", nargs="+", default=None, help="variants to run (default: the preset's)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default runs/<experiment>-<preset>)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per variant (default: the preset's)")
    p.add_argument("--steps", type=int, default=None, help="training steps of every run (default: the preset's)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: the preset's)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cuda when available)")
    p.add_argument("--jobs", type=int, default=None, help="runs trained at once on CPU (default: one per core)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plots", action="store_true", help="no plots (no matplotlib needed)")


def build_parser() -> argparse.ArgumentParser:
    """The command line: one sub-command per experiment, plus ``report``."""
    parser = argparse.ArgumentParser(
        prog="structmat-attention",
        description="Train the structured-attention paper's experiments (Kuang et al., ICML 2025) and report them.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in EXPERIMENTS:
        module = experiment_module(name)
        p = sub.add_parser(name, help=_HELP[name], description=module.__doc__.split("\n\n")[0])
        _common(p, module)
        module.add_arguments(p)
    p = sub.add_parser("report", help="re-draw the plots and the table of a finished run from its JSON")
    p.add_argument("directory", type=Path)
    p.add_argument("--no-plots", action="store_true")
    return parser


def _start_distributed(device: str) -> str:
    """Join the torchrun process group when ``WORLD_SIZE > 1``; returns the device this process uses."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    cuda = device.startswith("cuda")
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "report":
        try:
            report(args.directory, plots=not args.no_plots)
        except ValueError as e:
            print(f"structmat-attention report: {e}", file=sys.stderr)
            return 2
        return 0
    module = experiment_module(args.command)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"structmat-attention {args.command}: --device {args.device} but CUDA is not available", file=sys.stderr)
        return 2
    for flag in ("seeds", "jobs", "threads", "steps", "eval_every"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            name = flag.replace("_", "-")
            print(f"structmat-attention {args.command}: --{name} must be >= 1, got {value}", file=sys.stderr)
            return 2
    args.device = _start_distributed(args.device)
    try:
        specs = with_budget(module.plan(args), args.steps, args.eval_every)
    except ValueError as e:
        print(f"structmat-attention {args.command}: {e}", file=sys.stderr)
        return 2
    out = args.out or Path("runs") / f"{args.command}-{args.preset}"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    try:
        run_experiment(
            args.command,
            specs,
            out,
            jobs=args.jobs or (os.cpu_count() or 1),
            threads=args.threads,
            progress=not args.no_progress,
            plots=not args.no_plots,
            settings=settings,
        )
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
