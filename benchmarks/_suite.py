"""The benchmark suite runner: every ``benchmarks/bench_*.py`` module's ``suite(size)`` rows in one run.

It measures the machine first (GEMM rate and memory bandwidth at the thread count used, see :mod:`._machine`), runs
each module's ``suite(size)`` (a module that is missing, fails or returns a malformed row becomes an error row, and
the run exits with status 1 at the end), computes from each row

- ``ratio_baseline = ours_ms / baseline_ms`` and ``ratio_dense = ours_ms / dense_ms`` (below 1: ours faster),
- ``gflops = flops / (ours_ms / 1e3) / 1e9`` (achieved),
- ``roofline = max(flops / gemm rate, bytes / bandwidth) / (ours_ms / 1e3)`` (1.0 = at the roofline; from
  whichever of flops and bytes the row gives),

and writes ``results.json`` (machine + rows) and ``results.md`` (the machine, then one table per group) into the
output folder, printing the markdown.

Row schema (what a module's ``suite(size)`` returns, a list of dicts): ``group``, ``case``, ``mode`` ("fwd",
"fwd+bwd", or e.g. "plan"), ``ours_ms``, ``baseline`` (name), ``baseline_ms``, ``dense_ms``, ``flops`` (of the timed
work), ``bytes`` (minimal bytes moved), ``checked`` (True: correctness was checked before timing), ``note``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import json
import math
import numbers
import pkgutil
import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ._machine import measure_machine, measure_rates

__all__ = [
    "EXPECTED",
    "ROW_KEYS",
    "discover",
    "derive",
    "row_threads",
    "run_suite",
    "to_markdown",
    "main",
    "DEFAULT_OUT",
]

#: The modules the suite expects (``bench_<name>``); a missing one is an error row.
EXPECTED = ("operators", "attention", "overhead", "paths")

#: Every row's keys and the types their values may have.
ROW_KEYS: dict[str, tuple[type, ...]] = {
    "group": (str,),
    "case": (str,),
    "mode": (str,),
    "ours_ms": (numbers.Real,),
    "baseline": (str,),
    "baseline_ms": (numbers.Real, type(None)),
    "dense_ms": (numbers.Real, type(None)),
    "flops": (numbers.Integral, type(None)),
    "bytes": (numbers.Integral, type(None)),
    "checked": (bool,),
    "note": (str,),
}
_NUMBERS = {"ours_ms": float, "baseline_ms": float, "dense_ms": float, "flops": int, "bytes": int}

DEFAULT_OUT = Path(__file__).resolve().parent / "results"

SuiteFn = Callable[[str], list[dict[str, Any]]]


def discover(only: Sequence[str] | None = None) -> dict[str, SuiteFn | BaseException]:
    """``{name: suite function, or the exception that stopped loading it}`` for ``bench_<name>`` modules.

    Every expected module (:data:`EXPECTED`) is listed (a missing one maps to its ImportError); other
    ``bench_*.py`` files join when they define ``suite``. ``only`` keeps those names.
    """
    here = Path(__file__).resolve().parent
    found = [m.name[len("bench_") :] for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_")]
    names = list(EXPECTED) + sorted(set(found) - set(EXPECTED))
    if only is not None:
        names = [n for n in names if n in only]
    out: dict[str, SuiteFn | BaseException] = {}
    for name in names:
        try:
            with contextlib.redirect_stdout(sys.stderr):
                module = importlib.import_module(f"{__package__}.bench_{name}")
        except (Exception, SystemExit) as e:  # a module that does not import is an error row, not the end of the run
            out[name] = e
            continue
        fn = getattr(module, "suite", None)
        if callable(fn):
            out[name] = fn
        elif name in EXPECTED:
            out[name] = AttributeError(f"benchmarks/bench_{name}.py has no suite(size) function")
    return out


def _error_row(group: str, case: str, error: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
    row.update(group=group, case=case, mode="", baseline="", checked=False, note="", error=error)
    return row


def _problems(row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"a row must be a dict, got {type(row).__name__}"
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        return f"row lacks keys {missing}"
    bad = [f"{k}={row[k]!r}" for k, kinds in ROW_KEYS.items() if not isinstance(row[k], kinds)]
    if bad:
        return f"row has values of the wrong type: {', '.join(bad)}"
    flags = [k for k in _NUMBERS if isinstance(row[k], bool)]
    if flags:
        return f"{', '.join(flags)} must be numbers, not bools"
    optional = ("baseline_ms", "dense_ms")
    times = [k for k in optional if row[k] is not None and not (math.isfinite(row[k]) and row[k] > 0)]
    if times:
        return f"{', '.join(f'{k}={row[k]!r}' for k in times)}: times must be positive (or None)"
    if not (math.isfinite(row["ours_ms"]) and row["ours_ms"] > 0):
        return f"ours_ms must be a positive time, got {row['ours_ms']!r}"
    if not row["checked"]:
        return "checked is False: rows are reported only after their correctness check passed"
    return None


def row_threads(row: dict[str, Any], default: int) -> int:
    """The thread count a row ran at: its optional ``threads`` key, else "N thread(s)" in its note, else
    ``default`` (the suite's)."""
    value = row.get("threads")
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1:
        return int(value)
    found = re.search(r"\b(\d+) threads?\b", row.get("note") or "")
    return int(found.group(1)) if found and int(found.group(1)) >= 1 else default


def derive(row: dict[str, Any], machine: dict[str, Any]) -> dict[str, Any]:
    """``row`` with ``threads`` (see :func:`row_threads`), ``ratio_baseline``, ``ratio_dense``, ``gflops`` and
    ``roofline`` added (None where the row lacks what they need). ``machine`` gives ``gemm_gflops`` and
    ``bandwidth_gbs``, and in ``rates`` the same per thread count (a string key); a row uses the rates at its
    thread count when the machine has them."""
    out = dict(row)
    threads = row_threads(row, machine.get("threads", 1))
    rates = machine.get("rates", {}).get(str(threads), machine)
    out["threads"] = threads
    ours_s = row["ours_ms"] / 1e3
    out["ratio_baseline"] = row["ours_ms"] / row["baseline_ms"] if row.get("baseline_ms") else None
    out["ratio_dense"] = row["ours_ms"] / row["dense_ms"] if row.get("dense_ms") else None
    flops, nbytes = row.get("flops"), row.get("bytes")
    out["gflops"] = flops / ours_s / 1e9 if flops else None
    bounds = []
    if flops:
        bounds.append(flops / (rates["gemm_gflops"] * 1e9))
    if nbytes:
        bounds.append(nbytes / (rates["bandwidth_gbs"] * 1e9))
    out["roofline"] = max(bounds) / ours_s if bounds else None
    return out


class _Progress:
    """tqdm over the modules when it is installed and stderr is a terminal, else plain lines (on stderr)."""

    def __init__(self, names: list[str], enabled: bool) -> None:
        self.names, self.enabled, self.bar = names, enabled, None
        if enabled and sys.stderr.isatty():  # a log file gets plain lines, not a bar's carriage returns
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=len(names), desc="benchmarks", unit="module", file=sys.stderr)
            except ImportError:
                pass

    def start(self, k: int, name: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(name)
        elif self.enabled:
            print(f"[{k + 1}/{len(self.names)}] {name} ...", file=sys.stderr, flush=True)

    def done(self, name: str, rows: int, seconds: float, error: str | None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            status = f"error: {error}" if error else f"{rows} rows"
            self.bar.write(f"{name}: {status} ({seconds:.1f} s)", file=sys.stderr)
        elif self.enabled:
            status = f"error: {error}" if error else f"{rows} rows"
            print(f"    {name}: {status} ({seconds:.1f} s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_suite(
    size: str = "full",
    *,
    only: Sequence[str] | None = None,
    out: str | Path | None = DEFAULT_OUT,
    threads: int = 1,
    suites: dict[str, SuiteFn | BaseException] | None = None,
    machine: dict[str, Any] | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], int]:
    """Run the suite; returns ``(report, status)`` (status 0, or 1 when any row is an error row).

    Args:
        size: "smoke" (seconds, tiny shapes) or "full".
        only: keep these module names (``operators`` for ``bench_operators``, ...); all when None.
        out: folder for ``results.json`` and ``results.md`` (created); None writes nothing.
        threads: ``torch.set_num_threads`` for the machine measurement and every module (restored after each).
        suites: ``{name: suite function or exception}`` instead of :func:`discover` (for tests).
        machine: the machine facts instead of measuring them (for tests; needs ``gemm_gflops`` and
            ``bandwidth_gbs``).
        progress: show progress on stderr.

    Returns:
        The report (``size``, ``seconds``, ``machine``, ``modules``: per module its rows, seconds and error, and
        ``rows``: every row with the derived numbers) and the exit status.
    """
    if size not in ("smoke", "full"):
        raise ValueError(f"run_suite: size must be 'smoke' or 'full', got {size!r}")
    start = time.perf_counter()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        if suites is None:
            suites = discover(only)
        elif only is not None:
            suites = {k: v for k, v in suites.items() if k in only}
        measured = machine is None
        if machine is None:
            machine = measure_machine(size, threads)
        raw: list[dict[str, Any]] = []
        modules: list[dict[str, Any]] = []
        bar = _Progress(list(suites), progress)
        for k, (name, fn) in enumerate(suites.items()):
            bar.start(k, name)
            t0 = time.perf_counter()
            got, error = _run_one(name, fn, size)
            torch.set_num_threads(threads)  # a module may have changed it
            seconds = time.perf_counter() - t0
            raw += [{**row, "module": f"bench_{name}"} for row in got]
            modules.append({"module": f"bench_{name}", "rows": len(got), "seconds": seconds, "error": error})
            bar.done(name, len(got), seconds, error)
        bar.close()
        if measured:  # rows run at another thread count get the machine's rates at that count, measured now
            default = machine["threads"]
            for t in sorted({row_threads(r, default) for r in raw if "error" not in r} - {default}):
                if progress:
                    print(f"measuring GEMM rate and bandwidth at {t} threads ...", file=sys.stderr, flush=True)
                machine["rates"][str(t)] = measure_rates(size, t)
        rows = [derive(r, machine) if "error" not in r else r for r in raw]
    finally:
        torch.set_num_threads(before)
    report = {
        "size": size,
        "only": list(only) if only is not None else None,
        "seconds": time.perf_counter() - start,
        "machine": machine,
        "modules": modules,
        "rows": rows,
    }
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps(report, indent=1) + "\n")
        (folder / "results.md").write_text(to_markdown(report))
    status = 1 if any("error" in row for row in rows) else 0
    return report, status


def _run_one(name: str, fn: SuiteFn | BaseException, size: str) -> tuple[list[dict[str, Any]], str | None]:
    """The module's rows (bad ones replaced by error rows), and its error when it failed as a whole."""
    if isinstance(fn, BaseException):
        error = f"{type(fn).__name__}: {fn}"
        return [_error_row(name, "(module not loaded)", error)], error
    torch.manual_seed(0)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the markdown only
            got = fn(size)
        if not isinstance(got, list):
            raise TypeError(f"suite({size!r}) must return a list of row dicts, got {type(got).__name__}")
    except (Exception, SystemExit) as e:  # a module's failure is its error row; Ctrl-C still stops the run
        error = f"{type(e).__name__}: {e}"
        detail = traceback.format_exc(limit=-3)
        return [_error_row(name, "(module failed)", error + "\n" + detail)], error
    rows = []
    for k, row in enumerate(got):
        problem = _problems(row)
        if problem is None:  # plain floats and ints (a numpy scalar would not go into JSON)
            rows.append({**row, **{key: kind(row[key]) for key, kind in _NUMBERS.items() if row[key] is not None}})
        else:
            case = row.get("case", f"row {k}") if isinstance(row, dict) else f"row {k}"
            group = row.get("group", name) if isinstance(row, dict) else name
            rows.append(_error_row(str(group), str(case), f"malformed row from bench_{name}: {problem}"))
    return rows, None


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    if value == 0:
        return "0"
    return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:,.0f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _rates(m: dict[str, Any]) -> str:
    """ "fp32 GEMM 103 GFLOP/s (...) and memory bandwidth 38 GB/s (...) at 1 thread; 190 GFLOP/s and 45 GB/s at 2"."""
    gemm = f" ({m['gemm_n']}×{m['gemm_n']} `torch.mm`)" if "gemm_n" in m else ""
    copy = f" (copy of {m['copy_elements'] * 4 / 2**20:g} MiB)" if "copy_elements" in m else ""
    threads = m.get("threads", 1)
    text = (
        f"fp32 GEMM {_num(m['gemm_gflops'])} GFLOP/s{gemm} and memory bandwidth {_num(m['bandwidth_gbs'])} GB/s"
        f"{copy} at {threads} thread{'s' if threads != 1 else ''}"
    )
    others = sorted((int(t), r) for t, r in m.get("rates", {}).items() if int(t) != threads)
    for t, r in others:
        text += f"; {_num(r['gemm_gflops'])} GFLOP/s and {_num(r['bandwidth_gbs'])} GB/s at {t} threads"
    return text


def to_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: a machine header, one table per group (in order of first appearance), and the
    errors."""
    m = report["machine"]
    minutes, seconds = divmod(round(report["seconds"]), 60)
    only = f" --only {' '.join(report['only'])}" if report.get("only") else ""
    lines = [
        "# Benchmark results",
        "",
        f"- Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} logical CPUs, {m.get('platform', '?')}",
        f"- torch {m.get('torch', '?')}, Python {m.get('python', '?')}, {m.get('threads', '?')} thread(s)",
        "- Measured in this run: " + _rates(m),
        f"- Run: `python -m benchmarks --size {report['size']}{only}`, {m.get('date', '?')}, {minutes} min {seconds} s",
        "",
        "Times are medians (ms). Ratios are time ratios, ours / baseline and ours / dense: below 1, ours is faster. "
        "Roofline = max(FLOPs / GEMM rate, bytes / bandwidth) / measured time: 1.0 is at the roofline.",
    ]
    groups: dict[str, list[dict[str, Any]]] = {}
    errors = []
    for row in report["rows"]:
        if "error" in row:
            errors.append(row)
        else:
            groups.setdefault(row["group"], []).append(row)
    header = (
        "| case | mode | ours ms | baseline | baseline ms | ours/baseline | dense ms | ours/dense | GFLOP/s "
        "| roofline | note |"
    )
    for group, rows in groups.items():
        lines += ["", f"## {group}", "", header, "|" + "---|" * 11]
        seen = collections.Counter((r["case"], r["mode"], r.get("threads")) for r in rows)
        for r in rows:
            same = seen[r["case"], r["mode"], r.get("threads")] > 1 and "module" in r  # two modules, one case name
            cells = [
                _cell(r["case"]) + (f" [{r['module']}]" if same else ""),
                r["mode"],
                _num(r["ours_ms"], 4),
                _cell(r["baseline"]) or "–",
                _num(r["baseline_ms"], 4),
                _num(r["ratio_baseline"]),
                _num(r["dense_ms"], 4),
                _num(r["ratio_dense"]),
                _num(r["gflops"]),
                _num(r["roofline"], 2),
                _cell(r["note"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    if errors:
        lines += ["", "## errors", ""]
        for r in errors:
            first = r["error"].splitlines()[0] if r["error"] else ""
            lines.append(f"- {r['group']}: {_cell(r['case'])}: {_cell(first)}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks [--size smoke|full] [--only GROUP ...] [--out DIR] [--threads N]``; returns the exit
    status (0 ok, 1 when a module failed or gave a bad row, 2 for a usage error)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run every benchmark module's suite(size), measure the machine (GEMM rate, bandwidth) in the "
        "same run, and write results.json and results.md (ratios to hand-written baselines and to dense, roofline "
        "fractions).",
    )
    parser.add_argument("--size", choices=("smoke", "full"), default="full", help="smoke: seconds; full: ~10 min")
    parser.add_argument("--only", nargs="+", metavar="GROUP", help=f"modules to run, of {', '.join(EXPECTED)}, ...")
    parser.add_argument("--out", metavar="DIR", default=str(DEFAULT_OUT), help="output folder (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, metavar="N", help="torch threads (default: 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress and no markdown on stdout")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.threads < 1:
        print(f"python -m benchmarks: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    if args.only is not None:
        here = Path(__file__).resolve().parent
        modules = pkgutil.iter_modules([str(here)])
        known = set(EXPECTED) | {m.name[len("bench_") :] for m in modules if m.name.startswith("bench_")}
        unknown = [g for g in args.only if g not in known]
        if unknown:
            print(
                f"python -m benchmarks: unknown group(s) {unknown}; known: {', '.join(sorted(known))}",
                file=sys.stderr,
            )
            return 2
    report, status = run_suite(args.size, only=args.only, out=args.out, threads=args.threads, progress=not args.quiet)
    if not args.quiet:
        print(to_markdown(report))
        print(f"wrote {Path(args.out) / 'results.json'} and results.md", file=sys.stderr)
    return status
