"""The machine a benchmark run measured on: GEMM rate and memory bandwidth (measured in the same run), versions, CPU.

The two rates are the roofline's denominators: a kernel doing ``flops`` floating-point operations and moving at least
``bytes`` bytes cannot take less than ``max(flops / gemm_rate, bytes / bandwidth)`` seconds on this machine at this
thread count (up to the GEMM being a fair stand-in for the peak).
"""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any

import torch
from torch.utils.benchmark import Timer

__all__ = ["measure_machine", "measure_rates", "cpu_model", "SIZES"]

#: Per suite size: the square fp32 GEMM's side and the number of fp32 elements the bandwidth copy moves.
SIZES = {"smoke": (512, 1 << 21), "full": (2048, 1 << 25)}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _median_s(fn: Any, min_run_time: float, threads: int) -> float:
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median


def _gemm_s(n: int, min_run_time: float, threads: int) -> float:
    gen = torch.Generator().manual_seed(0)
    a, b, c = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen), torch.empty(n, n)
    return _median_s(lambda: torch.mm(a, b, out=c), min_run_time, threads)


def _copy_s(elements: int, min_run_time: float, threads: int) -> float:
    src, dst = torch.randn(elements), torch.empty(elements)
    return _median_s(lambda: dst.copy_(src), min_run_time, threads)


def measure_rates(size: str = "full", threads: int | None = None) -> dict[str, float]:
    """``{"gemm_gflops": ..., "bandwidth_gbs": ...}`` measured now at ``threads`` (default: torch's current count).

    - ``gemm_gflops``: ``2 N^3 / t`` of ``torch.mm`` of two fp32 ``N x N`` matrices (``N = 2048``; 512 for smoke),
      writing into a preallocated output.
    - ``bandwidth_gbs``: ``2 * 4 * E / t`` of ``dst.copy_(src)`` on ``E`` fp32 elements (``2^25``, 128 MiB per
      buffer; ``2^21``, 8 MiB, for smoke, which may sit in cache): one read and one write of each element.
    """
    if size not in SIZES:
        raise ValueError(f"measure_rates: size must be one of {sorted(SIZES)}, got {size!r}")
    threads = threads or torch.get_num_threads()
    n, elements = SIZES[size]
    run_time = 0.05 if size == "smoke" else 0.5
    gemm_s = _gemm_s(n, run_time, threads)
    copy_s = _copy_s(elements, run_time, threads)
    return {"gemm_gflops": 2 * n**3 / gemm_s / 1e9, "bandwidth_gbs": 2 * 4 * elements / copy_s / 1e9}


def measure_machine(size: str = "full", threads: int | None = None) -> dict[str, Any]:
    """Measure the GEMM rate and bandwidth at ``threads`` (:func:`measure_rates`) and describe the machine.

    Returns:
        A JSON-ready dict: ``gemm_gflops`` and ``bandwidth_gbs`` at ``threads``, ``rates`` (the same keyed by the
        thread count as a string, for rows run at other counts to add to), ``threads``, ``gemm_n``,
        ``copy_elements``, ``torch``, ``python``, ``cpu``, ``cores`` (logical CPUs), ``platform`` and ``date``.
    """
    threads = threads or torch.get_num_threads()
    rates = measure_rates(size, threads)
    n, elements = SIZES[size]
    return {
        **rates,
        "rates": {str(threads): rates},
        "gemm_n": n,
        "copy_elements": elements,
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
