"""The in-context regression experiment, the shared training loop, the reporting and the command line."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from structmat_attention import standard_attention
from structmat_attention.experiments import _report, icl
from structmat_attention.experiments._cli import main
from structmat_attention.experiments._train import TrainConfig, fit, shard, transformer_cost, zero_attention_outputs

# -- the task ----------------------------------------------------------------------------------------------------------


def test_regression_task_statistics():
    d, n, batch = 7, 5, 20000
    tokens, y = icl.RegressionTask(d).sample(torch.Generator().manual_seed(0), batch, n)
    x = tokens[:, 0::2]
    assert tokens.shape == (batch, 2 * n, d)
    # x ~ N(0, I/d): mean 0, per-coordinate variance 1/d, independent coordinates
    assert abs(float(x.mean())) < 0.005  # the mean's standard error is 1/sqrt(d * batch * n * d) = 0.0005
    assert abs(float(x.var()) * d - 1) < 0.02
    cov = torch.cov(x.reshape(-1, d).T) * d
    assert torch.allclose(cov, torch.eye(d), atol=0.03)
    # y tokens: (y, 0, ..., 0); y = w . x with w ~ N(0, I): E[y^2] = 1, and w recovered exactly by least squares
    assert torch.equal(tokens[:, 1::2, 0], y) and bool((tokens[:, 1::2, 1:] == 0).all())
    assert abs(float(y.square().mean()) - 1) < 0.03
    more = icl.RegressionTask(d).sample(torch.Generator().manual_seed(1), 2, 2 * d)
    xw, yw = more[0][:, 0::2].double(), more[1].double()
    w = torch.linalg.lstsq(xw, yw.unsqueeze(-1)).solution  # 2d points determine w
    assert torch.allclose(xw @ w, yw.unsqueeze(-1), atol=1e-8)


def test_regression_task_curriculum_zeros_the_extra_coordinates():
    tokens, y = icl.RegressionTask(6).sample(torch.Generator().manual_seed(3), 4000, 4, dims=2)
    assert bool((tokens[:, 0::2, 2:] == 0).all())
    assert abs(float(y.square().mean()) - 2 / 6) < 0.03  # E[y^2] = dims / d
    with pytest.raises(ValueError, match=r"dims must be in 1 \.\. d=6, got 7"):
        icl.RegressionTask(6).sample(torch.Generator(), 1, 2, dims=7)
    with pytest.raises(ValueError, match=r"RegressionTask: d must be >= 1, got 0"):
        icl.RegressionTask(0)


def test_same_generator_seed_same_prompts():
    a = icl.RegressionTask(5).sample(torch.Generator().manual_seed(9), 3, 4)
    b = icl.RegressionTask(5).sample(torch.Generator().manual_seed(9), 3, 4)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_curriculum_grows_from_start_to_full():
    c = dict(d=12, steps=100, curriculum_fraction=0.5, curriculum_dims=4, curriculum_points=8)
    sched = [icl._curriculum(c, s) for s in range(100)]
    assert sched[0] == (4, 8) and sched[50] == (12, 24) and sched[-1] == (12, 24)
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(sched, sched[1:]))


# -- the model and variants --------------------------------------------------------------------------------------------


def test_model_predicts_each_y_from_earlier_tokens_only():
    torch.manual_seed(0)
    model = icl.ICLModel(3, 12, 2, 10, lambda w: standard_attention(w, 3))
    torch.nn.init.normal_(model.read_out.weight)  # the zero readout would hide everything
    tokens = torch.randn(2, 10, 3)
    out = model(tokens)
    assert out.shape == (2, 5)
    changed = tokens.clone()
    changed[:, 5:] += 1.0  # y_2 and everything after: predictions at x_0, x_1, x_2 (positions 0, 2, 4) must not move
    out2 = model(changed)
    assert torch.allclose(out[:, :3], out2[:, :3], atol=1e-6)
    assert not torch.allclose(out[:, 3:], out2[:, 3:])


def test_model_starts_at_zero_prediction():
    model = icl.ICLModel(3, 12, 1, 8, lambda w: standard_attention(w, 2))
    assert torch.equal(model(torch.randn(2, 8, 3)), torch.zeros(2, 4))


@pytest.mark.parametrize(
    "variant, width, name, score_width",
    [
        ("standard-h4", 20, "LowRank(20, 20, rank=5, heads=4)", 5),
        ("btt-h2", 16, "BTT(16, 16, ranks=[1], heads=2)", 16),  # full rank: query side is the raw token
        ("mlr-h2", 16, "MLR(16, 16, ranks=[4, 2, 2], blocks=[1, 2, 4], heads=2)", 4 + 4 + 8),
    ],
)
def test_build_attention_uses_the_package_constructors(variant, width, name, score_width):
    layer = icl.build_attention(variant, width)
    assert layer.levels[0].op.name == name and layer.qk_norm and layer.causal
    heads = layer.n_heads
    # every pair (the cost counts them before the causal mask, as the layer computes them) x the cut width
    assert layer.cost(7)["scores[0]"].macs == heads * 7 * 7 * score_width


@pytest.mark.parametrize("bad", ["standard", "btt-h0", "lowrank-h2", "mlr-2", 3])
def test_unknown_variant_is_named(bad):
    with pytest.raises(ValueError, match=r"icl: unknown variant .*standard-h16, btt-h2, mlr-h2"):
        icl.parse_variant(bad)


def test_variant_heads_must_divide_width():
    with pytest.raises(ValueError, match=r"variant .standard-h3. needs a width divisible by 3 heads, got width 16"):
        icl.build_attention("standard-h3", 16)


# -- the shared loop ---------------------------------------------------------------------------------------------------


def test_train_config_checks_and_schedule():
    c = TrainConfig(steps=10, batch_size=4, lr=1e-2, base_width=8, eval_every=4, warmup=2, final_lr_ratio=0.1)
    assert c.eval_steps() == [0, 4, 8, 10]
    assert [round(c.lr_factor(s), 6) for s in (0, 1)] == [0.5, 1.0]
    assert c.lr_factor(2) == pytest.approx(1.0) and c.lr_factor(10) == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"TrainConfig: steps must be >= 1, got 0"):
        TrainConfig(steps=0, batch_size=4, lr=1e-2, base_width=8, eval_every=4)
    with pytest.raises(ValueError, match=r"TrainConfig: lr must be a finite number > 0, got nan"):
        TrainConfig(steps=3, batch_size=4, lr=float("nan"), base_width=8, eval_every=4)
    with pytest.raises(ValueError, match=r"warmup must be an int in 0 \.\. steps=3, got 5"):
        TrainConfig(steps=3, batch_size=4, lr=1e-2, base_width=8, eval_every=4, warmup=5)


def test_shard_splits_the_global_batch():
    batch = {"x": torch.arange(12).reshape(6, 2), "y": (torch.arange(6),)}
    parts = [shard(batch, k, 3) for k in range(3)]
    assert torch.equal(torch.cat([p["x"] for p in parts]), batch["x"])
    assert parts[2]["y"][0].tolist() == [4, 5]
    with pytest.raises(ValueError, match=r"a global batch of 6 examples does not split over 4 processes"):
        shard(batch, 0, 4)


def _fit_regression() -> list[dict]:
    """A small MLP fitted to a linear map through ``fit``, from a fixed seed."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    w = torch.randn(3, 1)

    def sample(step):
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(step))
        return x, x @ w

    held = sample(999)
    return fit(
        model,
        TrainConfig(steps=40, batch_size=8, lr=1e-2, base_width=4, eval_every=20, grad_clip=None),
        sample,
        lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]),
        lambda m: {"mse": float(torch.nn.functional.mse_loss(m(held[0]), held[1]))},
        tokens_per_example=2,
        progress=False,
    )


def test_fit_records_and_reproducibility():
    recs = _fit_regression()
    assert [r["step"] for r in recs] == [0, 20, 40]
    assert recs[0]["train_loss"] is None and recs[-1]["tokens"] == 40 * 8 * 2
    assert recs[-1]["mse"] < recs[0]["mse"]  # it learns
    again = _fit_regression()  # the same seed gives the same records
    assert [r["mse"] for r in recs] == pytest.approx([r["mse"] for r in again], rel=1e-6)


def test_fit_uses_mup_rates_per_tensor():
    from structmat_attention.experiments._train import _optimizer

    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Linear(16, 1))
    opt = _optimizer(model, TrainConfig(steps=1, batch_size=1, lr=0.1, base_width=4, eval_every=1))
    rates = {n: g["lr"] for g in opt.param_groups for n in g["names"]}
    assert rates == pytest.approx({"0.weight": 0.1 * 4 / 3, "1.weight": 0.1 * 4 / 16, "0.bias": 0.1, "1.bias": 0.1})


def test_fit_refuses_a_diverging_loss():
    model = torch.nn.Linear(2, 1)
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-3, base_width=2, eval_every=1)
    with pytest.raises(FloatingPointError, match=r"the training loss is nan at step 0"):
        fit(model, cfg, lambda s: torch.ones(2, 2), lambda m, b: m(b).sum() * float("nan"), lambda m: {},
            tokens_per_example=1, progress=False)  # fmt: skip


def test_zero_attention_outputs_and_cost_from_the_layers():
    model = icl.ICLModel(3, 12, 2, 8, lambda w: standard_attention(w, 3))
    assert zero_attention_outputs(model) == 2
    assert all(float(b.attn.output.dense().detach().abs().sum()) == 0 for b in model.blocks)
    t = 8
    flops, macs = transformer_cost(model.blocks, t)
    # hand count per block: q, k, v, o projections 4 * 12 * 12 MACs per token; scores and P@V: all 64 pairs of
    # 3 heads x 4 dims each, counted before the causal mask; MLP 2 * 12 * 48 per token
    per_block_macs = 4 * 144 * t + 2 * 3 * t * t * 4 + 2 * 12 * 48 * t
    assert macs == 2 * per_block_macs // t
    assert flops > 2 * macs  # the softmax and QK norm add non-MAC FLOPs


# -- reporting and the command line ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("icl")
    assert main(["icl", "--preset", "smoke", "--out", str(out), "--no-progress", "--jobs", "1"]) == 0
    return out


def test_smoke_run_writes_records_summary_and_plot(smoke_run):
    records = _report.read_records(smoke_run / "results.jsonl")
    preset = icl.PRESETS["smoke"]
    assert len(records) == len(preset.variants) * len(TrainConfig(
        steps=preset.steps, batch_size=1, lr=1, base_width=1, eval_every=preset.eval_every).eval_steps())  # fmt: skip
    for r in records:
        assert set(_report.RECORD_FIELDS) <= set(r), set(_report.RECORD_FIELDS) - set(r)
        assert r["experiment"] == "icl" and r["metric"] == "last_mse" and r["value"] == r["last_mse"]
        assert r["train_flops"] == 3 * r["flops_per_token"] * r["tokens"]
    assert {r["variant"] for r in records} == set(preset.variants)
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert summary["experiment"] == "icl" and len(summary["final"]) == len(preset.variants)
    assert (smoke_run / "metric_vs_compute.png").stat().st_size > 1000


def test_same_seed_same_results(smoke_run, tmp_path):
    assert main(["icl", "--preset", "smoke", "--out", str(tmp_path), "--no-progress", "--no-plots", "--jobs", "1"]) == 0
    a = _report.read_records(smoke_run / "results.jsonl")
    b = _report.read_records(tmp_path / "results.jsonl")
    assert [(r["variant"], r["step"]) for r in a] == [(r["variant"], r["step"]) for r in b]
    assert [r["value"] for r in a] == pytest.approx([r["value"] for r in b], rel=1e-5)


def test_report_redraws_from_json(smoke_run, capsys):
    (smoke_run / "metric_vs_compute.png").unlink()
    assert main(["report", str(smoke_run)]) == 0
    assert (smoke_run / "metric_vs_compute.png").is_file()
    table = capsys.readouterr().out
    assert "last_mse mean ± std" in table and "btt-h1" in table


def test_report_of_a_missing_run_is_an_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "results.jsonl does not exist" in capsys.readouterr().err
    (tmp_path / "results.jsonl").write_text('{"variant": "a", "value": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"results.jsonl line 2 is not JSON"):
        _report.read_records(tmp_path / "results.jsonl")


def test_parallel_jobs_give_the_same_results(smoke_run, tmp_path):
    args = ["icl", "--preset", "smoke", "--out", str(tmp_path), "--no-progress", "--no-plots", "--jobs", "2"]
    assert main([*args, "--threads", "1", "--variants", "btt-h1", "standard-h8"]) == 0
    a = {(r["variant"], r["step"]): r["value"] for r in _report.read_records(smoke_run / "results.jsonl")}
    b = {(r["variant"], r["step"]): r["value"] for r in _report.read_records(tmp_path / "results.jsonl")}
    assert b == pytest.approx({k: a[k] for k in b}, rel=1e-5)


def test_bad_variant_on_the_command_line(tmp_path, capsys):
    assert main(["icl", "--preset", "smoke", "--out", str(tmp_path), "--variants", "standard-h3"]) == 2
    assert "needs a width divisible by 3 heads, got width 16" in capsys.readouterr().err


def test_final_results_aggregate_seeds():
    recs = [
        dict(variant=v, width=8, seed=s, step=10, value=val, metric="m", wall_time=1.0)
        for v, s, val in [("a", 0, 1.0), ("a", 1, 2.0), ("a", 2, 6.0), ("b", 0, 0.5)]
    ]
    rows = _report.final_results(recs)
    assert [r["variant"] for r in rows] == ["b", "a"]  # best first
    assert rows[1]["mean"] == pytest.approx(3.0) and rows[1]["std"] == pytest.approx(math.sqrt(7.0))
    assert rows[1]["min"] == 1.0 and rows[1]["max"] == 6.0 and rows[1]["n"] == 3


def test_model_factory_partial_is_picklable():
    import pickle

    f = functools.partial(icl._attention, "btt-h2", True)
    assert pickle.loads(pickle.dumps(f))(16).n_heads == 2


def test_final_results_select_by_validation():
    recs = [
        dict(variant="a", width=8, seed=s, step=t, value=v, val=u, metric="m", wall_time=float(t))
        for s, t, v, u in [(0, 0, 5.0, 9.0), (0, 10, 1.0, 2.0), (0, 20, 3.0, 4.0), (1, 0, 4.0, 1.0), (1, 10, 2.0, 1.0)]
    ]
    last = _report.final_results(recs)[0]
    assert last["values"] == [3.0, 2.0] and last["selected_steps"] == [20, 10]
    chosen = _report.final_results(recs, select_by="val")[0]
    # seed 0: lowest val at step 10; seed 1: a tie, the earliest point wins
    assert chosen["values"] == [1.0, 4.0] and chosen["selected_steps"] == [10, 0] and chosen["selected_by"] == "val"
    assert chosen["wall_time_mean"] == 15.0  # whole runs (20 and 10 s), not the chosen points


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seeds", "0"], "--seeds must be >= 1, got 0"),
        (["--jobs", "0"], "--jobs must be >= 1, got 0"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--eval-every", "-2"], "--eval-every must be >= 1, got -2"),
        (["--lr", "-1"], "lr must be > 0, got -1.0"),
        (["--widths", "0"], "widths must be >= 1, got \\[0\\]"),
    ],
)
def test_bad_numbers_on_the_command_line(tmp_path, capsys, extra, message):
    assert main(["icl", "--preset", "smoke", "--out", str(tmp_path), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("structmat-attention icl: ") and message.replace("\\", "") in err
    assert not (tmp_path / "results.jsonl").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_cuda(tmp_path, capsys):
    assert main(["icl", "--preset", "smoke", "--out", str(tmp_path), "--device", "cuda"]) == 2
    assert "--device cuda but CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("experiment", ["icl", "lm"])
def test_steps_and_eval_every_on_the_command_line(tmp_path, experiment):
    args = [experiment, "--preset", "smoke", "--out", str(tmp_path), "--no-progress", "--no-plots", "--jobs", "1"]
    assert main([*args, "--steps", "4", "--eval-every", "3", "--seeds", "1", "--variants", icl_or_lm(experiment)]) == 0
    records = _report.read_records(tmp_path / "results.jsonl")
    assert [r["step"] for r in records] == [0, 3, 4]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert all(run["config"]["steps"] == 4 and run["config"]["warmup"] <= 4 for run in summary["runs"])


def icl_or_lm(experiment: str) -> str:
    return "btt-h1" if experiment == "icl" else "mlr"
