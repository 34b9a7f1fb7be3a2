"""MLR attention (structmat_attention) against torch's SDPA and a paper-style implementation, in one process.

Setting: causal self-attention over x of shape (B, T, d_model), H heads of head dim d_head. Every method projects
queries, keys and values from x and returns (B, H, T, d_v) (no output projection), forward + backward.

- ``ours``: ``structured_attention(x, x, v, levels)`` with L levels of block sizes T / 2^l, each a stack of LowRank
  operators (d_model x d_model) whose ranks split the head dim (sum r_l = d_head): one score matrix, blocked levels
  add into its diagonal blocks.
- ``ours-streamed``: the same with ``method="streamed", key_block=256`` (online softmax over key blocks; the backward
  recomputes each tile, so no (T, T) matrix is held in training either).
- ``sdpa``: standard attention of head dim d_head: q = x W_q, k = x W_k, then
  ``torch.nn.functional.scaled_dot_product_attention(..., is_causal=True)``.
- ``paper``: the paper's way: every level's full (T, T) score matrix q_l k_l^T, multiplied by its block mask, L
  matrices summed, then masked softmax and values.

Correctness first: ours and paper-style agree (float64, small T) before any timing. Then time (median of repeats)
and peak memory (each measurement in a fresh subprocess: max RSS during forward + backward minus RSS before). Ratios
are what matter on a shared CPU.

Run: ``python benchmarks/bench_attention.py [--T 1024 2048 4096] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import torch

import structmat as sm
from structmat_attention import Level, structured_attention


def build(T: int, d_model: int, heads: int, ranks: list[int], dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    levels = [
        Level(T // 2**lvl, sm.LowRank(d_model, d_model, rank=r, heads=heads, dtype=dtype))
        for lvl, r in enumerate(ranks)
    ]
    wv = sm.Dense(ranks_sum(ranks), d_model, heads=heads, dtype=dtype)
    return levels, wv


def ranks_sum(ranks: list[int]) -> int:
    return sum(ranks)


def ours(x: torch.Tensor, levels: list[Level], wv: sm.LinearOperator, method: str = "auto") -> torch.Tensor:
    v = wv(x).movedim(-2, -3)  # (B, H, T, d_v)
    key_block = 256 if method == "streamed" else None
    return structured_attention(x, x, v, levels, causal=True, scale="sqrt", method=method, key_block=key_block)


def paper_style(x: torch.Tensor, levels: list[Level], wv: sm.LinearOperator) -> torch.Tensor:
    """L materialized (T, T) level matrices, block-masked and summed (the baseline, written here on purpose)."""
    T = x.shape[-2]
    v = wv(x).movedim(-2, -3)
    width = sum(lv.op.rank_ for lv in levels)
    mats = []
    pos = torch.arange(T)
    for lv in levels:
        q = torch.einsum("btm,hmr->bhtr", x, lv.op.U)
        k = torch.einsum("hrn,btn->bhtr", lv.op.V, x)
        block = (pos[:, None] // lv.block_size == pos[None, :] // lv.block_size).to(x.dtype)
        mats.append((q @ k.mT) * block)
    s = torch.stack(mats).sum(0) / math.sqrt(width)
    s = s.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def sdpa(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: sm.LinearOperator) -> torch.Tensor:
    q = torch.einsum("btm,hrm->bhtr", x, wq)
    k = torch.einsum("btm,hrm->bhtr", x, wk)
    v = wv(x).movedim(-2, -3)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def make(method: str, T: int, d_model: int, heads: int, ranks: list[int], batch: int):
    levels, wv = build(T, d_model, heads, ranks, torch.float32)
    x = torch.randn(batch, T, d_model, requires_grad=True)
    if method.startswith("ours"):
        return lambda: ours(
            x, levels, wv, {"ours": "auto", "ours-scores": "scores", "ours-streamed": "streamed"}[method]
        )
    if method == "paper":
        return lambda: paper_style(x, levels, wv)
    d_head = sum(ranks)
    wq = (torch.randn(heads, d_head, d_model) / math.sqrt(d_model)).requires_grad_()
    wk = (torch.randn(heads, d_head, d_model) / math.sqrt(d_model)).requires_grad_()
    return lambda: sdpa(x, wq, wk, wv)


def fwd_bwd(fn) -> None:
    fn().sum().backward()


def check_correctness() -> None:
    """ours == paper-style in float64 at sizes whose blocks divide T and at T = 48 (partial blocks of 48/2^l)."""
    for T in (32, 48):
        levels, wv = build(T, 24, 3, [4, 2, 2], torch.float64, seed=1)
        x = torch.randn(2, T, 24, dtype=torch.float64)
        b = paper_style(x, levels, wv)
        for method in ("auto", "scores", "sdpa", "streamed"):
            err = (ours(x, levels, wv, method) - b).abs().max().item()
            if err > 1e-10:
                raise SystemExit(f"correctness check failed at T={T}, {method}: max |ours - paper| = {err:.3e}")
    print("correctness: ours (auto, scores, sdpa, streamed) == paper-style (float64, T = 32, 48): ok")


def time_method(method: str, T: int, args: argparse.Namespace) -> float:
    fn = make(method, T, args.d_model, args.heads, args.ranks, args.batch)
    fwd_bwd(fn)  # warm up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fwd_bwd(fn)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory(method: str, T: int, args: argparse.Namespace) -> float:
    """MiB of peak RSS growth during one forward + backward, measured in a fresh interpreter."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        method,
        "--T",
        str(T),
        "--d-model",
        str(args.d_model),
        "--heads",
        str(args.heads),
        "--batch",
        str(args.batch),
        "--ranks",
        *map(str, args.ranks),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["mib"]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(method: str, args: argparse.Namespace) -> None:
    T = args.T[0]
    fn = make(method, T, args.d_model, args.heads, args.ranks, args.batch)
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    before = _rss_kib("VmRSS")
    fwd_bwd(fn)
    peak = _rss_kib("VmHWM")
    print(json.dumps({"mib": (peak - before) / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ranks", type=int, nargs="+", default=[32, 16, 16])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args)
        return
    check_correctness()
    L = len(args.ranks)
    print(
        f"causal self-attention, B={args.batch}, d_model={args.d_model}, H={args.heads}, d_head={sum(args.ranks)}, "
        f"MLR levels L={L} with ranks {args.ranks} and blocks T/2^l; forward+backward; "
        f"threads={torch.get_num_threads()}"
    )
    methods = ("ours", "ours-scores", "ours-streamed", "sdpa", "paper")
    print("ms: median forward+backward time; MiB: peak RSS growth in a fresh process")
    print(
        f"{'T':>6}"
        + "".join(f" {m + ' ms':>16}" for m in methods)
        + f" {'ours/sdpa':>10} {'scores/sdpa':>12}"
        + "".join(f" {m + ' MiB':>17}" for m in methods)
        + f" {'mem ours/paper':>15} {'scores/paper':>13} {'streamed/paper':>15}"
    )
    for T in args.T:
        t = {m: time_method(m, T, args) for m in methods}
        mem = {m: peak_memory(m, T, args) for m in methods}
        print(
            f"{T:>6}"
            + "".join(f" {t[m] * 1e3:>16.1f}" for m in methods)
            + f" {t['ours'] / t['sdpa']:>10.2f} {t['ours-scores'] / t['sdpa']:>12.2f}"
            + "".join(f" {mem[m]:>17.1f}" for m in methods)
            + f" {mem['ours'] / mem['paper']:>15.3f} {mem['ours-scores'] / mem['paper']:>13.3f}"
            + f" {mem['ours-streamed'] / mem['paper']:>15.3f}"
        )
    print(f"goals: time ours/sdpa <= 1.0; memory ours/paper <= 1/L = {1 / L:.3f}")


if __name__ == "__main__":
    main()
