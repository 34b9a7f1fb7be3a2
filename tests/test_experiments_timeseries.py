"""The ETT time-series experiment: the loader and its split, the windows, the models and the smoke preset end to end."""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from structmat_attention.experiments import _report
from structmat_attention.experiments import timeseries as ts
from structmat_attention.experiments._cli import main
from structmat_attention.experiments._runner import RunSpec

ETTH1 = Path(__file__).resolve().parents[2] / "shared" / "data" / "ETT" / "ETTh1.csv"
if not ETTH1.is_file():
    ETTH1 = Path("/work/shared/data/ETT/ETTh1.csv")
needs_ett = pytest.mark.skipif(not ETTH1.is_file(), reason="ETTh1.csv (shared data) is not available")


def _raw_ot(path: Path) -> list[float]:
    """The OT column read independently (csv.DictReader)."""
    with open(path, newline="") as f:
        return [float(row["OT"]) for row in csv.DictReader(f)]


def _write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


# -- the loader --------------------------------------------------------------------------------------------------------
@needs_ett
@pytest.mark.parametrize("input_len", [96, 336])
def test_standard_split_sizes(input_len):
    data = ts.load_ett(ETTH1, input_len, 96)
    assert data.series.shape == (17420,)
    assert data.splits == {"train": (0, 8640), "val": (8640 - input_len, 11520), "test": (11520 - input_len, 14400)}
    assert data.segment("train").numel() == 8640
    assert data.segment("val").numel() == 2880 + input_len
    assert data.segment("test").numel() == 2880 + input_len
    # windows: rows - (L + H) + 1; validation/test count does not depend on L (the look-back)
    assert data.n_windows("train") == 8640 - input_len - 96 + 1
    assert data.n_windows("val") == data.n_windows("test") == 2880 - 96 + 1


@needs_ett
def test_standardized_with_train_statistics():
    raw = _raw_ot(ETTH1)
    mean, std = statistics.fmean(raw[:8640]), statistics.pstdev(raw[:8640])
    data = ts.load_ett(ETTH1, 96, 96)
    assert data.mean == pytest.approx(mean, rel=1e-9) and data.std == pytest.approx(std, rel=1e-9)
    train = data.segment("train").double()
    assert abs(float(train.mean())) < 1e-5 and float(train.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
    # the other splits use the same (train) statistics: row 12000 by hand
    assert float(data.series[12000]) == pytest.approx((raw[12000] - mean) / std, abs=1e-5)
    assert abs(float(data.segment("test").mean())) > 0.1  # not re-standardized on its own


@needs_ett
def test_windows_align_with_the_raw_csv():
    raw = _raw_ot(ETTH1)
    L, H = 48, 24
    data = ts.load_ett(ETTH1, L, H)

    def std(v: float) -> float:
        return (v - data.mean) / data.std

    # the first test window's input is the L rows before row 11520 (the look-back), its target rows 11520 ..
    x, y = ts.split_windows(data, "test", torch.tensor([0, 5]))
    assert x[0].tolist() == pytest.approx([std(v) for v in raw[11520 - L : 11520]], abs=1e-5)
    assert y[0].tolist() == pytest.approx([std(v) for v in raw[11520 : 11520 + H]], abs=1e-5)
    assert y[1].tolist() == pytest.approx([std(v) for v in raw[11525 : 11525 + H]], abs=1e-5)
    # the last test window's target ends at row 14400 (exclusive)
    last = data.n_windows("test") - 1
    _, y_last = ts.split_windows(data, "test", torch.tensor([last]))
    assert y_last[0].tolist() == pytest.approx([std(v) for v in raw[14400 - H : 14400]], abs=1e-5)
    # train window k: rows k .. k+L-1 then k+L .. k+L+H-1
    xt, yt = ts.split_windows(data, "train", torch.tensor([1000]))
    assert xt[0].tolist() == pytest.approx([std(v) for v in raw[1000 : 1000 + L]], abs=1e-5)
    assert yt[0].tolist() == pytest.approx([std(v) for v in raw[1000 + L : 1000 + L + H]], abs=1e-5)
    # all windows (stride 1) by default
    xa, ya = ts.split_windows(data, "val")
    assert xa.shape == (2880 - H + 1, L) and ya.shape == (2880 - H + 1, H)


@needs_ett
def test_training_batches_are_deterministic_in_seed_and_step():
    data = ts.load_ett(ETTH1, 32, 8)
    sample = ts._sampler(data, 16, seed=3)
    a, b = sample(7), sample(7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(sample(8)[0], a[0])
    assert not torch.equal(ts._sampler(data, 16, seed=4)(7)[0], a[0])
    # every training window lies in the training rows: its target is the L-shifted continuation
    x, y = a
    series = data.segment("train")
    for row_x, row_y in zip(x, y):
        start = int(torch.nonzero((series.unfold(0, 32, 1) == row_x).all(dim=1))[0])
        assert torch.equal(series[start + 32 : start + 40], row_y)


def test_read_ett_ot_reads_the_columns(tmp_path):
    p = _write_csv(tmp_path / "ok.csv", "date,HUFL,OT", ["2016-07-01 00:00:00,1.0,30.5", "2016-07-01 01:00:00,2,-1e1"])
    assert ts.read_ett_ot(p) == (["2016-07-01 00:00:00", "2016-07-01 01:00:00"], [30.5, -10.0])


def test_bad_csvs_are_rejected(tmp_path):
    rows = ["2016-07-01 00:00:00,1.0,30.5", "2016-07-01 01:00:00,2.0,27.7"]
    with pytest.raises(ValueError, match=r"missing\.csv does not exist"):
        ts.load_ett(tmp_path / "missing.csv", 96, 96)
    no_ot = _write_csv(tmp_path / "no_ot.csv", "date,HUFL,LUFL", rows)
    with pytest.raises(ValueError, match=r"no_ot\.csv has no 'OT' column \(columns: date, HUFL, LUFL\)"):
        ts.load_ett(no_ot, 96, 96)
    no_date = _write_csv(tmp_path / "no_date.csv", "time,HUFL,OT", rows)
    with pytest.raises(ValueError, match=r"no_date\.csv has no 'date' column"):
        ts.load_ett(no_date, 96, 96)
    nan = _write_csv(tmp_path / "nan.csv", "date,HUFL,OT", [*rows, "2016-07-01 02:00:00,1.0,nan"])
    with pytest.raises(ValueError, match=r"nan\.csv line 4: OT value 'nan' is NaN or infinite"):
        ts.load_ett(nan, 96, 96)
    empty = _write_csv(tmp_path / "empty_value.csv", "date,HUFL,OT", [rows[0], "2016-07-01 01:00:00,1.0,"])
    with pytest.raises(ValueError, match=r"empty_value\.csv line 3: OT value '' is not a number"):
        ts.load_ett(empty, 96, 96)
    text = _write_csv(tmp_path / "text.csv", "date,HUFL,OT", [rows[0], "2016-07-01 01:00:00,1.0,warm"])
    with pytest.raises(ValueError, match=r"text\.csv line 3: OT value 'warm' is not a number"):
        ts.load_ett(text, 96, 96)
    short = _write_csv(tmp_path / "short.csv", "date,HUFL,OT", rows * 100)
    with pytest.raises(ValueError, match=r"short\.csv is too short: 200 rows, the standard split needs 14400"):
        ts.load_ett(short, 96, 96)
    blank = tmp_path / "blank.csv"
    blank.write_text("")
    with pytest.raises(ValueError, match=r"blank\.csv is empty"):
        ts.load_ett(blank, 96, 96)


@needs_ett
def test_lengths_too_long_for_the_split_are_rejected():
    with pytest.raises(ValueError, match=r"ETTh1\.csv is too short for input_len=8600 \+ horizon=96"):
        ts.load_ett(ETTH1, 8600, 96)
    with pytest.raises(ValueError, match=r"too short for input_len=96 \+ horizon=3000"):
        ts.load_ett(ETTH1, 96, 3000)
    with pytest.raises(ValueError, match=r"input_len must be >= 1, got 0"):
        ts.load_ett(ETTH1, 0, 96)
    with pytest.raises(TypeError, match=r"horizon must be an int, got float"):
        ts.load_ett(ETTH1, 96, 96.0)


# -- the models --------------------------------------------------------------------------------------------------------
def test_moving_average_matches_a_hand_written_reference():
    x = torch.randn(3, 40, dtype=torch.float64)
    k = 25
    half = (k - 1) // 2
    expected = torch.empty_like(x)
    for b in range(3):
        for t in range(40):
            # positions t-12 .. t+12, clamped to the series' ends (the end values repeated)
            window = [float(x[b, min(max(t + o, 0), 39)]) for o in range(-half, half + 1)]
            expected[b, t] = sum(window) / k
    assert torch.allclose(ts.moving_average(x, k), expected)
    with pytest.raises(ValueError, match=r"moving_average: kernel must be an odd int >= 1, got 4"):
        ts.moving_average(x, 4)


def test_dlinear_is_trend_plus_seasonal_linear_maps():
    torch.manual_seed(0)
    model = ts.DLinear(30, 5)
    x = torch.randn(4, 30)
    trend = ts.moving_average(x, 25)
    expected = trend @ model.trend.weight.T + model.trend.bias + (x - trend) @ model.seasonal.weight.T
    assert torch.allclose(model(x), expected + model.seasonal.bias, atol=1e-6)
    assert model.macs_per_window() == 2 * 30 * 5


def test_naive_repeats_the_last_value():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, -6.0]])
    assert ts.NaiveLast(4)(x).tolist() == [[3.0] * 4, [-6.0] * 4]


def test_patch_transformer_starts_at_the_window_mean_and_denormalizes():
    torch.manual_seed(0)
    model = ts.PatchTransformer(
        40, 6, patch_len=8, stride=4, width=8, depth=1, heads=2, attention="mlr", mlr_ranks=(2, 1, 1)
    )
    assert model.n_patches == (40 - 8) // 4 + 1
    assert [lv.block_size for lv in model.blocks[0].attn.levels] == [None, 4, 2]
    assert not model.blocks[0].attn.causal and model.blocks[0].attn.qk_norm
    x = torch.randn(3, 40) * 5 + 2
    # zero head: the forecast is the window's own mean
    assert torch.allclose(model(x), x.mean(dim=1, keepdim=True).expand(3, 6), atol=1e-5)
    # shifting and scaling a window shifts and scales its forecast (per-window normalization)
    with torch.no_grad():
        model.head.weight.normal_()
    assert torch.allclose(model(3 * x + 7), 3 * model(x) + 7, atol=1e-3)
    # patches are aligned to the window's end: the oldest values beyond the patches do not matter
    odd = ts.PatchTransformer(42, 6, patch_len=8, stride=4, width=8, depth=1, heads=2)
    with torch.no_grad():
        odd.head.weight.normal_()
    y = torch.randn(2, 42)
    z = y.clone()
    z[:, :2] = 100.0
    assert odd.n_patches == 9 and odd.span == 40
    assert torch.equal(odd(y), odd(z)) and not torch.equal(odd(y), odd(y + torch.linspace(0, 1, 42)))


def test_patch_transformer_rejects_a_bad_attention():
    with pytest.raises(ValueError, match=r"attention must be 'standard' or 'mlr', got 'btt'"):
        ts.PatchTransformer(32, 4, patch_len=8, stride=4, width=8, depth=1, heads=2, attention="btt")
    with pytest.raises(ValueError, match=r"n_patches\(input_len=4, patch_len=8, stride=4\): patch_len must be <="):
        ts.n_patches(4, 8, 4)


def test_evaluate_windows_against_a_direct_computation():
    series = torch.randn(200)
    data = ts.ETTData("x", 10, 4, series, 0.0, 1.0, {"train": (0, 100), "val": (90, 150), "test": (140, 200)})
    model = ts.NaiveLast(4)
    got = ts.evaluate_windows(model, data, batch=7)
    errs = []
    for k in range(60 - 14 + 1):  # every test window
        last = float(series[140 + k + 9])
        errs += [float(series[140 + k + 10 + h]) - last for h in range(4)]
    assert got["test_mse"] == pytest.approx(sum(e * e for e in errs) / len(errs), rel=1e-6)
    assert got["test_mae"] == pytest.approx(sum(abs(e) for e in errs) / len(errs), rel=1e-6)
    sub = ts.evaluate_windows(model, data, limit=5)
    starts = ts._eval_starts(47, 5)
    assert starts.tolist() == [0, 12, 23, 34, 46]
    errs5 = [float(series[140 + k + 10 + h]) - float(series[140 + k + 9]) for k in starts.tolist() for h in range(4)]
    assert sub["test_mse"] == pytest.approx(sum(e * e for e in errs5) / len(errs5), rel=1e-6)


# -- planning and the command ------------------------------------------------------------------------------------------
def _args(**kw):
    base = dict(
        preset="smoke", variants=None, seed=0, seeds=None, device="cpu", data=ETTH1, horizon=96, input_lengths=None
    )
    return argparse.Namespace(**{**base, **kw})


@needs_ett
def test_plan_covers_lengths_variants_and_seeds():
    specs = ts.plan(_args(seeds=2))
    got = sorted((s.config["input_len"], s.variant, s.seed) for s in specs)
    expected = sorted((L, v, s) for L in (32, 48) for v in ("standard", "mlr", "dlinear") for s in (0, 1))
    assert got == sorted(expected + [(32, "naive", 0), (48, "naive", 0)])
    assert specs[-1].variant == "naive" and specs[0].config["input_len"] == 48  # slowest first
    with pytest.raises(ValueError, match=r"unknown variants \['gswa'\]"):
        ts.plan(_args(variants=["gswa"]))
    with pytest.raises(ValueError, match=r"input length 8 gives 1 patches, too few for 3 MLR levels \(needs >= 4\)"):
        ts.plan(_args(input_lengths=[8]))
    with pytest.raises(ValueError, match=r"input length 4 is shorter than the preset's patch_len=8"):
        ts.plan(_args(input_lengths=[4]))


def test_presets_are_consistent():
    for name, p in ts.PRESETS.items():
        assert sum(p.mlr_ranks) == p.width // p.heads, name
        assert p.horizon == 96 and set(p.variants) == set(ts.VARIANTS), name
        assert ts.TimeSeriesPreset.from_dict(json.loads(json.dumps(p.as_dict()))) == p
    assert ts.PRESETS["paper"].input_lengths == (96, 192, 336, 720)


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@needs_ett
def test_smoke_preset_through_the_command_line(tmp_path, capsys, keep_threads):
    out = tmp_path / "run"
    status = main(
        [
            "timeseries",
            "--preset",
            "smoke",
            "--data",
            str(ETTH1),
            "--out",
            str(out),
            "--no-progress",
            "--jobs",
            "1",
            "--threads",
            "1",
        ]
    )
    assert status == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for r in records:
        assert set(_report.RECORD_FIELDS) | {"input_len", "test_mae", "val_mse", "n_patches"} <= set(r)
        assert r["experiment"] == "timeseries" and r["metric"] == "test_mse" and r["value"] == r["test_mse"]
        assert math.isfinite(r["value"]) and r["horizon"] == 96
    runs = {(r["variant"], r["input_len"]) for r in records}
    assert runs == {(v, L) for v in ts.VARIANTS for L in (32, 48)}
    naive = [r for r in records if r["variant"] == "naive"]
    assert all(r["step"] == 0 and r["params"] == 0 and r["flops_per_token"] == 0 and r["width"] is None for r in naive)
    # naive does not depend on L: the same test targets and last values (64 evenly spaced test windows)
    assert naive[0]["value"] == pytest.approx(naive[1]["value"]) and naive[0]["n_test_windows"] == 64
    trained = [r for r in records if r["variant"] == "standard"]
    assert {r["step"] for r in trained} == {0, 3, 6} and trained[0]["width"] == 16
    n = {32: 7, 48: 11}
    assert all(
        r["n_patches"] == n[r["input_len"]] and r["tokens"] == r["step"] * 8 * n[r["input_len"]] for r in trained
    )
    dl = [r for r in records if r["variant"] == "dlinear" and r["input_len"] == 48]
    assert dl[0]["macs_per_token"] == 2 * 48 * 96 // 11 and dl[0]["params"] == 2 * (48 * 96 + 96)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experiment"] == "timeseries" and len(summary["final"]) == 8
    assert (out / "metric_vs_compute.png").stat().st_size > 0
    assert (out / "metric_vs_input_length.png").stat().st_size > 0
    assert "naive" in capsys.readouterr().out


def test_run_one_naive_needs_no_training(tmp_path):
    if not ETTH1.is_file():
        pytest.skip("ETTh1.csv is not available")
    config = {**ts.PRESETS["smoke"].as_dict(), "data": str(ETTH1), "horizon": 24, "input_len": 32, "eval_windows": None}
    static, records = ts.run_one(RunSpec("timeseries", "naive", 0, "smoke", "cpu", config), progress=False)
    assert static["n_test_windows"] == 2880 - 24 + 1 and static["width"] is None
    assert len(records) == 1 and records[0]["tokens"] == 0 and records[0]["train_loss"] is None


def test_command_line_reports_a_bad_file(tmp_path, capsys):
    no_ot = _write_csv(tmp_path / "no_ot.csv", "date,HUFL", ["2016-07-01 00:00:00,1.0"])
    status = main(["timeseries", "--preset", "smoke", "--data", str(no_ot), "--out", str(tmp_path / "run")])
    assert status == 2
    assert "no_ot.csv has no 'OT' column" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
