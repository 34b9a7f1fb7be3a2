"""Character-level language modelling: standard vs MLR, sliding-window and GSWA attention in the same GPT.

The paper's second experiment (Kuang et al., ICML 2025, Sec. on language modelling): a decoder-only transformer
(:class:`~structmat_attention.model.GPT`) over characters, whose attention is one of four variants at the same width
and head count: ``standard`` (:func:`~structmat_attention.variants.standard_attention`), ``mlr``
(:func:`~structmat_attention.variants.mlr_attention`, levels over the sequence: global, blocks of T/2, T/4, ...),
``sliding_window`` and ``gswa`` (global + sliding window). All use the paper's QK-LayerNorm and zero init of the
attention output projections and the LM head. Metric: validation loss in nats per character against non-embedding
training compute.

Corpus. By default, with no download: the ``*.py`` files of the running Python's standard library
(``sysconfig.get_paths()["stdlib"]``, any ``site-packages``/``dist-packages`` and ``__pycache__`` folder skipped),
read in the order of their sorted relative POSIX paths and concatenated (raw bytes) up to the preset's byte budget
(the last file cut at the budget), then decoded as UTF-8 (an invalid byte becomes U+FFFD). ``--text PATH`` uses any
UTF-8 file instead. The text is cut into chunks of ``chunk_chars`` characters (the last one shorter); chunk ``k``
goes to validation when ``k % 10 == 9`` and to training otherwise, and each side is the concatenation of its chunks
in order (90/10 by contiguous chunks). The vocabulary is the sorted set of the training text's characters, with id 0
the ``<unk>`` token that every character unseen in training maps to.

Batches: step ``s`` of seed ``k`` draws its global batch of windows (``seq_len + 1`` characters, uniform random
starts in the training text) with a generator seeded from ``(k, s)``, so any number of processes sees the same
batches. Validation: a fixed set of windows of the validation text (one generator seed for every run), mean
cross-entropy over all their positions.

Differences from the paper: GSWA is :func:`~structmat_attention.variants.gswa_attention`, whose global and windowed
scores share one softmax (the paper sums two softmaxes' probabilities); MLR attention's scores are not divided by the
number of levels that cover a pair; the corpus is Python source or a file of your choice, not OpenWebText.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from structmat.checks import check_int

from ..model import GPT
from ..variants import gswa_attention, mlr_attention, sliding_window_attention, standard_attention
from ._runner import RunSpec
from ._train import TrainConfig, count_params, fit, transformer_cost, zero_attention_outputs

__all__ = [
    "NAME",
    "TITLE",
    "LOG_METRIC",
    "METRIC",
    "METRIC_LABEL",
    "VARIANTS",
    "UNK",
    "LMPreset",
    "PRESETS",
    "Corpus",
    "stdlib_files",
    "stdlib_text",
    "read_text",
    "split_chunks",
    "build_corpus",
    "load_corpus",
    "sample_windows",
    "validation_windows",
    "attention_factory",
    "build_model",
    "add_arguments",
    "plan",
    "LMRun",
    "prepare",
    "run_one",
]

NAME = "lm"
TITLE = "Character-level language modelling"
#: Losses in nats are plotted on a linear axis.
LOG_METRIC = False
METRIC = "val_loss"
METRIC_LABEL = "validation loss (nats/char)"
#: The attention variants, in the order the presets run them.
VARIANTS = ("standard", "mlr", "sliding_window", "gswa")
#: The token every character unseen in the training text maps to (id 0).
UNK = "<unk>"
#: Seed of the generator that draws the fixed validation windows (the same for every run and seed).
VALIDATION_SEED = 1234


@dataclass(frozen=True)
class LMPreset:
    """One size of the experiment.

    Args:
        widths: model widths ``d_model`` (one run per width, variant and seed).
        d_head: channels per head; ``n_heads = width // d_head`` (every width must divide by it).
        n_layers: transformer blocks.
        seq_len: training context ``T`` (each example is a window of ``T + 1`` characters).
        batch_size: windows per optimizer step (the global batch over all processes).
        steps: optimizer steps.
        lr: AdamW learning rate at ``base_width`` (µP: each matrix gets ``lr * base_width / fan_in``).
        base_width: the width where ``lr`` holds unscaled.
        warmup: linear warmup steps (then cosine down to a tenth).
        eval_every: steps between validation points.
        eps: AdamW epsilon.
        mlr_ranks: the MLR variant's rank per sequence level (global, T/2, T/4, ...); they split the head's
            query/key channels, so they must sum to ``d_head``.
        window: the sliding-window and GSWA window (a query sees itself and the ``window - 1`` tokens before it).
        byte_budget: bytes of standard-library source read for the default corpus.
        chunk_chars: characters per split chunk (every 10th chunk goes to validation).
        val_windows: the fixed validation windows (of ``seq_len + 1`` characters) evaluated at every point.
        seeds: seeds per variant.
        variants: the variants the preset runs.
    """

    widths: tuple[int, ...]
    d_head: int
    n_layers: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    base_width: int
    warmup: int
    eval_every: int
    eps: float
    mlr_ranks: tuple[int, ...]
    window: int
    byte_budget: int
    chunk_chars: int
    val_windows: int
    seeds: int
    variants: tuple[str, ...] = VARIANTS


#: ``smoke``: seconds, for the tests (width 16, 2 heads of 8, 1 layer, T = 32, 10 steps, 100 kB of stdlib).
#: ``quick``: the whole command (4 variants x 2 seeds, 2 runs at once with one thread each) in at most 8 minutes on a
#: 2-core CPU: width 64, 2 heads of 32, 2 layers, T = 128, batch 16, 1200 steps, MLR ranks 16|8|8 over levels global,
#: 64, 32, window 32 (T/4), the first 4 MB of the stdlib sources. ``paper``: the paper's LM configuration as far as
#: it is documented (6 layers, d_head 64, T = 1024, 32 x 1024 = 32k tokens per step, 100k steps, MLR ranks
#: 32|8|6|4|4|4|4|2 over levels global, 512, 256, ..., 8, widths 256, 384, 512, 768, AdamW eps 1e-20), for a GPU.
#: The paper trains on OpenWebText (pass it with ``--text``); its learning rate and window are not in our notes:
#: lr 3e-3 at base width 256 and a window of T/4 are this project's choices.
PRESETS: dict[str, LMPreset] = {
    "smoke": LMPreset(
        widths=(16,),
        d_head=8,
        n_layers=1,
        seq_len=32,
        batch_size=8,
        steps=10,
        lr=3e-3,
        base_width=16,
        warmup=2,
        eval_every=5,
        eps=1e-8,
        mlr_ranks=(4, 2, 2),
        window=8,
        byte_budget=100_000,
        chunk_chars=2_000,
        val_windows=16,
        seeds=1,
    ),
    "quick": LMPreset(
        widths=(64,),
        d_head=32,
        n_layers=2,
        seq_len=128,
        batch_size=16,
        steps=1200,
        lr=3e-3,
        base_width=64,
        warmup=50,
        eval_every=100,
        eps=1e-8,
        mlr_ranks=(16, 8, 8),
        window=32,
        byte_budget=4_000_000,
        chunk_chars=20_000,
        val_windows=128,
        seeds=3,
    ),
    "paper": LMPreset(
        widths=(256, 384, 512, 768),
        d_head=64,
        n_layers=6,
        seq_len=1024,
        batch_size=32,
        steps=100_000,
        lr=3e-3,
        base_width=256,
        warmup=1_000,
        eval_every=2_000,
        eps=1e-20,
        mlr_ranks=(32, 8, 6, 4, 4, 4, 4, 2),
        window=256,
        byte_budget=1 << 40,
        chunk_chars=100_000,
        val_windows=512,
        seeds=1,
    ),
}


# -- corpus ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Corpus:
    """A character-level corpus split 90/10.

    Args:
        train: training token ids (1-D int64).
        val: validation token ids (1-D int64).
        vocab: ``vocab[i]`` is token ``i``'s character; ``vocab[0]`` is :data:`UNK`.
        source: where the text came from ('stdlib:<dir>' or the file's path).
        n_chars: characters of the whole text.
        sha256: the first 16 hex digits of the text's UTF-8 sha256.
    """

    train: torch.Tensor
    val: torch.Tensor
    vocab: tuple[str, ...]
    source: str
    n_chars: int
    sha256: str

    def info(self) -> dict[str, Any]:
        """The corpus' identity as JSON-ready fields (recorded with every result)."""
        return {
            "corpus_source": self.source,
            "corpus_chars": self.n_chars,
            "corpus_sha256": self.sha256,
            "vocab_size": len(self.vocab),
            "train_chars": int(self.train.numel()),
            "val_chars": int(self.val.numel()),
        }


_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The ``*.py`` files under ``root`` (default: this Python's stdlib), sorted by relative POSIX path.

    Folders named ``site-packages``, ``dist-packages`` or ``__pycache__`` are skipped.

    Example:
        >>> rel = [f.relative_to(_stdlib_root()).as_posix() for f in stdlib_files()]
        >>> rel == sorted(rel), "os.py" in rel, any("site-packages" in r for r in rel)
        (True, True, False)
    """
    base = Path(root) if root is not None else _stdlib_root()
    found: list[tuple[str, Path]] = []
    for folder, dirs, names in os.walk(base):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        for name in names:
            if name.endswith(".py"):
                path = Path(folder) / name
                found.append((path.relative_to(base).as_posix(), path))
    return [path for _, path in sorted(found)]


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_text(byte_budget: int, root: str | Path | None = None) -> str:
    """The first ``byte_budget`` bytes of the concatenated :func:`stdlib_files`, decoded as UTF-8 (errors replaced).

    Example:
        >>> first = stdlib_files()[0].read_bytes()[:100].decode("utf-8", errors="replace")
        >>> stdlib_text(100) == first
        True
    """
    byte_budget = check_int("lm.stdlib_text", "byte_budget", byte_budget)
    parts: list[bytes] = []
    left = byte_budget
    for path in stdlib_files(root):
        data = path.read_bytes()[:left]
        parts.append(data)
        left -= len(data)
        if left <= 0:
            break
    return b"".join(parts).decode("utf-8", errors="replace")


def read_text(path: str | Path) -> str:
    """The text of a UTF-8 file; ValueError naming the path when it is missing, empty or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"lm --text: {path} does not exist or is not a file")
    data = path.read_bytes()
    if not data:
        raise ValueError(f"lm --text: {path} is empty")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"lm --text: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def split_chunks(text: str, chunk_chars: int) -> tuple[str, str]:
    """``(train, val)``: chunks of ``chunk_chars`` characters, every chunk ``k`` with ``k % 10 == 9`` to validation.

    Example:
        >>> split_chunks("abcdefghijklmnopqrstuvwxyz", 2)
        ('abcdefghijklmnopqruvwxyz', 'st')
    """
    chunk_chars = check_int("lm.split_chunks", "chunk_chars", chunk_chars)
    train, val = [], []
    for k, start in enumerate(range(0, len(text), chunk_chars)):
        (val if k % 10 == 9 else train).append(text[start : start + chunk_chars])
    return "".join(train), "".join(val)


def _codepoints(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-32-le", errors="surrogatepass")), dtype=torch.int32).long()


def _encode(text: str, lookup: torch.Tensor) -> torch.Tensor:
    cp = _codepoints(text)
    top = lookup.numel() - 1
    return torch.where(cp <= top, lookup[cp.clamp(max=top)], torch.zeros_like(cp))


def build_corpus(text: str, source: str, chunk_chars: int, seq_len: int) -> Corpus:
    """Split ``text`` 90/10 (:func:`split_chunks`), build the vocabulary from the training part and encode both.

    Example:
        >>> c = build_corpus("ab" * 9 + "az" + "ba" * 5, "demo", 2, 0)  # chunk 9, 'az', goes to validation
        >>> c.vocab, c.val.tolist(), c.train[:4].tolist()
        (('<unk>', 'a', 'b'), [1, 0], [1, 2, 1, 2])
    """
    where = f"lm: the corpus {source}"
    train_text, val_text = split_chunks(text, chunk_chars)
    need = seq_len + 2
    if len(train_text) < need or len(val_text) < need:
        raise ValueError(
            f"{where} is too short: {len(text)} characters split into {len(train_text)} for training and "
            f"{len(val_text)} for validation (chunks of {chunk_chars}, every 10th to validation); each needs at "
            f"least seq_len + 2 = {need}"
        )
    chars = sorted(set(train_text))
    vocab = (UNK, *chars)
    points = torch.tensor([ord(c) for c in chars], dtype=torch.long)
    lookup = torch.zeros(int(points.max()) + 1, dtype=torch.long)
    lookup[points] = torch.arange(1, len(chars) + 1)
    digest = hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()[:16]
    return Corpus(_encode(train_text, lookup), _encode(val_text, lookup), vocab, source, len(text), digest)


@functools.lru_cache(maxsize=4)
def load_corpus(text_path: str | None, byte_budget: int, chunk_chars: int, seq_len: int) -> Corpus:
    """The run's corpus: ``text_path`` (any UTF-8 file) or, when None, the stdlib sources up to ``byte_budget``.

    Cached per process (the runs of one worker share it).
    """
    if text_path is None:
        return build_corpus(stdlib_text(byte_budget), f"stdlib:{_stdlib_root()}", chunk_chars, seq_len)
    return build_corpus(read_text(text_path), str(text_path), chunk_chars, seq_len)


# -- batches -----------------------------------------------------------------------------------------------------------
def sample_windows(tokens: torch.Tensor, count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` windows of ``length`` consecutive tokens at uniform random starts, ``(count, length)``.

    Example:
        >>> w = sample_windows(torch.arange(100), 3, 5, torch.Generator().manual_seed(0))
        >>> w.shape, bool(((w[:, 1:] - w[:, :-1]) == 1).all())
        (torch.Size([3, 5]), True)
    """
    starts = torch.randint(0, tokens.numel() - length + 1, (count,), generator=generator)
    return tokens[starts[:, None] + torch.arange(length)]


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (1 << 63)


def validation_windows(corpus: Corpus, count: int, seq_len: int) -> torch.Tensor:
    """The fixed validation windows ``(count, seq_len + 1)`` (one generator seed for every run)."""
    return sample_windows(corpus.val, count, seq_len + 1, torch.Generator().manual_seed(VALIDATION_SEED))


def _lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


# -- model -------------------------------------------------------------------------------------------------------------
def attention_factory(variant: str, *, seq_len: int, mlr_ranks: Sequence[int], window: int) -> Callable[..., Any]:
    """``(d_model, n_heads) -> layer`` for ``variant``, with QK-LayerNorm (the GPT's ``attention`` argument).

    Example:
        >>> layer = attention_factory("mlr", seq_len=16, mlr_ranks=[4, 2, 2], window=4)(16, 2)
        >>> [lv.block_size for lv in layer.levels], layer.qk_norm
        ([None, 8, 4], True)
    """
    if variant == "standard":
        return functools.partial(standard_attention, qk_norm=True)
    if variant == "mlr":
        return functools.partial(mlr_attention, ranks=list(mlr_ranks), max_seq_len=seq_len, qk_norm=True)
    if variant == "sliding_window":
        return functools.partial(sliding_window_attention, window=window, qk_norm=True)
    if variant == "gswa":
        return functools.partial(gswa_attention, window=window, qk_norm=True)
    raise ValueError(f"lm: unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def build_model(variant: str, vocab_size: int, width: int, config: dict[str, Any]) -> GPT:
    """The variant's GPT with the paper's zero init (attention output projections and LM head).

    ``config`` holds the preset's fields (``d_head``, ``n_layers``, ``seq_len``, ``mlr_ranks``, ``window``).
    """
    factory = attention_factory(
        variant, seq_len=config["seq_len"], mlr_ranks=config["mlr_ranks"], window=config["window"]
    )
    model = GPT(vocab_size, width, width // config["d_head"], config["n_layers"], config["seq_len"], factory)
    zero_attention_outputs(model)
    with torch.no_grad():
        model.head.weight.zero_()
    return model


# -- the experiment contract ---------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--text PATH``: train on a UTF-8 file instead of the standard library's sources."""
    parser.add_argument(
        "--text", type=Path, default=None, help="train on this UTF-8 file (default: the Python stdlib's *.py sources)"
    )


def _check_preset(name: str, preset: LMPreset) -> None:
    for width in preset.widths:
        if width % preset.d_head:
            raise ValueError(f"lm preset {name!r}: width {width} does not divide by d_head={preset.d_head}")
    if sum(preset.mlr_ranks) != preset.d_head:
        raise ValueError(
            f"lm preset {name!r}: mlr_ranks {list(preset.mlr_ranks)} sum to {sum(preset.mlr_ranks)}, "
            f"not d_head={preset.d_head}"
        )


def plan(args: argparse.Namespace) -> list[RunSpec]:
    """One run per (width, variant, seed); checks ``--variants`` and loads the corpus once (``--text`` errors)."""
    preset = PRESETS[args.preset]
    _check_preset(args.preset, preset)
    variants = list(args.variants) if args.variants else list(preset.variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"lm: unknown variant(s) {', '.join(map(repr, unknown))}; choose from {', '.join(VARIANTS)}")
    text = getattr(args, "text", None)
    text = str(text) if text is not None else None
    load_corpus(text, preset.byte_budget, preset.chunk_chars, preset.seq_len)  # fail early on a bad --text
    seeds = args.seeds or preset.seeds
    device = getattr(args, "device", None) or "cpu"
    fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(preset).items()}
    del fields["widths"], fields["variants"], fields["seeds"]
    return [
        RunSpec(NAME, variant, seed, args.preset, device, {**fields, "width": width, "text": text})
        for width in preset.widths
        for seed in range(args.seed, args.seed + seeds)
        for variant in variants
    ]


@dataclass(frozen=True)
class LMRun:
    """Everything :func:`~structmat_attention.experiments._train.fit` needs for one run (see :func:`prepare`).

    Args:
        model: the GPT (zero-initialized outputs), on the CPU.
        config: the optimization settings.
        sample: ``sample(step)`` -> the step's global batch ``(batch_size, seq_len + 1)``, drawn with a generator
            seeded from ``(seed, step)``.
        loss: ``loss(model, batch)`` -> mean next-character cross-entropy over every position.
        evaluate: ``evaluate(model)`` -> ``{"val_loss": ...}`` over the fixed validation windows.
        static: the run's fields shared by every record (width, heads, params, FLOPs per token, corpus identity).
    """

    model: GPT
    config: TrainConfig
    sample: Callable[[int], torch.Tensor]
    loss: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    evaluate: Callable[[torch.nn.Module], dict[str, float]]
    static: dict[str, Any]


def prepare(spec: RunSpec) -> LMRun:
    """Build one run's model (seeded by ``spec.seed``), batches, loss and evaluation from a :func:`plan` spec."""
    c = spec.config
    corpus = load_corpus(c["text"], c["byte_budget"], c["chunk_chars"], c["seq_len"])
    torch.manual_seed(spec.seed)
    width = c["width"]
    model = build_model(spec.variant, len(corpus.vocab), width, c)
    flops, macs = transformer_cost(model.blocks, c["seq_len"])
    static = {
        "width": width,
        "n_heads": width // c["d_head"],
        "d_head": c["d_head"],
        "n_layers": c["n_layers"],
        "seq_len": c["seq_len"],
        "params": count_params(model.blocks),
        "flops_per_token": flops,
        "macs_per_token": macs,
        **corpus.info(),
    }
    config = TrainConfig(
        steps=c["steps"],
        batch_size=c["batch_size"],
        lr=c["lr"],
        base_width=c["base_width"],
        eval_every=c["eval_every"],
        warmup=c["warmup"],
        eps=c["eps"],
    )
    val = validation_windows(corpus, c["val_windows"], c["seq_len"])

    def sample(step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(_step_seed(spec.seed, step))
        return sample_windows(corpus.train, c["batch_size"], c["seq_len"] + 1, generator)

    def evaluate(net: torch.nn.Module) -> dict[str, float]:
        device = next(net.parameters()).device
        total = 0.0
        for start in range(0, val.shape[0], c["batch_size"]):
            part = val[start : start + c["batch_size"]].to(device)
            total += float(_lm_loss(net, part)) * part.shape[0]
        return {METRIC: total / val.shape[0]}

    return LMRun(model, config, sample, _lm_loss, evaluate, static)


def run_one(spec: RunSpec, progress: bool = True, position: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train one variant at one width and seed; returns ``(static fields, fit's records)``."""
    run = prepare(spec)
    records = fit(
        run.model,
        run.config,
        run.sample,
        run.loss,
        run.evaluate,
        tokens_per_example=spec.config["seq_len"],
        device=spec.device,
        desc=f"lm {spec.variant} w{spec.config['width']} s{spec.seed}",
        progress=progress,
        position=position,
    )
    return run.static, records
