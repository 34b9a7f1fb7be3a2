"""Contraction paths of fused products: structmat's plan against the chain and against opt_einsum's optimum.

For each case (a product of operators that fuses into one network), at a few batch sizes:

- FLOPs (opt_einsum's ``opt_cost``) of ``ours`` (the planned path), ``old`` (the previous rule: ``optimal`` up to 6
  operands, ``dp`` up to 10, ``greedy`` beyond), ``chain`` (the parts applied one at a time, each on its own plan)
  and ``opt`` (opt_einsum's ``optimal`` up to 7 operands, else ``dp`` with outer products; ``-`` where it would take
  too long);
- wall time of one apply, same process, one thread: ``op(x)`` (ours), the parts applied one at a time (chain), and
  the same einsum along opt's path through opt_einsum (opt); checked to agree first;
- planning time of ours (the first cost query, uncached).

Then a table of planning time against the number of operands for opt_einsum's searches and ours, on three network
shapes: chains of matrices, Kronecker products (every factor meets only the input) and random connected networks.

Run: ``python benchmarks/bench_paths.py [--min-run-time 0.2] [--skip-timing]``. ``suite(size)`` gives the rows of
``python -m benchmarks``: per case and batch, the planning time (mode "plan", against opt_einsum's search) and the
apply time (against the chain and a dense matrix); planning time on the three network shapes at 6, 10, 14 and 17
operands (against opt_einsum's ``dp``).
"""

from __future__ import annotations

import argparse
import functools
import operator
import random
import signal
import time
from collections.abc import Callable
from typing import Any

import opt_einsum as oe
import torch
from torch.utils.benchmark import Timer

import structmat as sm
from structmat.core import paths as _paths

OPT_LIMIT_S = 10  # give opt_einsum's exact searches this long per case


def old_rule(eq: str, shapes: Any) -> int:
    n = len(shapes)
    optimize = "optimal" if n <= 6 else "dp" if n <= 10 else "greedy"
    return int(oe.contract_path(eq, *shapes, shapes=True, optimize=optimize)[1].opt_cost)


class _TimeoutError(Exception):
    pass


def _alarm(*_: Any) -> None:
    raise _TimeoutError


def limited(fn: Callable[[], Any], seconds: float) -> tuple[Any, float]:
    """``(fn(), milliseconds)``, or ``(None, inf)`` past ``seconds``."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        start = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - start) * 1e3
    except _TimeoutError:
        return None, float("inf")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def opt_path(eq: str, shapes: Any, seconds: float = OPT_LIMIT_S) -> Any:
    optimize = "optimal" if len(shapes) <= 7 else oe.DynamicProgramming(search_outer=True)
    return limited(lambda: oe.contract_path(eq, *shapes, shapes=True, optimize=optimize), seconds)[0]


def cases() -> list[tuple[str, list[sm.LinearOperator], list[int]]]:
    torch.manual_seed(0)

    def alternating(count: int, wide: int, narrow: int) -> list[sm.LinearOperator]:
        dims = [wide if k % 2 == 0 else narrow for k in range(count + 1)]
        return [sm.Dense(dims[k], dims[k + 1]) for k in range(count)]

    rank_one = [12, 1, 12, 1, 12, 1, 12]
    return [
        ("10 Dense 8,2,8,...", alternating(10, 8, 2), [1, 4, 32]),
        ("10 Dense 256,32,256,...", alternating(10, 256, 32), [1, 64]),
        ("4 BTT(64,64) 3 cores, bond 2", [sm.BTT(64, 64, ranks=2, out_factors=(4, 4, 4)) for _ in range(4)], [1, 32]),
        ("6 Dense 12,1,12,... (rank 1)", [sm.Dense(a, b) for a, b in zip(rank_one, rank_one[1:])], [5, 64]),
        (
            "LowRank Dense LowRank LowRank",
            [sm.LowRank(96, 160, rank=8), sm.Dense(160, 48), sm.LowRank(48, 96, rank=16), sm.LowRank(96, 96, rank=4)],
            [1, 32],
        ),
        ("3 TT-like TensorNetworks", [_train() for _ in range(3)], [1, 32]),
    ]


def _train() -> sm.LinearOperator:
    spec = "y[a,b,c] = G1[a,i,r] G2[r,b,j,s] G3[s,c,k] x[i,j,k]"
    return sm.TensorNetwork(spec, sizes=dict(a=4, b=4, c=4, i=4, j=4, k=4, r=3, s=3))


def timed(fn: Callable[[], Any], min_run_time: float) -> float:
    return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e6


def run_cases(min_run_time: float, skip_timing: bool) -> None:
    header = (
        f"{'case':32} {'batch':>5} {'ops':>3} {'ours':>10} {'old':>10} {'chain':>10} {'opt':>10} "
        f"{'ours/opt':>8} {'ours/chain':>10} {'plan ms':>7}"
    )
    if not skip_timing:
        header += f" {'ours µs':>8} {'chain µs':>8} {'opt µs':>8}"
    print(header)
    print("-" * len(header))
    for name, ops, batches in cases():
        for batch in batches:
            fused = functools.reduce(operator.matmul, ops)
            start = time.perf_counter()
            cost = fused.cost(batch)
            plan_ms = (time.perf_counter() - start) * 1e3
            (c,) = cost.contractions
            chain = sum(op.cost(batch).flops for op in ops)
            found = opt_path(c.equation, c.shapes)
            opt = int(found[1].opt_cost) if found is not None else None
            line = (
                f"{name:32} {batch:5} {len(c.shapes):3} {cost.flops:10,} {old_rule(c.equation, c.shapes):10,} "
                f"{chain:10,} {f'{opt:,}' if opt is not None else '-':>10} "
                f"{cost.flops / opt if opt else float('nan'):8.3f} {cost.flops / chain:10.3f} {plan_ms:7.1f}"
            )
            if not skip_timing:
                line += " " + time_case(fused, ops, c, found, batch, min_run_time)
            print(line, flush=True)


def _apply_parts(ops: list[sm.LinearOperator], x: torch.Tensor) -> torch.Tensor:
    """The parts of a product applied one at a time, the last one first."""
    for op in reversed(ops):
        x = op(x)
    return x


def time_case(fused: sm.LinearOperator, ops: list[sm.LinearOperator], c: Any, found: Any, batch: int, t: float) -> str:
    x = torch.randn(batch, fused.shape[1])
    factors = [fa.fetch() for fa in fused._node.network.factors]

    def chain() -> torch.Tensor:
        return _apply_parts(ops, x)

    with torch.no_grad():
        expected = chain()
        torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-4)
        opt_us = float("nan")
        if found is not None:
            expr = oe.contract_expression(c.equation, *c.shapes, optimize=found[0])
            operands = [x.reshape(c.shapes[0]), *factors]
            torch.testing.assert_close(
                expr(*operands, backend="torch").reshape(batch, -1), expected, rtol=1e-4, atol=1e-4
            )
            opt_us = timed(lambda: expr(*operands, backend="torch"), t)
        ours_us = timed(lambda: fused(x), t)
        chain_us = timed(chain, t)
    return f"{ours_us:8.1f} {chain_us:8.1f} {opt_us:8.1f}"


# -- planning time against the number of operands --------------------------------------------------------------------
LETTERS = "abcdefghijklmnopqrstuvwxyABCDEFGHIJKLMNOPQRSTUVWXY"


def chain_net(n: int, b: int) -> tuple[str, list[tuple[int, ...]]]:
    rng = random.Random(n)
    sz = [rng.choice([2, 3, 5, 8, 12]) for _ in range(n)]
    terms = ["z" + LETTERS[0]] + [LETTERS[k + 1] + LETTERS[k] for k in range(n - 1)]
    shapes = [(b, sz[0])] + [(sz[k + 1], sz[k]) for k in range(n - 1)]
    return ",".join(terms) + "->z" + LETTERS[n - 1], shapes


def kron_net(n: int, b: int) -> tuple[str, list[tuple[int, ...]]]:
    k = n - 1
    ins, outs = LETTERS[:k], LETTERS[k : 2 * k]
    terms = ["z" + ins] + [outs[j] + ins[j] for j in range(k)]
    return ",".join(terms) + "->z" + outs, [(b,) + (3,) * k] + [(3, 3)] * k


def random_net(n: int, b: int) -> tuple[str, list[tuple[int, ...]]]:
    rng = random.Random(n)
    terms: list[set[str]] = [set() for _ in range(n)]
    sizes = {"z": b}
    labels = iter(LETTERS)
    for j in range(1, n):
        for i in {rng.randrange(j)} | ({rng.randrange(n)} if rng.random() < 0.5 else set()) - {j}:
            c = next(labels)
            terms[i].add(c)
            terms[j].add(c)
            sizes[c] = rng.randint(2, 6)
    out = []
    for _ in range(2):
        c = next(labels)
        terms[rng.randrange(n)].add(c)
        sizes[c] = rng.randint(2, 6)
        out.append(c)
    names = ["z" + "".join(sorted(terms[0]))] + ["".join(sorted(t)) for t in terms[1:]]
    return ",".join(names) + "->z" + "".join(out), [tuple(sizes[c] for c in t) for t in names]


def planning_table(max_operands: int, limit_s: float) -> None:
    searches: dict[str, Callable[[str, Any], Any]] = {
        "ours": lambda eq, shapes: _paths.best_path(eq, shapes),
        "optimal": lambda eq, shapes: oe.contract_path(eq, *shapes, shapes=True, optimize="optimal"),
        "dp": lambda eq, shapes: oe.contract_path(eq, *shapes, shapes=True, optimize="dp"),
        "dp+outer": lambda eq, shapes: oe.contract_path(
            eq, *shapes, shapes=True, optimize=oe.DynamicProgramming(search_outer=True)
        ),
        "greedy": lambda eq, shapes: oe.contract_path(eq, *shapes, shapes=True, optimize="greedy"),
    }
    print(f"\nplanning time, ms (batch 32; '-': over {limit_s:g} s or skipped after one was); flops relative to ours")
    print(f"{'network':8} {'ops':>3} " + " ".join(f"{k:>17}" for k in searches))
    for family in (chain_net, kron_net, random_net):
        gave_up: set[str] = set()
        for n in range(3, max_operands + 1):
            eq, shapes = family(n, 32)
            cells = []
            base = None
            for key, search in searches.items():
                if key in gave_up:
                    cells.append(f"{'-':>17}")
                    continue
                out, ms = limited(functools.partial(search, eq, shapes), limit_s)
                if out is None:
                    gave_up.add(key)
                    cells.append(f"{'-':>17}")
                    continue
                flops = int(out[1].opt_cost)
                base = base or flops
                cells.append(f"{ms:9.1f} ({flops / base:5.3f})")
            print(f"{family.__name__[:-4]:8} {n:3} " + " ".join(cells), flush=True)


def _plan_ms(ops: list[sm.LinearOperator], batch: int, repeats: int) -> tuple[float, Any]:
    """Median ms of the first cost query of a freshly fused product (its plan is built then), and that cost."""
    times, cost = [], None
    for _ in range(repeats):
        fused = functools.reduce(operator.matmul, ops)
        start = time.perf_counter()
        cost = fused.cost(batch)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2], cost


def _row(case: str, mode: str, ours_ms: float, baseline: str, baseline_ms: float | None, note: str, **kw: Any) -> Any:
    row = dict(group="paths", case=case, mode=mode, ours_ms=ours_ms, baseline=baseline, baseline_ms=baseline_ms)
    row.update(dense_ms=None, flops=None, bytes=None, checked=True, note=note)
    row.update(kw)
    return row


def suite(size: str = "full") -> list[dict[str, Any]]:
    """Rows for ``python -m benchmarks`` (smoke: the first case at batch 1 and the 6-operand networks)."""
    smoke = size == "smoke"
    limit = 0.5 if smoke else 2.0  # seconds for an opt_einsum search; over it the baseline is left out
    repeats, min_run_time = (1, 0.005) if smoke else (3, 0.05)
    rows = []
    chosen = cases()[:1] if smoke else cases()
    for name, ops, batches in chosen:
        for batch in batches[:1] if smoke else batches:
            plan_ms, cost = _plan_ms(ops, batch, repeats)
            (c,) = cost.contractions
            found, opt_ms = limited(functools.partial(opt_path, c.equation, c.shapes), limit)
            opt = f"{int(found[1].opt_cost):,}" if found is not None else f"- (over {limit:g} s)"
            rows.append(
                _row(
                    f"{name} B={batch} planning",
                    "plan",
                    plan_ms,
                    "opt_einsum " + ("optimal" if len(c.shapes) <= 7 else "dp+outer"),
                    opt_ms if found is not None else None,
                    f"{len(c.shapes)} operands; path flops ours {cost.flops:,}, opt_einsum {opt}",
                )
            )
            rows.append(_apply_row(name, ops, batch, min_run_time))
    for family in (chain_net, kron_net, random_net):
        for n in (6,) if smoke else (6, 10, 14, 17):
            eq, shapes = family(n, 32)
            times = []
            for _ in range(repeats):
                out, ms = limited(functools.partial(_paths.best_path, eq, shapes), 60.0)
                times.append(ms)
            ours_ms = sorted(times)[len(times) // 2]
            found, dp_ms = limited(functools.partial(oe.contract_path, eq, *shapes, shapes=True, optimize="dp"), limit)
            rel = f"{int(found[1].opt_cost) / int(out[1].opt_cost):.3f}" if found is not None else "-"
            rows.append(
                _row(
                    f"{family.__name__[:-4]} network, {n} operands, B=32, planning",
                    "plan",
                    ours_ms,
                    "opt_einsum dp",
                    dp_ms if found is not None else None,
                    f"path flops dp / ours {rel}" + ("" if found is not None else f"; dp over {limit:g} s"),
                )
            )
    return rows


def _apply_row(name: str, ops: list[sm.LinearOperator], batch: int, min_run_time: float) -> dict[str, Any]:
    """``op(x)`` of the fused product against the parts applied one at a time and against its dense matrix."""
    fused = functools.reduce(operator.matmul, ops)
    x = torch.randn(batch, fused.shape[1])

    def chain() -> torch.Tensor:
        return _apply_parts(ops, x)

    with torch.no_grad():
        W = fused.dense()
        expected = chain()
        torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(x @ W.T, expected, rtol=1e-4, atol=1e-4)
        best = {"ours": float("inf"), "chain": float("inf"), "dense": float("inf")}
        for _ in range(2):
            best["ours"] = min(best["ours"], timed(lambda: fused(x), min_run_time))
            best["chain"] = min(best["chain"], timed(chain, min_run_time))
            best["dense"] = min(best["dense"], timed(lambda: torch.nn.functional.linear(x, W), min_run_time))
    m, n = fused.shape
    return _row(
        f"{name} B={batch}",
        "fwd",
        best["ours"] / 1e3,
        "chain (parts one at a time)",
        best["chain"] / 1e3,
        "no_grad; 1 thread",
        dense_ms=best["dense"] / 1e3,
        flops=fused.cost(batch).flops,
        bytes=4 * (batch * (m + n) + sum(op.num_params for op in ops)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--min-run-time", type=float, default=0.2)
    parser.add_argument("--skip-timing", action="store_true", help="flops and planning only")
    parser.add_argument("--max-operands", type=int, default=17)
    parser.add_argument("--limit", type=float, default=5.0, help="seconds per search in the planning table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run_cases(args.min_run_time, args.skip_timing)
    planning_table(args.max_operands, args.limit)


if __name__ == "__main__":
    main()
