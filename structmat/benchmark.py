"""Time an operator against the same map as a dense matrix, on this machine: :func:`bench`.

Structure saves FLOPs, not always time: near ``1000 x 1000`` a dense GEMM runs so much closer to the machine's peak
than a chain of small contractions that it can win despite doing more arithmetic. :func:`bench` measures both side by
side in this process and says which to use.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .checks import check_int
from .core.base import LinearOperator
from .core.cost import Cost, Timing

__all__ = ["bench", "BenchResult", "measure_cost", "DENSE_LIMIT_BYTES"]

#: The dense matrix a benchmark materializes may take at most this many bytes (4 GiB).
DENSE_LIMIT_BYTES = 4 * 2**30

# assert_close-level tolerance for comparing the operator with its dense matrix, relative to the output's scale
_RTOL = {torch.float64: 1e-7, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class BenchResult:
    """What :func:`bench` measured: the operator against the same map as a dense matrix, timed side by side.

    Attributes:
        name: the operator's name, e.g. ``"Product(1024, 1024)"``.
        shape: the operator's ``(m, n)``.
        heads: H for a stack of H operators, else None.
        batch: number of input vectors per call.
        backward: True when forward + backward was timed.
        inference: True when the forward ran under ``torch.inference_mode()`` (else ``torch.no_grad()``).
        dtype: the dtype timed.
        threads: torch's intra-op thread count during the timing.
        seconds: median seconds per call of the operator.
        dense_seconds: median seconds per call of the dense matrix.
        flops: the operator's forward FLOPs for ``batch`` (``op.cost(batch).flops``, a multiply-add counts 2).
        dense_flops: the dense matrix's forward FLOPs (``2 * m * n * batch``, times H for a stack).
    """

    name: str
    shape: tuple[int, int]
    heads: int | None
    batch: int
    backward: bool
    inference: bool
    dtype: torch.dtype
    threads: int
    seconds: float
    dense_seconds: float
    flops: int
    dense_flops: int

    @property
    def timing(self) -> Timing:
        """The measurement as the :class:`~structmat.Timing` a :class:`~structmat.Cost` carries."""
        return Timing(
            seconds=self.seconds,
            dense_seconds=self.dense_seconds,
            threads=self.threads,
            dtype=str(self.dtype).removeprefix("torch."),
            backward=self.backward,
            inference=self.inference,
        )

    @property
    def ratio(self) -> float:
        """``seconds / dense_seconds``: below 1 the operator is faster than dense."""
        return self.timing.ratio

    @property
    def speedup(self) -> float:
        """``dense_seconds / seconds``: above 1 the operator is faster than dense."""
        return self.timing.speedup

    @property
    def verdict(self) -> str:
        """``"1.8x faster than dense"``, ``"as fast as dense (within 5%)"`` or ``"... slower than dense: use dense
        here"``."""
        return self.timing.verdict

    @property
    def work_factor(self) -> int:
        """FLOPs of the timed work per forward FLOP: 1 forward; 3 forward + backward (the backward of a linear map
        costs two forwards: the input's gradient and the parameters')."""
        return 3 if self.backward else 1

    @property
    def gflops(self) -> float:
        """Achieved GFLOP/s of the operator: ``work_factor * flops / seconds / 1e9``."""
        return self.work_factor * self.flops / self.seconds / 1e9

    @property
    def dense_gflops(self) -> float:
        """Achieved GFLOP/s of the dense matrix: ``work_factor * dense_flops / dense_seconds / 1e9``."""
        return self.work_factor * self.dense_flops / self.dense_seconds / 1e9

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields and the derived numbers (ratio, speedup, GFLOP/s, verdict)."""
        out = dataclasses.asdict(self)
        out["shape"] = list(self.shape)
        out["dtype"] = str(self.dtype).removeprefix("torch.")
        out.update(
            ratio=self.ratio,
            speedup=self.speedup,
            gflops=self.gflops,
            dense_gflops=self.dense_gflops,
            verdict=self.verdict,
        )
        return out

    def __str__(self) -> str:
        m, n = self.shape
        heads = f", heads {self.heads}" if self.heads is not None else ""
        mode = "forward+backward" if self.backward else "forward, inference mode" if self.inference else "forward"
        dtype = str(self.dtype).removeprefix("torch.")
        rows = [
            ("ours", self.seconds, self.flops, self.gflops),
            ("dense", self.dense_seconds, self.dense_flops, self.dense_gflops),
        ]
        lines = [
            f"{self.name}: ({m}, {n}){heads}, batch {self.batch}, {mode}, {dtype}, {self.threads} thread(s)",
            f"  {'':6} {'ms':>10} {'fwd FLOPs':>15} {'GFLOP/s':>9}",
        ]
        lines += [f"  {k:6} {s * 1e3:10.4g} {f:15,} {g:9.3g}" for k, s, f, g in rows]
        lines.append(f"  ours / dense: {self.ratio:.3g}, {self.verdict}")
        return "\n".join(lines)


def bench(
    op: LinearOperator,
    batch: int = 64,
    *,
    backward: bool = False,
    inference: bool = False,
    dtype: torch.dtype | None = None,
    threads: int | None = None,
    min_run_time: float = 0.2,
    rounds: int = 3,
) -> BenchResult:
    """Time ``op(x)`` against the same map as a dense matrix, side by side in this process.

    The dense baseline is ``torch.nn.functional.linear(x, W)`` with ``W = op.dense()`` materialized once (a stack of
    H heads reads one input, so its ``(H, m, n)`` matrices run as one ``(H*m, n)`` matrix and the output is reshaped
    to ``(batch, H, m)``: the fastest dense form of the same map). Both are first checked to give the same output
    (and, with ``backward``, the same input gradient) at an ``assert_close``-level tolerance for the dtype; then they
    are timed with ``torch.utils.benchmark`` (``blocked_autorange``), interleaved for ``rounds`` rounds, each keeping
    its best median (the least disturbed by neighbours on a shared machine).

    A forward-only call runs under ``torch.no_grad()``, or with ``inference=True`` under ``torch.inference_mode()``,
    where a network may contract its weight-only parts once and keep them (see ``LinearOperator.freeze``); the dense
    matrix runs in the same mode. With ``backward=True`` a call is forward + backward: ``torch.autograd.grad`` of the
    output (against a fixed random cotangent) with respect to the input and every parameter that requires grad (for
    dense, ``x`` and ``W``). ``flops`` is the ordinary plan's forward count (``op.cost(batch)``) in every mode.

    Args:
        op: the operator (its parameters on the device to time on; not on ``meta``).
        batch: number of input vectors per call.
        backward: time forward + backward instead of forward only.
        inference: time the forward under ``torch.inference_mode()`` (not with ``backward``).
        dtype: the floating-point dtype to time in; the operator is copied to it when its parameters have another
            (default: the operator's dtype, torch's default for an operator without parameters).
        threads: torch's intra-op thread count for the timing (default: the current one).
        min_run_time: seconds each timing runs at least (per round and per side).
        rounds: interleaved rounds.

    Returns:
        A :class:`BenchResult` (print it for a table; ``.verdict`` says which to use).

    Raises:
        TypeError: ``op`` is not a LinearOperator, or an argument has the wrong type.
        ValueError: a bad value (batch < 1, ...), an operator on the ``meta`` device, or a dense matrix over
            :data:`DENSE_LIMIT_BYTES`.
        RuntimeError: the operator and its dense matrix disagree (then nothing is timed).

    Example:
        >>> import structmat as sm
        >>> r = sm.bench(sm.Dense(256, 16) @ sm.Dense(16, 256), batch=32, min_run_time=0.01, rounds=1)
        >>> r.flops, r.dense_flops, r.batch
        (524288, 4194304, 32)
        >>> r.ratio > 0 and ("faster" in r.verdict or "slower" in r.verdict or "as fast" in r.verdict)
        True
    """
    if not isinstance(op, LinearOperator):
        raise TypeError(f"bench: op must be a structmat LinearOperator, got {type(op).__name__}")
    name = op.name
    who = f"bench({name})"
    batch = check_int(who, "batch", batch)
    rounds = check_int(who, "rounds", rounds)
    if threads is not None:
        threads = check_int(who, "threads", threads)
    for flag, value in (("backward", backward), ("inference", inference)):
        if not isinstance(value, bool):
            raise TypeError(f"{who}: {flag} must be a bool, got {type(value).__name__}")
    if backward and inference:
        raise ValueError(f"{who}: backward=True and inference=True exclude each other (no gradients in inference mode)")
    if isinstance(min_run_time, bool) or not isinstance(min_run_time, numbers.Real):
        raise TypeError(f"{who}: min_run_time must be a number of seconds, got {type(min_run_time).__name__}")
    if not (math.isfinite(min_run_time) and min_run_time > 0):
        raise ValueError(f"{who}: min_run_time must be a positive number of seconds, got {min_run_time}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{who}: dtype must be a floating-point torch.dtype, got {dtype!r}")
    if op.device.type == "meta":
        raise ValueError(f"{who}: the operator is on the meta device (no parameter values); build it on a real device")
    dtype = dtype or op.dtype or torch.get_default_dtype()
    m, n = op.shape
    heads = op.heads
    dense_bytes = m * n * (heads or 1) * torch.empty((), dtype=dtype).element_size()
    if dense_bytes > DENSE_LIMIT_BYTES:
        raise ValueError(
            f"{who}: the dense matrix would take {dense_bytes / 2**30:.1f} GiB (limit {DENSE_LIMIT_BYTES / 2**30:g} "
            "GiB); a dense baseline of this size cannot be timed"
        )
    if op.dtype is not None and op.dtype != dtype:
        import copy

        op = copy.deepcopy(op).to(dtype)

    cost = op.cost(batch)
    before = torch.get_num_threads()
    threads = threads or before
    try:
        torch.set_num_threads(threads)
        ours, dense = _callables(op, batch, dtype, backward, inference, who)
        best = _interleaved({"ours": ours, "dense": dense}, threads, min_run_time, rounds)
    finally:
        torch.set_num_threads(before)
    return BenchResult(
        name=name,
        shape=(m, n),
        heads=heads,
        batch=batch,
        backward=backward,
        inference=inference,
        dtype=dtype,
        threads=threads,
        seconds=best["ours"],
        dense_seconds=best["dense"],
        flops=cost.flops,
        dense_flops=cost.dense_flops,
    )


def _callables(
    op: LinearOperator, batch: int, dtype: torch.dtype, backward: bool, inference: bool, who: str
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """The two timed calls, after checking that they compute the same thing."""
    m, n = op.shape
    heads = op.heads
    device = op.device
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, n, generator=gen, dtype=dtype).to(device)
    with torch.no_grad():
        W = op.dense(dtype=dtype if op.dtype is None else None)
    W = W.reshape(-1, n).detach().contiguous()  # (m, n), or (H*m, n) for a stack: every head reads the same input
    out_shape = (batch, heads, m) if heads is not None else (batch, m)

    def dense_fwd(inp: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(inp, w).view(out_shape)

    if not backward:
        mode = torch.inference_mode if inference else torch.no_grad
        with mode():
            _check(who, "output", op(x), dense_fwd(x, W), dtype)
        return _under(mode, lambda: op(x)), _under(mode, lambda: dense_fwd(x, W))

    xg = x.clone().requires_grad_(True)
    Wg = W.clone().requires_grad_(True)
    params = [p for p in op.parameters() if p.requires_grad]
    g = torch.randn(out_shape, generator=gen, dtype=dtype).to(device)
    dx_ours = torch.autograd.grad(op(xg), [xg], g)[0]
    dx_dense = torch.autograd.grad(dense_fwd(xg, Wg), [xg], g)[0]
    _check(who, "output", op(x).detach(), dense_fwd(x, W), dtype)
    _check(who, "input gradient", dx_ours, dx_dense, dtype)

    def ours() -> Any:
        return torch.autograd.grad(op(xg), [xg, *params], g)

    def dense() -> Any:
        return torch.autograd.grad(dense_fwd(xg, Wg), [xg, Wg], g)

    return ours, dense


def _under(mode: Callable[[], Any], fn: Callable[[], Any]) -> Callable[[], Any]:
    def call() -> Any:
        with mode():
            return fn()

    return call


def _check(who: str, what: str, ours: torch.Tensor, dense: torch.Tensor, dtype: torch.dtype) -> None:
    rtol = _RTOL.get(dtype, 1e-4)
    scale = float(dense.abs().max()) if dense.numel() else 0.0
    try:
        torch.testing.assert_close(ours, dense, rtol=rtol, atol=rtol * max(scale, 1e-30))
    except AssertionError as e:
        raise RuntimeError(
            f"{who}: the operator and its dense matrix disagree on the {what} (rtol {rtol:g}, atol {rtol:g} x the "
            f"largest |value| {scale:.3g}); nothing was timed:\n{e}"
        ) from None


def _interleaved(fns: dict[str, Callable[[], Any]], threads: int, min_run_time: float, rounds: int) -> dict[str, float]:
    """Best median seconds of each function over ``rounds`` interleaved rounds of ``blocked_autorange``."""
    from torch.utils.benchmark import Timer

    best = {k: math.inf for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
            best[k] = min(best[k], timer.blocked_autorange(min_run_time=min_run_time).median)
    return best


def measure_cost(op: LinearOperator, batch: int, cost: Cost, **kwargs: Any) -> Cost:
    """``cost`` with its ``timing`` measured by :func:`bench` (what ``op.cost(batch, measure=True)`` returns).

    Args:
        op: the operator.
        batch: number of input vectors.
        cost: ``op.cost(batch)``.
        **kwargs: passed to :func:`bench` (``backward``, ``threads``, ``min_run_time``, ...).

    Example:
        >>> import structmat as sm
        >>> from structmat.benchmark import measure_cost
        >>> op = sm.LowRank(128, 128, rank=8)
        >>> c = measure_cost(op, 16, op.cost(16), min_run_time=0.01, rounds=1)
        >>> c.flops == op.cost(16).flops, c.timing.dtype, c.timing.seconds > 0
        (True, 'float32', True)
    """
    return dataclasses.replace(cost, timing=bench(op, batch, **kwargs).timing)
