"""The ``structmat`` command line (structmat.cli / python -m structmat)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pytest
from zoo import ZOO, build

import structmat as sm
from structmat.cli import EXIT_BROKEN_PIPE, info, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_text(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "info", "dense(64, 8) @ dense(8, 64)", "--batch", "4")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "expr:     dense(64, 8) @ dense(8, 64)"
    assert "shape:    (64, 64)" in lines
    assert "rank:     <= 8 (exact for generic parameters)" in lines
    assert "params:   1,024" in lines
    assert "batch:    4" in lines
    # by hand: x (4, 64) through V (8, 64): 2*4*64*8 = 4096, then U (64, 8): 2*4*8*64 = 4096
    assert "flops:    8,192  (multiply-add = 2)" in lines
    assert "macs:     4,096" in lines
    assert "dense:    32,768 flops" in lines
    assert "speedup:  4x over dense" in lines
    assert "  einsum 0: za,bc,ca->zb  path [(0, 2), (0, 1)]" in lines
    tree = lines[lines.index("tree:") + 1 :]
    assert tree[0].startswith("  Product(64, 64)  params=1,024  rank<=8 (exact)")
    assert tree[1].startswith("  ├─ Dense(64, 8)") and tree[2].startswith("  └─ Dense(8, 64)")


def test_info_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "info", "dense(64, 8) @ dense(8, 64)", "--batch", "4", "--json")
    assert code == 0 and err == ""
    facts = json.loads(out)
    assert facts == {
        "expr": "dense(64, 8) @ dense(8, 64)",
        "shape": [64, 64],
        "heads": None,
        "rank_bound": 8,
        "rank_exact": True,
        "num_params": 1024,
        "batch": 4,
        "flops": 8192,
        "macs": 4096,
        "dense_flops": 32768,
        "speedup": 4.0,
        "largest_intermediate": 256,
        "path": [["za,bc,ca->zb", [[0, 2], [0, 1]]]],
    }


def test_info_json_sum_and_free_operator(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "info", "2 * dense(6, 6) - identity(6).T", "--json")
    facts = json.loads(out)
    assert code == 0 and facts["expr"] == "2.0 * dense(6, 6) - identity(6).T"
    assert facts["rank_bound"] == 6 and facts["num_params"] == 36 and len(facts["path"]) >= 1
    code, out, _ = run(capsys, "info", "identity(5)", "--json")
    assert code == 0 and json.loads(out)["flops"] == 0 and json.loads(out)["speedup"] is None  # no inf in JSON
    code, out, _ = run(capsys, "info", "identity(5)")
    assert "speedup:  inf (no FLOPs) over dense" in out


def test_info_huge_never_allocates(capsys: pytest.CaptureFixture[str]) -> None:
    start = time.perf_counter()
    code, out, err = run(capsys, "info", "dense(1000000, 1000000) @ dense(1000000, 8) @ dense(8, 1000000)", "--json")
    elapsed = time.perf_counter() - start
    assert code == 0 and err == ""
    facts = json.loads(out)
    assert facts["num_params"] == 10**12 + 16 * 10**6  # 4 TB in float32: only the meta device can hold it
    assert facts["rank_bound"] == 8 and facts["dense_flops"] == 2 * 10**12
    assert elapsed < 10


def test_info_low_rank_family(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "info", "dense(1000000, 1000000) @ lowrank(1000000, 1000000, rank=8)", "--json")
    facts = json.loads(out)
    assert code == 0 and facts["rank_bound"] == 8 and facts["num_params"] == 10**12 + 16 * 10**6
    code, out, _ = run(capsys, "info", "lowrank(1000000, 1000000, rank=8)", "--json", "--batch", "3")
    facts = json.loads(out)
    assert facts["flops"] == 2 * 3 * 8 * 2 * 10**6 and facts["macs"] == 3 * 8 * 2 * 10**6
    assert facts["speedup"] == 2 * 10**12 * 3 / facts["flops"]


def test_info_parse_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "info", "dense(2, 2) + foo(3)")
    assert code == 2 and out == ""
    assert err.startswith("structmat.parse: unknown name 'foo' at position 14")
    assert "    dense(2, 2) + foo(3)\n" in err and "                  ^" in err
    code, out, err = run(capsys, "info", "dense(2, 2).__class__", "--json")
    assert code == 2 and out == "" and "attribute access '.__class__' is not allowed at position 11" in err
    code, out, err = run(capsys, "info", "dense(0, 2)")
    assert code == 2 and "dense(0, 2) at position 0: Dense: m (rows) must be >= 1, got 0" in err


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "info", "dense(2, 2)", "--batch", "0")
    assert code == 2 and "argument --batch: must be >= 1, got 0" in err
    code, out, err = run(capsys, "info", "dense(2, 2)", "--batch", "x")
    assert code == 2 and "argument --batch: must be a positive int, got 'x'" in err
    code, out, err = run(capsys, "info")
    assert code == 2 and "the following arguments are required: EXPR" in err
    code, out, err = run(capsys, "frobnicate")
    assert code == 2 and "invalid choice: 'frobnicate'" in err
    code, out, err = run(capsys)
    assert code == 2 and "usage: structmat" in err


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "usage: structmat" in out and "info" in out
    code, out, _ = run(capsys, "info", "--help")
    assert code == 0 and "usage: structmat info [-h] [--batch B] [--json] EXPR" in out and "lowrank" in out


def test_info_function_on_meta() -> None:
    op = sm.Dense(5, 2, device="meta") @ sm.Dense(2, 7, device="meta")
    facts = info(op, batch=3)
    assert facts["flops"] == 2 * 3 * (7 * 2 + 2 * 5) and facts["path"] == [["za,bc,ca->zb", [[0, 2], [0, 1]]]]
    tn = sm.TensorNetwork("y[o] = W[o,i] x[i]", sizes=dict(o=2, i=3), device="meta")
    assert info(tn)["expr"] == 'tensor_network("y[o] = W[o,i] x[i]", sizes=dict(o=2, i=3))'
    tied = sm.Dense(2, 3, device="meta")
    shared = tied + sm.TensorNetwork("y[o] = W[o,i] x[i]", factors=dict(W=tied.weight))
    assert info(shared)["expr"] is None  # no expression (two operators share a parameter), but every other fact
    assert info(shared)["num_params"] == 6


def test_python_dash_m() -> None:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "structmat", "info", "dense(1000000, 8) @ dense(8, 1000000)", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    assert facts["num_params"] == 16 * 10**6 and facts["flops"] == 32 * 10**6 and facts["speedup"] == 62500.0


@pytest.mark.parametrize("name", sorted(ZOO))
def test_info_describes_every_zoo_operator(name: str) -> None:
    op = build(name)
    facts = info(op, batch=2)
    assert facts["expr"] is not None
    again = info(sm.parse(facts["expr"], device="meta"), batch=2)
    assert again == facts


class _ClosedPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_broken_pipe_exits_quietly(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert main(["info", "dense(5, 2) @ dense(2, 7)"]) == EXIT_BROKEN_PIPE == 141
    assert main(["--help"]) == EXIT_BROKEN_PIPE


def test_broken_pipe_into_a_reader_that_closes_early() -> None:
    """``structmat info ... | head``: the reader takes a few bytes and exits; the writer stops without a traceback."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    text = " + ".join(["identity(3)"] * 3000)  # ~340 kB of output: more than a pipe holds, so the writer must notice
    reader = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.buffer.read(10)"], stdin=subprocess.PIPE, cwd=ROOT
    )
    writer = subprocess.Popen(
        [sys.executable, "-m", "structmat", "info", text],
        stdout=reader.stdin,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    assert reader.stdin is not None
    reader.stdin.close()  # only the writer holds the pipe's write end now
    _, err = writer.communicate(timeout=120)
    reader.wait(timeout=60)
    assert err.decode() == ""  # no BrokenPipeError traceback, no "Exception ignored" at exit
    assert writer.returncode == EXIT_BROKEN_PIPE


def test_info_shared_operator_and_huge_axis_permutation(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "info", "w = dense(6, 5); w @ w.T + identity(6)", "--json")
    assert code == 0 and err == ""
    facts = json.loads(out)
    assert facts["expr"] == "v1 = dense(6, 5); v1 @ v1.T + identity(6)" and facts["num_params"] == 30
    code, out, err = run(capsys, "info", "permute_axes([100000, 100000], [1, 0]) @ dense(10000000000, 3)", "--json")
    assert code == 0 and err == ""
    facts = json.loads(out)
    assert facts["shape"] == [10**10, 3] and facts["rank_bound"] == 3 and facts["num_params"] == 3 * 10**10
