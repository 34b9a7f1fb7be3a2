"""MLR attention (structmat_attention) against torch's SDPA and a paper-style implementation, in one process.

Setting: causal self-attention over x of shape (B, T, d_model), H heads of head dim d_head = Σ_l r_l. Every method
projects queries, keys and values from x and returns (B, H, T, d_v) (no output projection), forward + backward.
Two MLR configurations:

- ``issue``: levels global + T/2 + T/4, ranks [32, 16, 16] (d_head 64);
- ``lm8``: the paper's 8-level LM configuration, ranks 32|8|6|4|4|4|4|2 over levels global, T/2, T/4, ..., T/128
  (as ``structmat_attention.experiments.lm`` builds it with ``mlr_attention(..., max_seq_len=T)``).

Methods:

- ``ours``: ``structured_attention(x, x, v, levels, causal=True)`` with ``method="auto"``, each level a stack of
  LowRank operators (d_model x d_model). Here auto runs the "pieces" path: sibling blocks attend to each other with
  the prefix features of the levels that join them, as batched calls of torch's fused CPU flash kernel, merged by
  their log-sum-exp (``attention_path`` is printed and checked).
- ``ours-sdpa``: the previous default, ``method="sdpa"``: torch's fused SDPA on block-expanded features (width
  Σ_l r_l · blocks_l: 128 for ``issue``, 808 for ``lm8``).
- ``ours-streamed``: ``method="streamed", key_block=256`` (online softmax over key blocks).
- ``sdpa``: standard attention of the same head dim: q = x W_q, k = x W_k, then
  ``torch.nn.functional.scaled_dot_product_attention(..., is_causal=True)`` (written here from the math).
- ``paper``: the paper's way: every level's full (T, T) score matrix q_l k_l^T, multiplied by its block mask, the L
  matrices summed, then masked softmax and values (written here from the math).

Correctness first: every method of ours equals the paper-style reference in float64 (whole and partial last blocks,
both configurations) before any timing. Times: ``torch.utils.benchmark.Timer.blocked_autorange``, methods
interleaved for a few rounds, best median kept, one thread unless ``--threads``. Memory: peak RSS growth of one
forward + backward, each in a fresh subprocess.

Run: ``python benchmarks/bench_attention.py [--configs issue lm8] [--T 1024 2048 4096] [--methods ours sdpa ...]``.
``suite(size)`` gives the rows of ``python -m benchmarks`` (group "attention", baseline "sdpa").
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from typing import Any

import torch
from torch.utils.benchmark import Timer

import structmat as sm
from structmat_attention import Level, structured_attention
from structmat_attention.functional import attention_path

CONFIGS: dict[str, list[int]] = {"issue": [32, 16, 16], "lm8": [32, 8, 6, 4, 4, 4, 4, 2]}
METHODS = ("ours", "ours-sdpa", "ours-streamed", "sdpa", "paper")
_OURS = {"ours": "auto", "ours-sdpa": "sdpa", "ours-scores": "scores", "ours-streamed": "streamed"}


def block_sizes(t: int, levels: int) -> list[int | None]:
    """Global, then T/2, T/4, ... (``mlr_attention``'s default for ``max_seq_len=T``)."""
    return [None] + [t >> k for k in range(1, levels)]


def build(t: int, d_model: int, heads: int, ranks: list[int], dtype: torch.dtype, seed: int = 0):
    """The levels (LowRank stacks over global, T/2, T/4, ...) and the value stack, seeded."""
    torch.manual_seed(seed)
    levels = [
        Level(b, sm.LowRank(d_model, d_model, rank=r, heads=heads, dtype=dtype))
        for b, r in zip(block_sizes(t, len(ranks)), ranks)
    ]
    wv = sm.Dense(sum(ranks), d_model, heads=heads, dtype=dtype)
    return levels, wv


def ours(x: torch.Tensor, levels: list[Level], wv: sm.LinearOperator, method: str = "auto") -> torch.Tensor:
    v = wv(x).movedim(-2, -3)  # (B, H, T, d_v)
    key_block = 256 if method == "streamed" else None
    return structured_attention(x, x, v, levels, causal=True, scale="sqrt", method=method, key_block=key_block)


def paper_style(x: torch.Tensor, levels: list[Level], wv: sm.LinearOperator) -> torch.Tensor:
    """L materialized (T, T) level matrices, block-masked and summed (the reference, written here on purpose)."""
    t = x.shape[-2]
    v = wv(x).movedim(-2, -3)
    width = sum(lv.op.rank_ for lv in levels)
    pos = torch.arange(t)
    s = 0
    for lv in levels:
        q = torch.einsum("btm,hmr->bhtr", x, lv.op.U)
        k = torch.einsum("hrn,btn->bhtr", lv.op.V, x)
        block = lv.block_size or t
        s = s + (q @ k.mT) * (pos[:, None] // block == pos[None, :] // block).to(x.dtype)
    s = (s / math.sqrt(width)).masked_fill(pos[None, :] > pos[:, None], float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def sdpa(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: sm.LinearOperator) -> torch.Tensor:
    """Standard attention: q and k projections, then torch's fused kernel."""
    q = torch.einsum("btm,hrm->bhtr", x, wq)
    k = torch.einsum("btm,hrm->bhtr", x, wk)
    v = wv(x).movedim(-2, -3)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def make(method: str, t: int, d_model: int, heads: int, ranks: list[int], batch: int, dtype=torch.float32):
    """A closure running ``method``'s forward on fresh inputs (x requires grad)."""
    levels, wv = build(t, d_model, heads, ranks, dtype)
    x = torch.randn(batch, t, d_model, dtype=dtype, requires_grad=True)
    if method in _OURS:
        return lambda: ours(x, levels, wv, _OURS[method])
    if method == "paper":
        return lambda: paper_style(x, levels, wv)
    if method != "sdpa":
        raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    d_head = sum(ranks)
    wq = (torch.randn(heads, d_head, d_model, dtype=dtype) / math.sqrt(d_model)).requires_grad_()
    wk = (torch.randn(heads, d_head, d_model, dtype=dtype) / math.sqrt(d_model)).requires_grad_()
    return lambda: sdpa(x, wq, wk, wv)


def fwd_bwd(fn) -> None:
    fn().sum().backward()


def check_correctness(configs: list[str], verbose: bool = True) -> None:
    """Every method of ours == paper-style in float64, values and gradients (x and the parameters), at sizes whose
    blocks divide T and at sizes that end in a partial block; the default path is "pieces"."""
    for cfg in configs:
        ranks = [max(r // 4, 1) for r in CONFIGS[cfg]]
        sizes = ((32, 32), (48, 48), (32, 29)) if len(ranks) <= 3 else ((256, 256), (256, 250))
        for max_len, t in sizes:  # blocks of max_len / 2^l on t tokens (t < max_len: a partial last block)
            levels, wv = build(max_len, 24, 3, ranks, torch.float64, seed=1)
            x = torch.randn(2, t, 24, dtype=torch.float64, requires_grad=True)
            params = [x, *(p for lv in levels for p in lv.op.parameters())]
            ref = paper_style(x, levels, wv)
            weight = torch.randn(ref.shape, dtype=torch.float64)
            ref_grads = torch.autograd.grad((ref * weight).sum(), params)
            path = attention_path(levels, t)
            if path != "pieces":
                raise SystemExit(f"correctness check: auto runs {path!r}, not 'pieces', for {cfg} at T={t}")
            for method in ("auto", "scores", "sdpa", "streamed"):
                out = ours(x, levels, wv, method)
                grads = torch.autograd.grad((out * weight).sum(), params)
                err = max((a - b).abs().max().item() for a, b in zip((out, *grads), (ref, *ref_grads)))
                if err > 1e-9:
                    raise SystemExit(f"correctness check failed, {cfg} T={t} {method}: max |ours - paper| = {err:.3e}")
    if verbose:
        print(
            f"correctness: ours (auto = pieces, scores, sdpa, streamed) == paper-style, values and gradients "
            f"(float64; configs {', '.join(configs)}; whole and partial last blocks): ok"
        )


def time_methods(methods: list[str], t: int, args: Any, rounds: int, min_run_time: float) -> dict[str, float]:
    """Seconds per forward + backward: interleaved rounds of blocked_autorange, the best median of each."""
    fns = {m: make(m, t, args.d_model, args.heads, args.ranks, args.batch) for m in methods}
    for fn in fns.values():
        fwd_bwd(fn)  # warm up
    best: dict[str, float] = {}
    for _ in range(rounds):
        for m, fn in fns.items():
            median = Timer("f(g)", globals={"f": fwd_bwd, "g": fn}).blocked_autorange(min_run_time=min_run_time).median
            best[m] = min(best.get(m, math.inf), median)
    return best


def peak_memory(method: str, t: int, args: Any) -> float:
    """MiB of peak RSS growth during one forward + backward, measured in a fresh interpreter."""
    cmd = [sys.executable, __file__, "--child", method, "--T", str(t), "--d-model", str(args.d_model)]
    cmd += ["--heads", str(args.heads), "--batch", str(args.batch), "--ranks", *map(str, args.ranks)]
    cmd += ["--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["mib"]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(method: str, args: Any) -> None:
    fn = make(method, args.T[0], args.d_model, args.heads, args.ranks, args.batch)
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    before = _rss_kib("VmRSS")
    fwd_bwd(fn)
    print(json.dumps({"mib": (_rss_kib("VmHWM") - before) / 1024}))


def _flops(t: int, batch: int, heads: int, d_model: int, ranks: list[int]) -> int:
    """FLOPs of one forward + backward (3x the forward, multiply-add = 2): the q/k/v projections, and per causal pair
    the prefix width of the levels that join it plus the value width."""
    sizes = block_sizes(t, len(ranks))
    d_v = sum(ranks)
    proj = 2 * batch * t * d_model * heads * (2 * sum(ranks) + d_v)
    pairs = 0  # Σ over causal pairs (i >= j) of the joined width: level l joins the causal pairs in its blocks
    for b, r in zip(sizes, ranks):
        size = b or t
        full, rest = divmod(t, size)
        pairs += r * (full * size * (size + 1) // 2 + rest * (rest + 1) // 2)
    causal = t * (t + 1) // 2
    return 3 * (proj + 2 * batch * heads * (pairs + causal * d_v))


def _bytes(t: int, batch: int, heads: int, d_model: int, ranks: list[int]) -> int:
    """Minimal bytes (float32) of a forward + backward: x and its gradient, the parameters and their gradients, the
    output and its gradient."""
    params = heads * d_model * 3 * sum(ranks)
    return 4 * 2 * (batch * t * d_model + params + batch * heads * t * sum(ranks))


def suite(size: str = "full") -> list[dict[str, Any]]:
    """Rows for ``python -m benchmarks``: ours (auto: the pieces path) vs standard SDPA of the same head dim,
    forward + backward, one thread. Full: ``issue`` at T = 1024, 2048, 4096 and ``lm8`` at T = 1024 (B = 1, H = 4,
    d_head = 64, d_model = 256), memory in the note; smoke: both configurations at T = 128, d_model = 64."""
    smoke = size == "smoke"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check_correctness(list(CONFIGS), verbose=False)
        cases = [("issue", 128), ("lm8", 128)] if smoke else [("issue", 1024), ("issue", 2048), ("issue", 4096)]
        if not smoke:
            cases.append(("lm8", 1024))
        rows = []
        for cfg, t in cases:
            args = argparse.Namespace(d_model=64 if smoke else 256, heads=4, batch=1, ranks=CONFIGS[cfg])
            if smoke:
                args.ranks = [max(r // 4, 1) for r in CONFIGS[cfg]]
            levels, _ = build(t, args.d_model, args.heads, args.ranks, torch.float32)
            path = attention_path(levels, t)
            rounds, min_run_time = (1, 0.01) if smoke else (3, 0.3)
            times = time_methods(["ours", "sdpa"], t, args, rounds, min_run_time)
            note = f"path {path}; 1 thread"
            if not smoke:
                mem = {m: peak_memory(m, t, args) for m in ("ours", "sdpa")}
                note += f"; peak RSS growth ours {mem['ours']:.1f} MiB, sdpa {mem['sdpa']:.1f} MiB"
            rows.append(
                {
                    "group": "attention",
                    "case": f"mlr {cfg} causal r={'|'.join(map(str, args.ranks))} T={t} B=1 H=4 d_model={args.d_model}",
                    "mode": "fwd+bwd",
                    "ours_ms": times["ours"] * 1e3,
                    "baseline": "sdpa",
                    "baseline_ms": times["sdpa"] * 1e3,
                    "dense_ms": None,
                    "flops": _flops(t, 1, args.heads, args.d_model, args.ranks),
                    "bytes": _bytes(t, 1, args.heads, args.d_model, args.ranks),
                    "checked": True,
                    "note": note,
                }
            )
        return rows
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--T", type=int, nargs="+", default=None, help="default: 1024 2048 4096 (issue), 1024 (lm8)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=[*METHODS, "ours-scores"])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the best median is kept")
    p.add_argument("--min-run-time", type=float, default=0.3)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--ranks", type=int, nargs="+", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args)
        return
    check_correctness(args.configs)
    print(f"causal self-attention, B={args.batch}, d_model={args.d_model}, H={args.heads}; forward+backward; "
          f"threads={torch.get_num_threads()}")  # fmt: skip
    print("ms: best median forward+backward time; MiB: peak RSS growth in a fresh process")
    for cfg in args.configs:
        args.ranks = CONFIGS[cfg]
        sizes = args.T or ([1024, 2048, 4096] if cfg == "issue" else [1024])
        print(f"\n{cfg}: ranks {args.ranks}, levels global + T/2 ... T/{2 ** (len(args.ranks) - 1)}, "
              f"d_head={sum(args.ranks)}")  # fmt: skip
        header = f"{'T':>6} {'path':>7}" + "".join(f" {m + ' ms':>17}" for m in args.methods)
        header += "".join(f" {m + '/sdpa':>18}" for m in args.methods if m != "sdpa")
        if not args.no_memory:
            header += "".join(f" {m + ' MiB':>18}" for m in args.methods)
        print(header)
        for t in sizes:
            levels, _ = build(t, args.d_model, args.heads, args.ranks, torch.float32)
            times = time_methods(args.methods, t, args, args.rounds, args.min_run_time)
            line = f"{t:>6} {attention_path(levels, t):>7}" + "".join(f" {times[m] * 1e3:>17.1f}" for m in args.methods)
            if "sdpa" in times:
                line += "".join(f" {times[m] / times['sdpa']:>18.3f}" for m in args.methods if m != "sdpa")
            if not args.no_memory:
                line += "".join(f" {peak_memory(m, t, args):>18.1f}" for m in args.methods)
            print(line, flush=True)
    print("\ngoal: ours/sdpa <= 1.0 for T >= 1024; memory ours <= sdpa + O(T d)")


if __name__ == "__main__":
    main()
