"""The character-level LM experiment: corpus loader, split, vocabulary, batches, and the smoke preset end to end."""

import argparse
import hashlib
import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch

from structmat_attention.experiments import _report, lm
from structmat_attention.experiments._cli import main

SHAKESPEARE = Path("/work/shared/data/text/tinyshakespeare.txt")


@pytest.fixture(autouse=True)
def _keep_threads():
    """The runs set torch's thread count; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# -- corpus ------------------------------------------------------------------------------------------------------------
def test_stdlib_files_sorted_and_without_site_packages():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = lm.stdlib_files()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel)
    assert all(r.endswith(".py") for r in rel)
    assert not any(part in ("site-packages", "dist-packages") for r in rel for part in r.split("/"))
    assert "os.py" in rel and "json/__init__.py" in rel


def test_stdlib_files_of_a_synthetic_tree(tmp_path):
    for rel in ["b.py", "a/z.py", "a/b.py", "A.py", "site-packages/x.py", "q/dist-packages/y.py", "c.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    got = [f.relative_to(tmp_path).as_posix() for f in lm.stdlib_files(tmp_path)]
    assert got == ["A.py", "a/b.py", "a/z.py", "b.py"]


def test_stdlib_text_deterministic_and_within_budget(tmp_path):
    (tmp_path / "a.py").write_bytes(b"x" * 30)
    (tmp_path / "b.py").write_bytes(b"y" * 30)
    (tmp_path / "c.py").write_bytes(b"z" * 30)
    assert lm.stdlib_text(45, tmp_path) == "x" * 30 + "y" * 15
    assert lm.stdlib_text(1000, tmp_path) == "x" * 30 + "y" * 30 + "z" * 30
    first = lm.stdlib_text(20_000)
    assert first == lm.stdlib_text(20_000)
    assert len(first.encode("utf-8")) <= 20_000 + 3 * first.count("\ufffd")
    data = b""
    for f in lm.stdlib_files():
        data += f.read_bytes()
        if len(data) >= 20_000:
            break
    assert first == data[:20_000].decode("utf-8", errors="replace")
    with pytest.raises(ValueError, match=r"lm.stdlib_text: byte_budget must be >= 1, got 0"):
        lm.stdlib_text(0)


def test_load_corpus_deterministic():
    lm.load_corpus.cache_clear()
    a = lm.load_corpus(None, 50_000, 1_000, 32)
    lm.load_corpus.cache_clear()
    b = lm.load_corpus(None, 50_000, 1_000, 32)
    assert a is not b
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.vocab == b.vocab and a.sha256 == b.sha256
    info = a.info()
    assert info["corpus_source"].startswith("stdlib:")
    assert info["train_chars"] + info["val_chars"] == info["corpus_chars"]
    assert info["vocab_size"] == len(a.vocab) and a.vocab[0] == lm.UNK


def test_split_sizes_computed_by_hand(tmp_path):
    # 2345 characters in chunks of 100: chunks 0..23 (the last one 45 long); chunks 9 and 19 go to validation.
    text = "".join(chr(ord("a") + (k * 7) % 26) for k in range(2345))
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    corpus = lm.build_corpus(lm.read_text(path), str(path), 100, 16)
    assert corpus.val.numel() == 200
    assert corpus.train.numel() == 2145
    assert corpus.n_chars == 2345
    assert corpus.sha256 == hashlib.sha256(text.encode()).hexdigest()[:16]
    train, val = lm.split_chunks(text, 100)
    assert val == text[900:1000] + text[1900:2000]
    assert train == text[:900] + text[1000:1900] + text[2000:]


def test_vocab_sorted_from_training_text_and_unknown_chars_map_to_unk():
    # chunks of 2: chunk 9 ("QZ", chars 18..19) is the only validation chunk and holds unseen characters.
    text = "ba" * 9 + "QZ" + "cb" * 5 + "ab" * 4
    corpus = lm.build_corpus(text, "demo", 2, 0)
    assert corpus.vocab == ("<unk>", "a", "b", "c")
    assert corpus.val.tolist() == [0, 0]
    table = {c: k for k, c in enumerate(corpus.vocab)}
    train_text, _ = lm.split_chunks(text, 2)
    assert corpus.train.tolist() == [table[c] for c in train_text]


def test_non_ascii_text_round_trips(tmp_path):
    text = ("héllo wörld — ∑ 😀 " * 200)[:3000]
    path = tmp_path / "u.txt"
    path.write_text(text, encoding="utf-8")
    corpus = lm.build_corpus(lm.read_text(path), str(path), 100, 16)
    train, val = lm.split_chunks(text, 100)
    assert "".join(corpus.vocab[i] for i in corpus.train.tolist()) == train
    assert "".join(corpus.vocab[i] for i in corpus.val.tolist()) == val


@pytest.mark.parametrize(
    ("content", "match"),
    [(None, "does not exist"), (b"", "is empty"), (b"abc\xff\xfedef", "is not UTF-8 text")],
)
def test_read_text_errors(tmp_path, content, match):
    path = tmp_path / "bad.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"lm --text: .*bad\.txt {match}"):
        lm.read_text(path)


def test_too_short_text_is_an_error(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x" * 500, encoding="utf-8")
    with pytest.raises(ValueError, match=r"corpus .*short\.txt is too short: 500 characters .* seq_len \+ 2 = 34"):
        lm.load_corpus(str(path), 1000, 2_000, 32)
    assert main(["lm", "--preset", "smoke", "--text", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert main(["lm", "--preset", "smoke", "--text", str(tmp_path / "none.txt"), "--out", str(tmp_path)]) == 2


# -- batches -----------------------------------------------------------------------------------------------------------
def test_sample_windows_are_contiguous_slices_and_seeded():
    tokens = torch.arange(1000) * 3
    w = lm.sample_windows(tokens, 64, 9, torch.Generator().manual_seed(5))
    assert w.shape == (64, 9)
    starts = w[:, 0] // 3
    assert torch.equal(w, tokens[starts[:, None] + torch.arange(9)])
    assert int(starts.max()) <= 1000 - 9
    again = lm.sample_windows(tokens, 64, 9, torch.Generator().manual_seed(5))
    assert torch.equal(w, again)


# -- model -------------------------------------------------------------------------------------------------------------
def test_variants_and_zero_init():
    config = {"d_head": 8, "n_layers": 1, "seq_len": 32, "mlr_ranks": [4, 2, 2], "window": 8}
    names = {}
    for variant in lm.VARIANTS:
        model = lm.build_model(variant, 11, 16, config)
        attn = model.blocks[0].attn
        assert attn.qk_norm and attn.n_heads == 2
        assert float(model.head.weight.detach().abs().sum()) == 0.0
        assert float(next(attn.output.parameters()).detach().abs().sum()) == 0.0
        names[variant] = [(lv.block_size, lv.window, lv.op.rank().bound) for lv in attn.levels]
    assert names["standard"] == [(None, None, 8)]
    assert names["mlr"] == [(None, None, 4), (16, None, 2), (8, None, 2)]
    assert names["sliding_window"] == [(None, 8, 8)]
    assert names["gswa"] == [(None, None, 4), (None, 8, 4)]
    with pytest.raises(ValueError, match=r"lm: unknown variant 'dense'; choose from standard, mlr"):
        lm.attention_factory("dense", seq_len=8, mlr_ranks=[8], window=2)


def test_presets_are_consistent():
    for name, preset in lm.PRESETS.items():
        lm._check_preset(name, preset)
    paper = lm.PRESETS["paper"]
    assert (paper.n_layers, paper.d_head, paper.seq_len) == (6, 64, 1024)
    assert paper.mlr_ranks == (32, 8, 6, 4, 4, 4, 4, 2) and paper.widths == (256, 384, 512, 768)


def test_unknown_variant_on_the_command_line(tmp_path, capsys):
    assert main(["lm", "--preset", "smoke", "--variants", "mlr", "dense", "--out", str(tmp_path)]) == 2
    assert "unknown variant(s) 'dense'; choose from standard, mlr, sliding_window, gswa" in capsys.readouterr().err


# -- end to end --------------------------------------------------------------------------------------------------------
def _run(out: Path, *extra: str) -> list[dict]:
    argv = ["lm", "--preset", "smoke", "--out", str(out), "--no-progress", "--jobs", "1", "--threads", "1", *extra]
    assert main(argv) == 0
    return _report.read_records(out / "results.jsonl")


def test_smoke_preset_writes_results_summary_and_plot(tmp_path):
    records = _run(tmp_path / "a")
    preset = lm.PRESETS["smoke"]
    steps = preset.steps // preset.eval_every + 1
    assert len(records) == len(lm.VARIANTS) * preset.seeds * steps
    for r in records:
        assert set(_report.RECORD_FIELDS) <= set(r)
        assert r["experiment"] == "lm" and r["metric"] == "val_loss" and r["value"] == r["val_loss"]
        assert math.isfinite(r["value"]) and r["corpus_source"].startswith("stdlib:")
        assert r["n_heads"] == 2 and r["d_head"] == 8 and r["seq_len"] == 32
    first = [r for r in records if r["step"] == 0]
    # zero LM head: every character is equally likely before training, loss = log(vocab size)
    assert all(r["value"] == pytest.approx(math.log(r["vocab_size"]), rel=1e-5) for r in first)
    assert {r["variant"] for r in records} == set(lm.VARIANTS)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["experiment"] == "lm" and len(summary["final"]) == len(lm.VARIANTS)
    assert (tmp_path / "a" / "metric_vs_compute.png").stat().st_size > 0


def test_same_seed_same_values_and_text_option(tmp_path):
    a = _run(tmp_path / "a", "--variants", "mlr", "--no-plots")
    b = _run(tmp_path / "b", "--variants", "mlr", "--no-plots")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x["value"] == pytest.approx(y["value"], rel=1e-6, abs=1e-6)
        assert (x["train_loss"] is None) == (y["train_loss"] is None)
        if x["train_loss"] is not None:
            assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-6, abs=1e-6)
    c = _run(tmp_path / "c", "--variants", "mlr", "--no-plots", "--seed", "1")
    assert c[-1]["value"] != a[-1]["value"]


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} is not here")
def test_tinyshakespeare_via_text(tmp_path):
    records = _run(tmp_path, "--variants", "standard", "--text", str(SHAKESPEARE), "--no-plots")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    r = records[-1]
    assert r["corpus_source"] == str(SHAKESPEARE)
    assert r["corpus_chars"] == len(text)
    train, _ = lm.split_chunks(text, lm.PRESETS["smoke"].chunk_chars)
    assert r["vocab_size"] == len(set(train)) + 1
    assert math.isfinite(r["value"]) and r["value"] < records[0]["value"]


def test_plan_of_the_quick_preset():
    args = argparse.Namespace(preset="quick", variants=None, seeds=None, seed=5, text=None, device="cpu")
    specs = lm.plan(args)
    preset = lm.PRESETS["quick"]
    assert len(specs) == len(lm.VARIANTS) * preset.seeds == 12
    assert {(s.variant, s.seed) for s in specs} == {(v, k) for v in lm.VARIANTS for k in (5, 6, 7)}
    assert all(
        s.config["width"] == 64 and s.config["mlr_ranks"] == [16, 8, 8] and s.config["text"] is None for s in specs
    )
    args = argparse.Namespace(preset="quick", variants=["gswa"], seeds=3, seed=0, text=None, device="cpu")
    assert [(s.variant, s.seed) for s in lm.plan(args)] == [("gswa", 0), ("gswa", 1), ("gswa", 2)]
