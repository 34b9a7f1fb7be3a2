"""DistributedDataParallel on CPU (gloo, 2 processes): the LM experiment trains exactly as one process does.

Each rank draws the same global batch and keeps its half (:func:`~structmat_attention.experiments._train.shard`);
DDP averages the halves' gradients, which is the gradient of the global batch's mean loss. So the replicas must stay
identical and the recorded losses must equal a single-process run on the same global batches.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from structmat_attention.experiments import _report, lm
from structmat_attention.experiments._cli import main
from structmat_attention.experiments._runner import RunSpec
from structmat_attention.experiments._train import fit

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

STEPS = 4


@pytest.fixture(autouse=True)
def _keep_threads():
    """The runs set torch's thread count; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _spec(variant: str = "mlr") -> RunSpec:
    preset = lm.PRESETS["smoke"]
    config = {
        "width": preset.widths[0],
        "text": None,
        "d_head": preset.d_head,
        "n_layers": 2,
        "seq_len": preset.seq_len,
        "batch_size": 8,
        "steps": STEPS,
        "lr": 3e-3,
        "base_width": 16,
        "warmup": 1,
        "eval_every": 2,
        "eps": 1e-8,
        "mlr_ranks": list(preset.mlr_ranks),
        "window": preset.window,
        "byte_budget": preset.byte_budget,
        "chunk_chars": preset.chunk_chars,
        "val_windows": 8,
    }
    return RunSpec("lm", variant, 3, "smoke", "cpu", config)


def _train(spec: RunSpec) -> tuple[dict[str, torch.Tensor], list[dict]]:
    run = lm.prepare(spec)
    records = fit(run.model, run.config, run.sample, run.loss, run.evaluate, tokens_per_example=32, progress=False)
    return {k: v.detach().clone() for k, v in run.model.state_dict().items()}, records


def _worker(index: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=index, world_size=world)
    try:
        state, records = _train(_spec())
        torch.save({"state": state, "records": records}, Path(out) / f"rank{index}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{k}.pt", weights_only=False) for k in range(2)]
    state, records = _train(_spec())
    # the replicas hold the same parameters after training, and those of the single-process run
    for name, value in state.items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
        # float noise only: the two runs reduce the gradients in a different order, and Adam's normalized steps
        # (lr * 16 / rank = 0.024 for the rank-2 MLR factors) carry the last-bit differences into the weights
        torch.testing.assert_close(ranks[0]["state"][name], value, rtol=1e-4, atol=1e-4, msg=name)
    assert float(state["head.weight"].abs().sum()) > 0  # training moved the zero-initialized head
    # the recorded losses of both ranks equal the single-process run's
    assert [r["step"] for r in records] == [0, 2, 4]
    for got in (ranks[0]["records"], ranks[1]["records"]):
        assert [r["step"] for r in got] == [r["step"] for r in records]
        assert [r["tokens"] for r in got] == [r["tokens"] for r in records]
        for a, b in zip(got, records):
            assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
            if b["train_loss"] is None:
                assert a["train_loss"] is None
            else:
                assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)


def test_torchrun_end_to_end(tmp_path):
    args = ["lm", "--preset", "smoke", "--variants", "gswa", "--no-progress", "--no-plots"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # `torchrun` is `python -m torch.distributed.run`; this interpreter's, so the same install runs
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "structmat_attention",
        *args,
    ]
    done = subprocess.run(
        [*command, "--out", str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["results.jsonl", "summary.json"]
    records = _report.read_records(tmp_path / "ddp" / "results.jsonl")
    preset = lm.PRESETS["smoke"]
    assert len(records) == preset.steps // preset.eval_every + 1  # written once, by rank 0
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["environment"]["world_size"] == 2
    # the same run in one process gives the same numbers
    assert main([*args, "--jobs", "1", "--threads", "1", "--out", str(tmp_path / "one")]) == 0
    single = _report.read_records(tmp_path / "one" / "results.jsonl")
    assert [(r["variant"], r["step"]) for r in records] == [(r["variant"], r["step"]) for r in single]
    for a, b in zip(records, single):
        assert a["value"] == pytest.approx(b["value"], abs=1e-5)
        assert a["tokens"] == b["tokens"]
