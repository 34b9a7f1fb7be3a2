"""Per-call overhead of structmat's cached contraction plan against hand-written matmuls and ``torch.einsum``.

For small operators the arithmetic is tiny, so the time per call is mostly overhead: input checks, reshapes, fetching
the factors, the plan lookup (ours) or the path search (``torch.einsum`` asks opt_einsum for a path on every call
when ``torch.backends.opt_einsum`` is enabled, the default when opt_einsum is installed). Both run in this process,
on the same operand tensors, one thread. Correctness is checked first (ours against the direct einsum and the
hand-written code, float32). The hand-written baseline is what research code writes for the same map: an
``nn.Linear`` for ``Dense``, ``F.linear`` calls for chains, two ``bmm`` for the BTT network.

Each case is timed with autograd on (the parameters require grad, as in training) and under ``torch.no_grad()``.

Run: ``python benchmarks/bench_overhead.py [--min-run-time 0.3]``. Absolute times on a shared CPU mean little; the
ratios (ours / hand-written, ours / torch.einsum, measured side by side) are the numbers to read. ``suite(size)``
gives the rows of ``python -m benchmarks`` (D = 64; batch 8 and 64; grad on and off).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch.utils.benchmark import Timer

import structmat as sm


@dataclass
class Case:
    name: str
    op: sm.LinearOperator
    x: torch.Tensor
    direct: Callable[[torch.Tensor], torch.Tensor]  # the same map by one torch.einsum on the same tensors
    hand: Callable[[torch.Tensor], torch.Tensor]  # the same map as research code writes it: linear / bmm calls
    baseline: str  # the hand-written baseline's name


def cases(batch: int) -> list[Case]:
    torch.manual_seed(0)
    out = []

    w = sm.Dense(64, 64)
    linear = torch.nn.Linear(64, 64, bias=False)
    linear.weight = w.weight  # the same parameter: nn.Linear's call path on it
    out.append(
        Case(
            "Dense(64,64)",
            w,
            torch.randn(batch, 64),
            lambda x: torch.einsum("bi,oi->bo", x, w.weight),
            linear,
            "nn.Linear",
        )
    )

    u, v = sm.Dense(64, 8), sm.Dense(8, 64)
    out.append(
        Case(
            "Dense(64,8)@Dense(8,64) (low rank)",
            u @ v,
            torch.randn(batch, 64),
            lambda x: torch.einsum("bi,ri,or->bo", x, v.weight, u.weight),
            lambda x: F.linear(F.linear(x, v.weight), u.weight),
            "hand F.linear x2",
        )
    )

    a, b, c = sm.Dense(64, 16), sm.Dense(16, 16), sm.Dense(16, 64)
    out.append(
        Case(
            "Dense(64,16)@Dense(16,16)@Dense(16,64)",
            sm.Product(a, b, c),
            torch.randn(batch, 64),
            lambda x: torch.einsum("bi,ri,sr,os->bo", x, c.weight, b.weight, a.weight),
            lambda x: F.linear(F.linear(F.linear(x, c.weight), b.weight), a.weight),
            "hand F.linear x3",
        )
    )

    btt = sm.TensorNetwork("y[c,d] = L[c,d,a] R[a,c,b] x[a,b]", sizes=dict(a=8, b=8, c=8, d=8))
    out.append(
        Case(
            "BTT TensorNetwork a=b=c=d=8",
            btt,
            torch.randn(batch, 64),
            lambda x: torch.einsum("zab,cda,acb->zcd", x.reshape(-1, 8, 8), btt.L, btt.R).reshape(x.shape[0], 64),
            lambda x: _btt_hand(x, btt.L, btt.R),
            "hand bmm x2",
        )
    )
    return out


def _btt_hand(x: torch.Tensor, L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``y[z, c, d] = sum_{a, b} L[c, d, a] R[a, c, b] x[z, a, b]`` as two bmm: over a, then over c."""
    B = x.shape[0]
    t = torch.bmm(x.view(B, 8, 8).transpose(0, 1), R.transpose(1, 2))  # (a, z, c) = sum_b x[z, a, b] R[a, c, b]
    y = torch.bmm(t.permute(2, 1, 0), L.permute(0, 2, 1))  # (c, z, d) = sum_a t[a, z, c] L[c, d, a]
    return y.transpose(0, 1).reshape(B, 64)


def time_us(fn: Callable[[], torch.Tensor], min_run_time: float) -> float:
    """Median µs per call over blocks of calls (torch.utils.benchmark picks the block size; it warms up first)."""
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=1)
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e6


def measure(
    fns: dict[str, tuple[Callable[[], torch.Tensor], bool]], min_run_time: float, rounds: int
) -> dict[str, float]:
    """Interleave the functions for ``rounds`` rounds; keep each one's best median (the least disturbed by
    neighbours on a shared machine). Each function comes with the ``torch.backends.opt_einsum.enabled`` flag it
    runs under (set around its timing, so the flag switch is not timed)."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, (fn, opt) in fns.items():
            with torch.backends.opt_einsum.flags(enabled=opt):
                best[name] = min(best[name], time_us(fn, min_run_time))
    return best


def check(case: Case) -> None:
    """Ours, the einsum (with and without opt_einsum) and the hand-written code agree (float32)."""
    with torch.no_grad():
        expected = case.direct(case.x)
        torch.testing.assert_close(case.op(case.x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(case.hand(case.x), expected, rtol=1e-5, atol=1e-5)
        with torch.backends.opt_einsum.flags(enabled=False):
            torch.testing.assert_close(case.op(case.x), case.direct(case.x), rtol=1e-5, atol=1e-5)


def time_case(case: Case, grad: bool, min_run_time: float, rounds: int) -> dict[str, float]:
    """µs per call of ours, the hand-written code, the einsum and the bare einsum, interleaved."""
    with contextlib.nullcontext() if grad else torch.no_grad():
        return measure(
            {
                "ours": (lambda c=case: c.op(c.x), True),
                "hand": (lambda c=case: c.hand(c.x), True),
                "einsum": (lambda c=case: c.direct(c.x), True),
                "nopath": (lambda c=case: c.direct(c.x), False),
            },
            min_run_time,
            rounds,
        )


def suite(size: str = "full") -> list[dict[str, Any]]:
    """Rows for ``python -m benchmarks``: each case at D = 64 (batch 8 and 64; smoke: batch 8), grad on and off.

    ``ours_ms`` is ``op(x)``, the baseline the hand-written code, ``dense_ms`` is ``F.linear(x, W)`` with the
    operator's dense matrix; the note gives ``torch.einsum`` (with opt_einsum's per-call path search, torch's
    default) on the same tensors.
    """
    smoke = size == "smoke"
    min_run_time, rounds = (0.005, 1) if smoke else (0.05, 2)
    rows = []
    for batch in (8,) if smoke else (8, 64):
        for case in cases(batch):
            check(case)
            W = case.op.dense().detach().requires_grad_(True)  # a leaf like a parameter: autograd records
            dense = Case("dense", case.op, case.x, case.direct, lambda x, W=W: F.linear(x, W), "")
            flops = case.op.cost(batch=batch).flops
            m, n = case.op.shape
            nbytes = 4 * (batch * (m + n) + case.op.num_params)
            for grad in (True, False):
                t = time_case(case, grad, min_run_time, rounds)
                with contextlib.nullcontext() if grad else torch.no_grad():
                    dense_us = measure({"dense": (lambda d=dense: d.hand(d.x), True)}, min_run_time, rounds)["dense"]
                rows.append(
                    {
                        "group": "overhead",
                        "case": f"{case.name} B={batch} grad {'on' if grad else 'off'}",
                        "mode": "fwd",
                        "ours_ms": t["ours"] / 1e3,
                        "baseline": case.baseline,
                        "baseline_ms": t["hand"] / 1e3,
                        "dense_ms": dense_us / 1e3,
                        "flops": flops,
                        "bytes": nbytes,
                        "checked": True,
                        "note": f"torch.einsum {t['einsum']:.1f} µs, bare einsum {t['nopath']:.1f} µs; 1 thread",
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-run-time", type=float, default=0.15, help="seconds per timing block set")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best median is kept")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    args = parser.parse_args()
    torch.set_num_threads(1)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("ours: op(x) with its cached plan; hand: the same map as research code writes it (nn.Linear, F.linear,")
    print("bmm); einsum: torch.einsum on the same tensors (opt_einsum path search per call, torch's default);")
    print("nopath: the same einsum with torch.backends.opt_einsum disabled (bare dispatch). ratio: ours / column.")
    header = (
        f"{'operator':<40} {'batch':>5} {'grad':>4} {'flops':>8} {'ours µs':>8} {'hand µs':>8} {'ratio':>6}"
        f" {'einsum µs':>9} {'ratio':>6} {'nopath µs':>9} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for batch in args.batch:
        for case in cases(batch):
            check(case)
            flops = case.op.cost(batch=batch).flops
            for grad in (True, False):
                t = time_case(case, grad, args.min_run_time, args.rounds)
                print(
                    f"{case.name:<40} {batch:>5} {'on' if grad else 'off':>4} {flops:>8,} {t['ours']:>8.1f}"
                    f" {t['hand']:>8.1f} {t['ours'] / t['hand']:>6.2f}"
                    f" {t['einsum']:>9.1f} {t['ours'] / t['einsum']:>6.2f} {t['nopath']:>9.1f}"
                    f" {t['ours'] / t['nopath']:>6.2f}"
                )


if __name__ == "__main__":
    main()
