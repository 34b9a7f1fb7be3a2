"""Result objects of the queries: :class:`Cost` (with an optional measured :class:`Timing`) and :class:`Rank`."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Cost", "Rank", "Contraction", "Timing"]


@dataclass(frozen=True)
class Contraction:
    """One network's einsum (batch label ``z``) and opt_einsum's path for it, with its own counts."""

    equation: str
    shapes: tuple[tuple[int, ...], ...]
    path: tuple[tuple[int, ...], ...]
    flops: int
    macs: int
    largest_intermediate: int


@dataclass(frozen=True)
class Timing:
    """Measured time of applying an operator against the same map as a dense matrix, side by side on this machine.

    Made by :func:`structmat.bench` (``BenchResult.timing``); a :class:`Cost` carries one when it was measured.

    Attributes:
        seconds: median seconds per call of the operator (forward, or forward + backward when ``backward``).
        dense_seconds: the same for the dense matrix (``torch.nn.functional.linear(x, W)``), timed interleaved.
        threads: torch's intra-op thread count during the timing.
        dtype: the dtype timed, e.g. ``"float32"``.
        backward: True when forward + backward was timed.
        inference: True when the forward ran under ``torch.inference_mode()`` (where weight-only parts of a network
            may be contracted once and kept), else under ``torch.no_grad()`` (or with autograd, for ``backward``).

    Example:
        >>> from structmat import Timing
        >>> t = Timing(seconds=0.001, dense_seconds=0.0018, threads=1, dtype="float32")
        >>> t.ratio, t.verdict
        (0.5555555555555556, '1.8x faster than dense')
        >>> Timing(seconds=0.002, dense_seconds=0.001, threads=1, dtype="float32").verdict
        '2x slower than dense: use dense here'
    """

    seconds: float
    dense_seconds: float
    threads: int
    dtype: str
    backward: bool = False
    inference: bool = False

    @property
    def ratio(self) -> float:
        """``seconds / dense_seconds``: below 1 the operator is faster than dense."""
        return self.seconds / self.dense_seconds

    @property
    def speedup(self) -> float:
        """``dense_seconds / seconds``: above 1 the operator is faster than dense."""
        return self.dense_seconds / self.seconds

    @property
    def verdict(self) -> str:
        """One line for a reader: ``"1.8x faster than dense"``, ``"as fast as dense (within 5%)"`` or
        ``"1.3x slower than dense: use dense here"``."""
        if 1 / 1.05 <= self.speedup <= 1.05:
            return "as fast as dense (within 5%)"
        if self.speedup > 1:
            return f"{self.speedup:.2g}x faster than dense"
        return f"{1 / self.speedup:.2g}x slower than dense: use dense here"

    def __str__(self) -> str:
        mode = "forward+backward" if self.backward else "forward, inference mode" if self.inference else "forward"
        threads = f"{self.threads} thread" + ("s" if self.threads != 1 else "")
        return (
            f"{self.seconds * 1e3:.4g} ms vs dense {self.dense_seconds * 1e3:.4g} ms ({mode}, {self.dtype}, "
            f"{threads}): {self.verdict}"
        )


@dataclass(frozen=True)
class Cost:
    """Forward cost of applying an operator to ``batch`` vectors, from shapes alone.

    Attributes:
        shape: the operator's ``(m, n)``.
        batch: number of input vectors.
        flops: floating-point operations in opt_einsum's convention (a multiply-add counts 2), summed over every
            einsum of the operator plus the additions that join sums and the multiplies that apply scalars (a
            scalar multiplies the smaller of the network's smallest factor and its output at this batch).
        macs: multiply(-add)s, the convention of fvcore and of the attention paper: one per multiplication, the
            multiplies that apply scalars included (the additions that join sums are not counted).
        dense_flops: ``2 * m * n * batch`` (times H for a stack), the cost of the same map as dense matrices.
        largest_intermediate: the most elements any intermediate tensor holds (inputs excluded).
        contractions: every einsum, in execution order, with its opt_einsum path.
        heads: H for a stack of H operators, else None.
        timing: the measured time against a dense matrix on this machine (``op.cost(batch, measure=True)``), else
            None.
    """

    shape: tuple[int, int]
    batch: int
    flops: int
    macs: int
    largest_intermediate: int
    contractions: tuple[Contraction, ...] = field(default=())
    heads: int | None = None
    timing: Timing | None = None

    @property
    def dense_flops(self) -> int:
        """``2 * m * n * batch`` (times H for a stack of H operators)."""
        return 2 * self.shape[0] * self.shape[1] * self.batch * (self.heads or 1)

    @property
    def speedup(self) -> float:
        """``dense_flops / flops`` (infinite for a free operator such as a permutation)."""
        return self.dense_flops / self.flops if self.flops else float("inf")

    @property
    def path(self) -> tuple[tuple[str, tuple[tuple[int, ...], ...]], ...]:
        """``(equation, opt_einsum path)`` of each einsum, in execution order."""
        return tuple((c.equation, c.path) for c in self.contractions)

    def __str__(self) -> str:
        m, n = self.shape
        lines = [
            f"  Operator shape: ({m}, {n}), batch: {self.batch}" + (f", heads: {self.heads}" if self.heads else ""),
            f"  FLOPs (multiply-add = 2): {self.flops:,}",
            f"  MACs: {self.macs:,}",
            f"  Dense FLOPs: {self.dense_flops:,}",
            f"  Speedup over dense: {self.speedup:.4g}",
            f"  Largest intermediate: {self.largest_intermediate:,} elements",
        ]
        for k, c in enumerate(self.contractions):
            lines.append(f"  einsum {k}: {c.equation}  path {list(c.path)}  flops {c.flops:,}")
        if self.timing is not None:
            lines.append(f"  Measured: {self.timing}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Rank:
    """A rank bound from the network's structure.

    Attributes:
        bound: an upper bound on the rank, for every value of the parameters.
        exact: True when the bound is the rank for generic (e.g. random) parameter values: tree networks, networks
            whose family proves it, and what follows from those by transposing, scaling, Kronecker products
            (ranks multiply), block-diagonals (ranks add) and products with generically invertible or full-rank
            neighbours (permutations, identities, diagonals, injective / surjective factors).
    """

    bound: int
    exact: bool

    def __int__(self) -> int:
        return self.bound
