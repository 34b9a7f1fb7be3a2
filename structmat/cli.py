"""The ``structmat`` command line: ``structmat info "EXPR" [--batch B] [--json]`` and ``structmat bench ...``.

``info`` builds the operator an expression describes on torch's ``meta`` device (no parameter memory is allocated,
so a ``1000000 x 1000000`` operator is as quick to describe as a small one) and prints what the structure alone
says: the operator tree, the rank bound, the parameter count, FLOPs and MACs for a batch, opt_einsum's contraction
path for every einsum, and the speedup over a dense matrix of the same shape.

``bench`` builds the operator for real and times it against the same map as a dense matrix on this machine
(:func:`structmat.bench`); ``bench --suite`` runs the project's benchmark suite (``python -m benchmarks``, from a
source checkout).

Example:
    >>> from structmat.cli import main
    >>> main(["info", "dense(64, 8) @ dense(8, 64)", "--batch", "4", "--json"])  # doctest: +ELLIPSIS
    {"expr": "dense(64, 8) @ dense(8, 64)", "shape": [64, 64], "heads": null, "rank_bound": 8, "rank_exact": true, ...}
    0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

from .benchmark import bench
from .core.base import LinearOperator
from .expr import REGISTRY, parse, to_expr

__all__ = ["main", "info", "EXIT_BROKEN_PIPE"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}

#: Exit status when the reader of stdout goes away early (``structmat info ... | head``): 128 + SIGPIPE, what a shell
#: reports for a tool that SIGPIPE ended, so that ``set -o pipefail`` scripts still see that the output was cut.
EXIT_BROKEN_PIPE = 141

_EPILOG = """examples:
  structmat info "dense(1024, 16) @ dense(16, 1024)"
  structmat info "kron(dense(32, 32), dense(32, 32)) + 0.5 * identity(1024)" --batch 64
  structmat info "dense(1000000, 8) @ dense(8, 1000000)" --json
  structmat bench "btt(1024, 1024, ranks=1)" --batch 1024 --backward
  structmat bench --suite --size smoke
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="structmat",
        description="Structured linear operators as tensor networks: rank, parameters, FLOPs and contraction paths "
        "from shapes alone.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info_parser = sub.add_parser(
        "info",
        help="describe the operator an expression builds (tree, rank, params, FLOPs, path), without allocating it",
        description="Build EXPR on the meta device (no parameter memory) and print its tree, rank bound, parameter "
        "count, FLOPs and MACs for a batch, opt_einsum's contraction path and the speedup over dense.",
        epilog="EXPR grammar: names "
        + ", ".join(sorted(REGISTRY))
        + '; operators + - @ * / and .T; numbers, "strings", [lists], (tuples), dict(k=v) and keyword arguments; '
        "NAME = EXPR; names a value used more than once, e.g. "
        '"dense(64, 8) @ dense(8, 64) + 0.5 * identity(64)" or "w = dense(64, 64); w + w.T".',
    )
    info_parser.add_argument("expr", metavar="EXPR", help="an operator expression, e.g. 'dense(64, 8) @ dense(8, 64)'")
    info_parser.add_argument(
        "--batch", type=_positive_int, default=1, metavar="B", help="number of input vectors (default: 1)"
    )
    info_parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    bench_parser = sub.add_parser(
        "bench",
        help="time the operator an expression builds against a dense matrix on this machine; --suite: all benchmarks",
        description="Build EXPR (random parameters) and time it against the same map as a dense matrix, side by "
        "side in this process, after checking that both agree. With --suite instead of EXPR, run the benchmark "
        "suite (python -m benchmarks, from a source checkout) and write results.json and results.md.",
    )
    bench_parser.add_argument("expr", metavar="EXPR", nargs="?", help="an operator expression (as for info)")
    bench_parser.add_argument(
        "--batch", type=_positive_int, default=64, metavar="B", help="number of input vectors (default: 64)"
    )
    bench_parser.add_argument("--backward", action="store_true", help="time forward + backward")
    bench_parser.add_argument(
        "--inference", action="store_true", help="time the forward under torch.inference_mode() (not with --backward)"
    )
    bench_parser.add_argument(
        "--threads", type=_positive_int, default=None, metavar="N", help="torch threads (default: torch's current)"
    )
    bench_parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="(default: float32)")
    bench_parser.add_argument(
        "--min-run-time", type=_positive_float, default=0.2, metavar="S", help="seconds per timing (default: 0.2)"
    )
    bench_parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    bench_parser.add_argument("--suite", action="store_true", help="run the benchmark suite instead of EXPR")
    bench_parser.add_argument(
        "--size", choices=("smoke", "full"), default="full", help="suite size (default: full, about 10 minutes)"
    )
    bench_parser.add_argument(
        "--out", metavar="DIR", default=None, help="suite output folder (default: benchmarks/results)"
    )
    bench_parser.add_argument("--only", nargs="+", metavar="GROUP", default=None, help="suite groups to run")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def info(op: LinearOperator, batch: int = 1) -> dict[str, Any]:
    """The facts ``structmat info`` reports about ``op``, from shapes alone, as a JSON-ready dict.

    Args:
        op: the operator (on any device; ``meta`` works).
        batch: number of input vectors for the cost.

    Returns:
        A dict with ``expr``, ``shape``, ``heads``, ``rank_bound``, ``rank_exact``, ``num_params``, ``batch``,
        ``flops``, ``macs``, ``dense_flops``, ``speedup`` (None when the operator costs no FLOPs),
        ``largest_intermediate`` and ``path`` (a list of ``[equation, path]``, one per einsum).

    Example:
        >>> import structmat as sm
        >>> from structmat.cli import info
        >>> facts = info(sm.Dense(5, 2, device="meta") @ sm.Dense(2, 7, device="meta"), batch=3)
        >>> facts["rank_bound"], facts["flops"], facts["dense_flops"], facts["path"]
        (2, 144, 210, [['za,bc,ca->zb', [[0, 2], [0, 1]]]])
    """
    rank = op.rank()
    cost = op.cost(batch)
    speedup = cost.speedup
    try:
        expr: str | None = to_expr(op)
    except ValueError:
        expr = None
    return {
        "expr": expr,
        "shape": list(op.shape),
        "heads": op.heads,
        "rank_bound": rank.bound,
        "rank_exact": rank.exact,
        "num_params": op.num_params,
        "batch": cost.batch,
        "flops": cost.flops,
        "macs": cost.macs,
        "dense_flops": cost.dense_flops,
        "speedup": speedup if speedup != float("inf") else None,
        "largest_intermediate": cost.largest_intermediate,
        "path": [[equation, [list(step) for step in path]] for equation, path in cost.path],
    }


def _text(op: LinearOperator, facts: dict[str, Any]) -> str:
    m, n = facts["shape"]
    heads = f", heads={facts['heads']}" if facts["heads"] is not None else ""
    exact = "(exact for generic parameters)" if facts["rank_exact"] else "(bound)"
    speedup = "inf (no FLOPs)" if facts["speedup"] is None else f"{facts['speedup']:.4g}x"
    lines = [
        f"expr:     {facts['expr']}" if facts["expr"] is not None else "expr:     (none)",
        f"shape:    ({m}, {n}){heads}",
        f"rank:     <= {facts['rank_bound']:,} {exact}",
        f"params:   {facts['num_params']:,}",
        f"batch:    {facts['batch']:,}",
        f"flops:    {facts['flops']:,}  (multiply-add = 2)",
        f"macs:     {facts['macs']:,}",
        f"dense:    {facts['dense_flops']:,} flops",
        f"speedup:  {speedup} over dense",
        f"largest intermediate: {facts['largest_intermediate']:,} elements",
        "path:" if facts["path"] else "path:     (no einsum)",
    ]
    for k, (equation, path) in enumerate(facts["path"]):
        steps = ", ".join(str(tuple(step)) for step in path)
        lines.append(f"  einsum {k}: {equation}  path [{steps}]")
    lines.append("tree:")
    lines.extend("  " + line for line in repr(op).splitlines())
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``structmat`` command line; returns the exit status (0 ok, 2 for a usage or parse error, 141 when the
    reader of the output went away early, as in ``structmat info ... | head``: no traceback, no message).

    Args:
        argv: the arguments after the program name (``sys.argv[1:]`` when None).

    Example:
        >>> from structmat.cli import main
        >>> main(["info", "dense(5, 2) @ dense(2, 7)"])  # doctest: +ELLIPSIS
        expr:     dense(5, 2) @ dense(2, 7)
        shape:    (5, 7)
        rank:     <= 2 (exact for generic parameters)
        params:   24
        ...
        0
    """
    try:
        return _run(argv)
    except BrokenPipeError:
        _drop_stdout()
        return EXIT_BROKEN_PIPE


def _drop_stdout() -> None:
    """Point stdout at the null device, so that the interpreter's last flush of what is still buffered does not fail
    again on the closed pipe (and print "Exception ignored ... BrokenPipeError")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (captured): nothing to flush
        pass


def _run(argv: Sequence[str] | None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2): report the status instead of exiting
        sys.stdout.flush()  # argparse ignores a failed write of the help; a closed pipe shows here
        return int(e.code or 0)
    if args.command == "bench":
        return _bench(args)
    if args.command != "info":
        parser.print_help(sys.stderr)
        return 2
    try:
        op = parse(args.expr, device="meta")
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    facts = info(op, args.batch)
    print(json.dumps(facts) if args.json else _text(op, facts))
    sys.stdout.flush()  # a closed pipe shows here, inside main, not at interpreter exit
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.suite:
        if args.expr is not None:
            print("structmat bench: give EXPR or --suite, not both", file=sys.stderr)
            return 2
        return _suite(args)
    if args.expr is None:
        print("structmat bench: give an expression (EXPR) or --suite", file=sys.stderr)
        return 2
    extra = [f for f, v in (("--out", args.out), ("--only", args.only)) if v is not None]
    if extra:
        print(f"structmat bench: {', '.join(extra)} only go with --suite", file=sys.stderr)
        return 2
    try:
        op = parse(args.expr, dtype=_DTYPES[args.dtype])
        result = bench(
            op,
            args.batch,
            backward=args.backward,
            inference=args.inference,
            threads=args.threads,
            min_run_time=args.min_run_time,
        )
    except (ValueError, TypeError, RuntimeError) as e:
        print(f"structmat bench: {e}", file=sys.stderr)
        return 2
    if args.json:
        facts = result.to_dict()
        try:
            facts["expr"] = to_expr(op)
        except ValueError:
            facts["expr"] = args.expr
        print(json.dumps(facts))
    else:
        print(result)
    sys.stdout.flush()
    return 0


def _suite(args: argparse.Namespace) -> int:
    """Run ``python -m benchmarks`` from the source checkout this package was loaded from."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "__main__.py").is_file():
        print(
            f"structmat bench --suite: the benchmark suite lives in a source checkout's benchmarks/ folder; there is "
            f"none next to this installation ({root})",
            file=sys.stderr,
        )
        return 2
    command = [sys.executable, "-m", "benchmarks", "--size", args.size]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    if args.out is not None:
        command += ["--out", str(Path(args.out).resolve())]
    if args.only:
        command += ["--only", *args.only]
    sys.stdout.flush()
    return subprocess.call(command, cwd=root)
