"""Per-call overhead of structmat's cached contraction plan against calling ``torch.einsum`` directly.

For small operators the arithmetic is tiny, so the time per call is mostly overhead: input checks, reshapes, fetching
the factors, the plan lookup (ours) or the path search (``torch.einsum`` asks opt_einsum for a path on every call
when ``torch.backends.opt_einsum`` is enabled, the default when opt_einsum is installed). Both run in this process,
on the same operand tensors, one thread. Correctness is checked first (ours against the direct einsum, float32).

Each case is timed with autograd on (the parameters require grad, as in training) and under ``torch.no_grad()``.

Run: ``python benchmarks/bench_overhead.py [--min-run-time 0.3]``. Absolute times on a shared CPU mean little; the
ratio (ours / torch.einsum, measured side by side) is the number to read.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.benchmark import Timer

import structmat as sm


@dataclass
class Case:
    name: str
    op: sm.LinearOperator
    x: torch.Tensor
    direct: Callable[[torch.Tensor], torch.Tensor]  # the same map by one torch.einsum on the same tensors


def cases(batch: int) -> list[Case]:
    torch.manual_seed(0)
    out = []

    w = sm.Dense(64, 64)
    out.append(Case("Dense(64,64)", w, torch.randn(batch, 64), lambda x: torch.einsum("bi,oi->bo", x, w.weight)))

    u, v = sm.Dense(64, 8), sm.Dense(8, 64)
    out.append(
        Case(
            "Dense(64,8)@Dense(8,64) (low rank)",
            u @ v,
            torch.randn(batch, 64),
            lambda x: torch.einsum("bi,ri,or->bo", x, v.weight, u.weight),
        )
    )

    a, b, c = sm.Dense(64, 16), sm.Dense(16, 16), sm.Dense(16, 64)
    out.append(
        Case(
            "Dense(64,16)@Dense(16,16)@Dense(16,64)",
            sm.Product(a, b, c),
            torch.randn(batch, 64),
            lambda x: torch.einsum("bi,ri,sr,os->bo", x, c.weight, b.weight, a.weight),
        )
    )

    btt = sm.TensorNetwork("y[c,d] = L[c,d,a] R[a,c,b] x[a,b]", sizes=dict(a=8, b=8, c=8, d=8))
    out.append(
        Case(
            "BTT TensorNetwork a=b=c=d=8",
            btt,
            torch.randn(batch, 64),
            lambda x: torch.einsum("zab,cda,acb->zcd", x.reshape(-1, 8, 8), btt.L, btt.R).reshape(x.shape[0], 64),
        )
    )
    return out


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-run-time", type=float, default=0.15, help="seconds per timing block set")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best median is kept")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    args = parser.parse_args()
    torch.set_num_threads(1)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("ours: op(x) with its cached plan; einsum: torch.einsum on the same tensors (opt_einsum path search per")
    print("call, torch's default); einsum/nopath: the same with torch.backends.opt_einsum disabled (bare dispatch).")
    header = (
        f"{'operator':<46} {'batch':>5} {'grad':>4} {'flops':>8} {'ours µs':>8} {'einsum µs':>9} {'ratio':>6}"
        f" {'nopath µs':>9} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for batch in args.batch:
        for case in cases(batch):
            with torch.no_grad():  # correctness before timing
                torch.testing.assert_close(case.op(case.x), case.direct(case.x), rtol=1e-5, atol=1e-5)
                with torch.backends.opt_einsum.flags(enabled=False):
                    torch.testing.assert_close(case.op(case.x), case.direct(case.x), rtol=1e-5, atol=1e-5)
            flops = case.op.cost(batch=batch).flops

            for grad in (True, False):
                with contextlib.nullcontext() if grad else torch.no_grad():
                    t = measure(
                        {
                            "ours": (lambda c=case: c.op(c.x), True),
                            "einsum": (lambda c=case: c.direct(c.x), True),
                            "nopath": (lambda c=case: c.direct(c.x), False),
                        },
                        args.min_run_time,
                        args.rounds,
                    )
                print(
                    f"{case.name:<46} {batch:>5} {'on' if grad else 'off':>4} {flops:>8,} {t['ours']:>8.1f}"
                    f" {t['einsum']:>9.1f} {t['ours'] / t['einsum']:>6.2f} {t['nopath']:>9.1f}"
                    f" {t['ours'] / t['nopath']:>6.2f}"
                )


if __name__ == "__main__":
    main()
