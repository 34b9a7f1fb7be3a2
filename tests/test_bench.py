"""structmat.bench, Cost's measured Timing, ``structmat bench`` and the benchmark suite runner (no timing asserts)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import structmat as sm
from structmat import benchmark as _bench
from structmat.benchmark import measure_cost
from structmat.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import _suite  # noqa: E402

FAST = dict(min_run_time=0.002, rounds=1)


# -- bench() ---------------------------------------------------------------------------------------------------------
def test_bench_result_fields() -> None:
    torch.manual_seed(0)
    op = sm.Dense(24, 5) @ sm.Dense(5, 12)
    r = sm.bench(op, 7, threads=1, **FAST)
    assert (r.name, r.shape, r.heads, r.batch, r.backward, r.inference) == (op.name, (24, 12), None, 7, False, False)
    assert r.dtype == torch.float32 and r.threads == 1
    assert r.flops == op.cost(7).flops and r.dense_flops == 2 * 24 * 12 * 7
    assert r.seconds > 0 and r.dense_seconds > 0
    assert r.ratio == pytest.approx(r.seconds / r.dense_seconds)
    assert r.speedup == pytest.approx(1 / r.ratio)
    assert r.gflops == pytest.approx(r.flops / r.seconds / 1e9)
    assert r.dense_gflops == pytest.approx(r.dense_flops / r.dense_seconds / 1e9)
    assert r.verdict == r.timing.verdict
    assert r.timing == sm.Timing(r.seconds, r.dense_seconds, 1, "float32", False, False)
    facts = json.loads(json.dumps(r.to_dict()))
    assert facts["shape"] == [24, 12] and facts["dtype"] == "float32" and facts["verdict"] == r.verdict
    text = str(r)
    assert text.startswith(f"{op.name}: (24, 12), batch 7, forward, float32, 1 thread(s)")
    assert "ours / dense" in text and r.verdict in text
    assert torch.get_num_threads() >= 1  # restored (not asserting a value: the machine decides the default)


def test_bench_restores_threads() -> None:
    before = torch.get_num_threads()
    sm.bench(sm.Dense(4, 4), 2, threads=1, **FAST)
    assert torch.get_num_threads() == before


def test_bench_heads_backward_and_dtype() -> None:
    torch.manual_seed(0)
    op = sm.LowRank(7, 5, rank=2, heads=3)
    r = sm.bench(op, 4, backward=True, dtype=torch.float64, **FAST)
    assert r.heads == 3 and r.backward and r.dtype == torch.float64
    assert r.flops == op.cost(4).flops and r.dense_flops == 2 * 7 * 5 * 4 * 3
    assert r.gflops == pytest.approx(3 * r.flops / r.seconds / 1e9)  # forward + backward: three forwards' work
    assert op.dtype == torch.float32  # timed on a float64 copy; the operator itself is untouched
    assert sm.bench(sm.Identity(6), 3, dtype=torch.float64, **FAST).dtype == torch.float64  # no parameters


def test_bench_inference_mode() -> None:
    torch.manual_seed(0)
    op = sm.Dense(12, 4) @ sm.Dense(4, 4) @ sm.Dense(4, 12)
    r = sm.bench(op, 3, inference=True, **FAST)
    assert r.inference and not r.backward and r.timing.inference
    assert str(r).startswith(f"{op.name}: (12, 12), batch 3, forward, inference mode, float32")
    assert "forward, inference mode" in str(r.timing)


def test_bench_errors() -> None:
    op = sm.Dense(4, 3)
    with pytest.raises(TypeError, match="bench: op must be a structmat LinearOperator, got Linear"):
        sm.bench(torch.nn.Linear(3, 4))
    with pytest.raises(ValueError, match=r"bench\(Dense\(4, 3\)\): batch must be >= 1, got 0"):
        sm.bench(op, 0)
    with pytest.raises(TypeError, match=r"bench\(Dense\(4, 3\)\): batch must be an int, got bool True"):
        sm.bench(op, True)
    with pytest.raises(ValueError, match=r"bench\(Dense\(4, 3\)\): threads must be >= 1, got 0"):
        sm.bench(op, 2, threads=0)
    with pytest.raises(TypeError, match=r"bench\(Dense\(4, 3\)\): backward must be a bool, got str"):
        sm.bench(op, 2, backward="yes")
    with pytest.raises(TypeError, match=r"bench\(Dense\(4, 3\)\): inference must be a bool, got int"):
        sm.bench(op, 2, inference=1)
    with pytest.raises(ValueError, match=r"bench\(Dense\(4, 3\)\): backward=True and inference=True exclude each"):
        sm.bench(op, 2, backward=True, inference=True)
    with pytest.raises(ValueError, match=r"bench\(Dense\(4, 3\)\): min_run_time must be a positive number .* -1"):
        sm.bench(op, 2, min_run_time=-1)
    with pytest.raises(TypeError, match=r"bench\(Dense\(4, 3\)\): min_run_time must be a number of seconds"):
        sm.bench(op, 2, min_run_time="1")
    with pytest.raises(TypeError, match=r"bench\(Dense\(4, 3\)\): dtype must be a floating-point .*torch.int64"):
        sm.bench(op, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"bench\(Dense\(4, 3\)\): the operator is on the meta device"):
        sm.bench(sm.Dense(4, 3, device="meta"), 2)


def test_bench_dense_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_bench, "DENSE_LIMIT_BYTES", 100)
    with pytest.raises(ValueError, match=r"bench\(Dense\(8, 8\)\): the dense matrix would take"):
        sm.bench(sm.Dense(8, 8), 2)


def test_bench_refuses_a_wrong_dense_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    op = sm.Dense(4, 3)
    monkeypatch.setattr(op, "dense", lambda dtype=None: torch.zeros(4, 3))
    with pytest.raises(RuntimeError, match=r"bench\(Dense\(4, 3\)\): the operator and its dense matrix disagree"):
        sm.bench(op, 2, **FAST)


# -- Timing and Cost -------------------------------------------------------------------------------------------------
def test_timing_verdicts() -> None:
    assert sm.Timing(1.0, 1.8, 1, "float32").verdict == "1.8x faster than dense"
    assert sm.Timing(1.0, 1.03, 1, "float32").verdict == "as fast as dense (within 5%)"
    assert sm.Timing(1.03, 1.0, 1, "float32").verdict == "as fast as dense (within 5%)"
    assert sm.Timing(2.5, 1.0, 1, "float32").verdict == "2.5x slower than dense: use dense here"
    t = sm.Timing(0.002, 0.001, 2, "float64", backward=True)
    assert (t.ratio, t.speedup) == (2.0, 0.5)
    assert str(t) == "2 ms vs dense 1 ms (forward+backward, float64, 2 threads): 2x slower than dense: use dense here"


def test_cost_carries_timing() -> None:
    op = sm.LowRank(16, 16, rank=2)
    cost = op.cost(4)
    assert cost.timing is None and "Measured" not in str(cost)
    measured = measure_cost(op, 4, cost, **FAST)
    assert measured.timing is not None and measured.timing.seconds > 0
    assert (measured.flops, measured.contractions, measured.shape) == (cost.flops, cost.contractions, cost.shape)
    assert f"  Measured: {measured.timing}" in str(measured).splitlines()
    assert "timing=Timing(seconds=" in repr(measured)


def test_op_cost_measure() -> None:
    op = sm.LowRank(16, 16, rank=2)
    measured = op.cost(4, measure=True)
    assert measured.timing is not None and measured.timing.seconds > 0 and measured.flops == op.cost(4).flops
    assert op.cost(4).timing is None
    with pytest.raises(TypeError, match=r"LowRank\(16, 16, rank=2\).cost: measure must be a bool, got int"):
        op.cost(4, measure=1)


# -- structmat bench -------------------------------------------------------------------------------------------------
def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_bench_json(capsys: pytest.CaptureFixture[str]) -> None:
    expr = "dense(16, 4) @ dense(4, 16)"
    code, out, err = run(capsys, "bench", expr, "--batch", "4", "--json", "--min-run-time", "0.002", "--threads", "1")
    assert code == 0 and err == ""
    facts = json.loads(out)
    assert facts["expr"] == expr and facts["shape"] == [16, 16] and facts["batch"] == 4 and facts["threads"] == 1
    assert facts["flops"] == 2 * 4 * (16 * 4 + 4 * 16) and facts["dense_flops"] == 2 * 4 * 16 * 16
    assert facts["dtype"] == "float32" and not facts["backward"]
    assert facts["ratio"] == pytest.approx(facts["seconds"] / facts["dense_seconds"])
    assert isinstance(facts["verdict"], str)


def test_cli_bench_text_backward_float64(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, "bench", "lowrank(12, 10, rank=3)", "--batch", "3", "--backward", "--dtype", "float64",
        "--min-run-time", "0.002",
    )  # fmt: skip
    assert code == 0 and err == ""
    assert out.splitlines()[0].startswith("LowRank(12, 10, rank=3): (12, 10), batch 3, forward+backward, float64")
    assert "ours / dense:" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench"], "structmat bench: give an expression (EXPR) or --suite"),
        (["bench", "dense(4, 4)", "--suite"], "structmat bench: give EXPR or --suite, not both"),
        (["bench", "dense(4, 4)", "--out", "x"], "structmat bench: --out only go with --suite"),
        (["bench", "dense(4,"], "structmat bench: structmat.parse: "),
        (["bench", "dense(4, 4)", "--backward", "--inference"], "backward=True and inference=True exclude"),
        (["bench", "dense(4, 4)", "--batch", "0"], "argument --batch: must be >= 1, got 0"),
        (["bench", "dense(4, 4)", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
        (["bench", "dense(4, 4)", "--min-run-time", "0"], "argument --min-run-time: must be a positive number"),
    ],
)
def test_cli_bench_errors(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert message in err


def test_cli_bench_suite_passes_through(capfd: pytest.CaptureFixture[str]) -> None:
    """--suite runs python -m benchmarks from the checkout: an unknown group is its usage error (status 2)."""
    assert main(["bench", "--suite", "--size", "smoke", "--only", "nosuchgroup"]) == 2
    assert "unknown group(s) ['nosuchgroup']" in capfd.readouterr().err


# -- the suite runner ------------------------------------------------------------------------------------------------
MACHINE = {"gemm_gflops": 100.0, "bandwidth_gbs": 10.0, "cpu": "test CPU", "threads": 1, "date": "today"}


def row(**kw: object) -> dict[str, object]:
    base = dict(
        group="fake", case="a", mode="fwd", ours_ms=2.0, baseline="hand", baseline_ms=4.0, dense_ms=1.0,
        flops=100_000_000, bytes=15_000_000, checked=True, note="n",
    )  # fmt: skip
    base.update(kw)
    return base


def fake(size: str) -> list[dict[str, object]]:
    assert size == "smoke"
    return [row(), row(case="b", mode="plan", baseline_ms=None, dense_ms=None, flops=None, bytes=None)]


def broken(size: str) -> list[dict[str, object]]:
    raise RuntimeError("boom")


def malformed(size: str) -> list[dict[str, object]]:
    print("chatter")  # goes to stderr: stdout carries the markdown only
    return [
        {"group": "bad", "case": "x"},
        row(group="bad", case="unchecked", checked=False),
        row(group="bad", case="zero", dense_ms=0.0),
        row(group="bad", case="flag", flops=True),
        row(group="bad", flops=np.int64(100_000_000), ours_ms=np.float32(2.0)),
    ]


def test_derive_by_hand() -> None:
    got = _suite.derive(row(), MACHINE)
    # ours 2 ms; baseline 4 ms; dense 1 ms; 1e8 flops at 100 GFLOP/s = 1 ms; 1.5e7 bytes at 10 GB/s = 1.5 ms
    assert got["ratio_baseline"] == pytest.approx(0.5)
    assert got["ratio_dense"] == pytest.approx(2.0)
    assert got["gflops"] == pytest.approx(50.0)  # 1e8 / 2e-3 / 1e9
    assert got["roofline"] == pytest.approx(0.75)  # max(1 ms, 1.5 ms) / 2 ms
    flops_bound = _suite.derive(row(bytes=None), MACHINE)
    assert flops_bound["roofline"] == pytest.approx(0.5)
    bare = _suite.derive(row(baseline_ms=None, dense_ms=None, flops=None, bytes=None), MACHINE)
    assert (bare["ratio_baseline"], bare["ratio_dense"], bare["gflops"], bare["roofline"]) == (None,) * 4


def test_derive_uses_the_rates_at_the_rows_thread_count() -> None:
    machine = {**MACHINE, "rates": {"1": MACHINE, "2": {"gemm_gflops": 200.0, "bandwidth_gbs": 10.0}}}
    two = _suite.derive(row(bytes=None, note="2 threads, fp32"), machine)
    assert two["threads"] == 2 and two["roofline"] == pytest.approx(0.25)  # 1e8 flops at 200 GFLOP/s / 2 ms
    key = _suite.derive(row(bytes=None, threads=2, note="1 thread"), machine)  # the key wins over the note
    assert key["threads"] == 2 and key["roofline"] == pytest.approx(0.25)
    one = _suite.derive(row(bytes=None, note="no count"), machine)
    assert one["threads"] == 1 and one["roofline"] == pytest.approx(0.5)
    assert _suite.derive(row(bytes=None, note="4 threads"), machine)["roofline"] == pytest.approx(0.5)  # no rates: top
    assert _suite.row_threads({"note": "ran on 1 thread"}, 8) == 1


def twice(size: str) -> list[dict[str, object]]:
    return [row(case="same"), row(case="same", note="2 threads")]


def test_markdown_names_the_module_of_a_repeated_case() -> None:
    suites = {"one": twice, "two": twice}
    report, status = _suite.run_suite("smoke", suites=suites, machine=MACHINE, out=None, progress=False)
    assert status == 0 and [r["module"] for r in report["rows"]] == ["bench_one"] * 2 + ["bench_two"] * 2
    md = _suite.to_markdown(report)
    assert md.count("| same [bench_one] | fwd |") == 2 and md.count("| same [bench_two] | fwd |") == 2


def test_run_suite_fake_modules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    suites = {"fake": fake, "broken": broken, "missing": ModuleNotFoundError("No module named 'x'"), "bad": malformed}
    report, status = _suite.run_suite("smoke", suites=suites, machine=MACHINE, out=tmp_path, progress=False)
    assert status == 1
    assert capsys.readouterr().out == ""
    rows = report["rows"]
    good = [r for r in rows if "error" not in r]
    assert [(r["group"], r["case"]) for r in good] == [("fake", "a"), ("fake", "b"), ("bad", "a")]
    assert good[0]["roofline"] == pytest.approx(0.75) and good[0]["ratio_baseline"] == pytest.approx(0.5)
    assert good[1]["roofline"] is None and good[1]["ratio_dense"] is None
    errors = {(r["group"], r["case"]): r["error"] for r in rows if "error" in r}
    assert errors[("broken", "(module failed)")].startswith("RuntimeError: boom")
    assert errors[("missing", "(module not loaded)")] == "ModuleNotFoundError: No module named 'x'"
    assert "row lacks keys ['mode'," in errors[("bad", "x")]
    assert "checked is False" in errors[("bad", "unchecked")]
    assert "dense_ms=0.0: times must be positive (or None)" in errors[("bad", "zero")]
    assert "flops must be numbers, not bools" in errors[("bad", "flag")]
    assert type(good[2]["flops"]) is int and type(good[2]["ours_ms"]) is float  # numpy scalars made plain
    assert [m["error"] for m in report["modules"]] == [
        None,
        "RuntimeError: boom",
        "ModuleNotFoundError: No module named 'x'",
        None,
    ]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["machine"] == MACHINE and len(saved["rows"]) == len(rows)
    md = (tmp_path / "results.md").read_text()
    assert "- Machine: test CPU" in md and "fp32 GEMM 100 GFLOP/s" in md and "memory bandwidth 10 GB/s" in md
    assert "## fake" in md and "## bad" in md and "## errors" in md
    assert "| a | fwd | 2 | hand | 4 | 0.5 | 1 | 2 | 50 | 0.75 | n |" in md
    assert "| b | plan | 2 | hand | – | – | – | – | – | – | n |" in md
    assert "- broken: (module failed): RuntimeError: boom" in md


def test_run_suite_ok_and_only(tmp_path: Path) -> None:
    report, status = _suite.run_suite(
        "smoke", suites={"fake": fake, "broken": broken}, only=["fake"], machine=MACHINE, out=None, progress=False
    )
    assert status == 0 and [m["module"] for m in report["modules"]] == ["bench_fake"]
    assert "## errors" not in _suite.to_markdown(report)
    with pytest.raises(ValueError, match="run_suite: size must be 'smoke' or 'full', got 'big'"):
        _suite.run_suite("big", suites={}, machine=MACHINE, out=None)


def test_suite_main_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert _suite.main(["--only", "nosuchgroup"]) == 2
    assert "unknown group(s) ['nosuchgroup']; known: attention, operators, overhead, paths" in capsys.readouterr().err
    assert _suite.main(["--threads", "0"]) == 2
    assert _suite.main(["--size", "huge"]) == 2


def test_discover_lists_every_expected_module() -> None:
    found = _suite.discover()
    assert set(_suite.EXPECTED) <= set(found)
    assert callable(found["overhead"]) and callable(found["paths"])


def test_smoke_run_overhead(tmp_path: Path) -> None:
    """A real run: ``python -m benchmarks --size smoke --only overhead`` (a few seconds)."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--size", "smoke", "--only", "overhead", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# Benchmark results")
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["machine"]["gemm_gflops"] > 0 and report["machine"]["bandwidth_gbs"] > 0
    rows = report["rows"]
    assert rows and all(r["group"] == "overhead" and r["checked"] and "error" not in r for r in rows)
    assert all(math.isfinite(r["ratio_baseline"]) and r["roofline"] > 0 for r in rows)
    assert (tmp_path / "results.md").read_text() == proc.stdout.rstrip("\n") + "\n"
