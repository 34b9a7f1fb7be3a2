"""Structured operators against the same maps written by hand (reshape + matmul/bmm, as research code writes them).

For each case: correctness first (ours == hand-written == x @ W.T with the dense matrix, ``assert_close`` in float32
on a small batch), then ours, the hand-written code and the dense GEMM are timed interleaved in this process
(``torch.utils.benchmark``, median of blocked runs), forward and forward+backward (the input and the parameters
require grad; the backward is seeded with a fixed tensor). Every output is made ``.contiguous()`` before it counts,
as the next layer would do. Ratios below 1 mean ours is faster.

Hand-written baselines (from the math, see each function): Kronecker ``(A ⊗ B) x`` as a GEMM on a view
(``x3 @ B.T``) and a broadcast batched GEMM (``A @ t``); BTT as the two batched GEMMs of Qiu et al.'s code with the
transposing copy between them; Monarch as ``blockdiag_butterfly_multiply`` of Dao et al. (two bmm, the middle
transpose and the output permutation); LowRank as two matmuls; MLR as the global low rank plus the per-block bmm pair.

Run: ``python benchmarks/bench_operators.py [--size smoke|full] [--threads 1 2]``; ``suite(size)`` returns the rows
of the benchmark suite (groups "operators" and "overhead").
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.benchmark import Timer

import structmat as sm

Fn = Callable[[torch.Tensor], torch.Tensor]


# -- hand-written maps, from the math ---------------------------------------------------------------------------------
def hand_kron(op: sm.Kronecker) -> Fn:
    """``y = (A ⊗ B) x``: x viewed (B, a, b); ``t = x3 @ B.T`` (one GEMM), then ``y3 = A @ t`` (batched)."""
    A, B = (p.weight for p in op.parts)

    def f(x: torch.Tensor) -> torch.Tensor:
        t = x.view(x.shape[0], A.shape[1], B.shape[1]) @ B.T
        return torch.matmul(A, t).reshape(x.shape[0], -1)

    return f


def hand_btt(op: sm.BTT) -> Fn:
    """Two-core BTT as Qiu et al.'s code: x (z, i0, i1) -> bmm over i0 with core0 -> transposing copy -> bmm over
    o0 with core1 -> (z, o0, o1). core0[i0, 1, o0, i1, r], core1[o0, r, o1, i0, 1] (see structmat.operators.btt)."""
    (i0, i1), (o0, o1), (r,) = op.in_factors, op.out_factors, op.ranks
    c0, c1 = op.core0, op.core1

    def f(x: torch.Tensor) -> torch.Tensor:
        z = x.shape[0]
        w0 = c0.reshape(i0, o0, i1, r).permute(0, 2, 1, 3).reshape(i0, i1, o0 * r)
        h = torch.bmm(x.reshape(z, i0, i1).transpose(0, 1), w0)  # (i0, z, o0 r)
        h = h.reshape(i0, z, o0, r).permute(2, 1, 0, 3).reshape(o0, z, i0 * r)  # the transposing copy
        w1 = c1.reshape(o0, r, o1, i0).permute(0, 3, 1, 2).reshape(o0, i0 * r, o1)
        y = torch.bmm(h, w1)  # (o0, z, o1)
        return y.transpose(0, 1).reshape(z, o0 * o1)

    return f


def hand_monarch(op: sm.Monarch) -> Fn:
    """Dao et al.'s ``blockdiag_butterfly_multiply`` (without its ``out=`` buffers, so that autograd runs)."""
    w1, w2 = op.blkdiag1, op.blkdiag2
    k, q, p = w1.shape
    l_, s, r = w2.shape

    def f(x: torch.Tensor) -> torch.Tensor:
        z = x.shape[0]
        out1 = torch.bmm(x.reshape(z, k, p).transpose(0, 1), w1.transpose(-1, -2))  # (k, z, q)
        out1 = out1.transpose(0, 1).reshape(z, r, l_).transpose(-1, -2).contiguous().transpose(0, 1)  # (l, z, r)
        out2 = torch.bmm(out1, w2.transpose(-1, -2))  # (l, z, s)
        return out2.permute(1, 2, 0).reshape(z, s * l_)

    return f


def hand_lowrank(op: sm.LowRank) -> Fn:
    """``y = (x @ V.T) @ U.T``."""
    U, V = op.U, op.V
    return lambda x: (x @ V.T) @ U.T


def hand_mlr(op: sm.MLR) -> Fn:
    """Each level ``l`` with ``k`` blocks: x viewed (k, z, p), ``bmm`` with V then U, back to (z, m); summed."""
    levels = []
    for level in op.levels:
        net = level._node.network
        U = next(fa for fa in net.factors if fa.name == "U").fetch()
        V = next(fa for fa in net.factors if fa.name == "V").fetch()
        levels.append((U.reshape(-1, *U.shape[-2:]), V.reshape(-1, *V.shape[-2:])))

    def f(x: torch.Tensor) -> torch.Tensor:
        z = x.shape[0]
        y = None
        for U, V in levels:
            k = U.shape[0]
            if k == 1:
                part = (x @ V[0].T) @ U[0].T
            else:
                xs = x.reshape(z, k, -1).transpose(0, 1)
                part = torch.bmm(torch.bmm(xs, V.transpose(1, 2)), U.transpose(1, 2)).transpose(0, 1).reshape(z, -1)
            y = part if y is None else y + part
        return y

    return f


# -- cases -------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    op: sm.LinearOperator
    hand: Fn
    baseline: str


def cases(d: int) -> list[Case]:
    torch.manual_seed(0)
    s = math.isqrt(d)
    out = []
    kron = sm.Kronecker.from_sizes((s, s), (d // s, d // s))
    out.append(Case(f"kron dense{s}⊗dense{d // s} D={d}", kron, hand_kron(kron), "hand 2 GEMMs"))
    for r in (1, 4):
        btt = sm.BTT(d, d, ranks=r)
        out.append(Case(f"btt rank {r} D={d}", btt, hand_btt(btt), "hand bmm (Qiu et al.)"))
    mon = sm.Monarch(d, d, nblocks=s)
    out.append(Case(f"monarch nblocks={s} D={d}", mon, hand_monarch(mon), "hand bmm (Dao et al.)"))
    lr = sm.LowRank(d, d, rank=d // 16)
    out.append(Case(f"lowrank r={d // 16} D={d}", lr, hand_lowrank(lr), "hand 2 matmuls"))
    mlr = sm.MLR(d, d, ranks=[d // 32, d // 64], blocks=[1, 16])
    out.append(Case(f"mlr r=[{d // 32},{d // 64}] blocks=[1,16] D={d}", mlr, hand_mlr(mlr), "hand bmm"))
    return out


def check(case: Case, batch: int = 8) -> None:
    """ours == hand-written == dense, float32, and gradients of ours == hand-written."""
    op = case.op
    x = torch.randn(batch, op.shape[1], requires_grad=True)
    dense = op.dense().detach()
    y, y_hand = op(x), case.hand(x)
    torch.testing.assert_close(y, y_hand, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, x.detach() @ dense.T, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *op.parameters()], g)
    grads_hand = torch.autograd.grad(case.hand(x), [x, *op.parameters()], g)
    for a, b in zip(grads, grads_hand):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _timer(fn: Callable[[], object], threads: int, min_run_time: float) -> float:
    t = Timer("fn()", globals={"fn": fn}, num_threads=threads)
    return t.blocked_autorange(min_run_time=min_run_time).median * 1e3


def _runner(fn: Fn, x: torch.Tensor, mode: str) -> Callable[[], object]:
    if mode == "fwd":

        def fwd() -> object:
            with torch.no_grad():
                return fn(x).contiguous()

        return fwd
    xg = x.detach().requires_grad_(True)
    g = torch.randn(x.shape[0], fn(x[:1]).shape[-1])

    def both() -> object:
        y = fn(xg).contiguous()
        y.backward(g)
        return y

    return both


def measure(
    case: Case, batch: int, threads: int, mode: str, rounds: int, min_run_time: float
) -> tuple[float, float, float]:
    """Median ms of ours, the hand-written map and the dense GEMM, interleaved over ``rounds`` (best of rounds)."""
    op = case.op
    torch.set_num_threads(threads)
    x = torch.randn(batch, op.shape[1])
    W = op.dense().detach().requires_grad_(True)
    fns = [_runner(op, x, mode), _runner(case.hand, x, mode), _runner(lambda t: t @ W.T, x, mode)]
    best = [math.inf] * 3
    for _ in range(rounds):
        for k, fn in enumerate(fns):
            best[k] = min(best[k], _timer(fn, threads, min_run_time))
    for p in [*op.parameters(), W]:
        p.grad = None
    return best[0], best[1], best[2]


def overhead_rows(min_run_time: float, rounds: int) -> list[dict]:
    """Per-call overhead: Dense(64, 64) at batch 8 against nn.Linear(64, 64) (no bias), grad on and off."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    op = sm.Dense(64, 64)
    lin = torch.nn.Linear(64, 64, bias=False)
    x = torch.randn(8, 64)
    torch.testing.assert_close(op(x), x @ op.weight.T)
    rows = []
    for grad in (True, False):

        def ours() -> object:
            return op(x)

        def linear() -> object:
            return lin(x)

        best = [math.inf, math.inf]
        for _ in range(rounds):
            with torch.set_grad_enabled(grad):
                best[0] = min(best[0], _timer(ours, 1, min_run_time))
                best[1] = min(best[1], _timer(linear, 1, min_run_time))
        rows.append(
            dict(
                group="overhead",
                case=f"Dense(64,64) B=8 grad {'on' if grad else 'off'}",
                mode="fwd",
                ours_ms=best[0],
                baseline="nn.Linear",
                baseline_ms=best[1],
                dense_ms=None,
                flops=2 * 8 * 64 * 64,
                bytes=4 * (8 * 64 * 2 + 64 * 64),
                checked=True,
                note="1 thread",
            )
        )
    return rows


SIZES = {"smoke": [(64, 32)], "full": [(1024, 4096), (4096, 1024)]}


def suite(size: str = "full", threads: tuple[int, ...] = (1, 2)) -> list[dict]:
    """Rows of the benchmark suite: group "operators" (ours vs hand-written vs dense) and "overhead"."""
    smoke = size == "smoke"
    min_run_time, rounds = (0.01, 1) if smoke else (0.2, 2)
    saved = torch.get_num_threads()
    rows: list[dict] = []
    try:
        for d, batch in SIZES[size]:
            for case in cases(d):
                check(case)
                op = case.op
                flops = op.cost(batch).flops
                nbytes = 4 * (batch * (op.shape[0] + op.shape[1]) + op.num_params)
                for th in threads if not smoke else (1,):
                    for mode in ("fwd", "fwd+bwd"):
                        ours, hand, dense = measure(case, batch, th, mode, rounds, min_run_time)
                        mult = 1 if mode == "fwd" else 3
                        rows.append(
                            dict(
                                group="operators",
                                case=f"{case.name} B={batch}",
                                mode=mode,
                                ours_ms=ours,
                                baseline=case.baseline,
                                baseline_ms=hand,
                                dense_ms=dense,
                                flops=flops * mult,
                                bytes=nbytes * (1 if mode == "fwd" else 2),
                                checked=True,
                                note=f"{th} thread{'s' if th > 1 else ''}, fp32, outputs made contiguous",
                            )
                        )
        rows += overhead_rows(min_run_time, rounds)
    finally:
        torch.set_num_threads(saved)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    rows = suite(args.size, tuple(args.threads))
    head = f"{'case':48} {'mode':8} {'ours ms':>9} {'hand ms':>9} {'ratio':>6} {'dense ms':>9} {'vs dense':>8}  note"
    print(head)
    print("-" * len(head))
    for r in rows:
        hand, dense = r["baseline_ms"], r["dense_ms"]
        ratio = f"{r['ours_ms'] / hand:6.2f}" if hand else "     -"
        vs = f"{r['ours_ms'] / dense:8.2f}" if dense else "       -"
        dms = f"{dense:9.3f}" if dense else "        -"
        print(f"{r['case']:48} {r['mode']:8} {r['ours_ms']:9.3f} {hand:9.3f} {ratio} {dms} {vs}  {r['note']}")


if __name__ == "__main__":
    main()
