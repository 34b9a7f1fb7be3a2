"""``numerical_rank``: the rank of an operator's actual parameters, without forming the matrix when a cut is thin."""

from __future__ import annotations

import math
import numbers

import torch

from .core.base import LinearOperator

__all__ = ["numerical_rank"]

_HALF = (torch.float16, torch.bfloat16)  # LAPACK has no half-precision kernels: these are computed in float32


def numerical_rank(op: LinearOperator, rtol: float | None = None) -> int | list[int]:
    """Rank of ``op`` with its current parameter values.

    The structural bound ``r = op.rank().bound`` (the width of the network's minimal cut) says the range of ``op``
    has at most ``r`` dimensions. When ``r < min(m, n)`` the rank is read off a thin factorization ``A = Q (Q^T A)``:
    ``Q`` is an orthonormal basis of ``A Ω`` for a Gaussian ``Ω`` of ``r`` columns (which spans the range of ``A``
    with probability one, since ``rank A <= r``), and the singular values of the ``r x n`` matrix ``Q^T A = (A^T Q)^T``
    are those of ``A``. This applies ``A`` and ``A^T`` to ``r`` vectors each and never forms the ``m x n`` matrix.
    Otherwise the dense matrix is formed.

    Half-precision parameters (float16, bfloat16) are read in float32 (exactly) and the computation runs in float32:
    the result is the rank of the matrix those values define, at float32's tolerance (the parameters' own rounding
    is not noise to discount: they are the values).

    Args:
        op: the operator.
        rtol: singular values at most ``rtol * σ_max`` count as zero; default ``max(m, n) * eps(dtype)``
            (as ``torch.linalg.matrix_rank``), with ``dtype`` the dtype computed in.

    Returns:
        The number of singular values above the tolerance; for a stack of H heads, a list of H such numbers.

    Raises:
        TypeError: ``op`` is not an operator, or ``rtol`` is not a real number.
        ValueError: ``rtol`` is negative or not finite; the operator is on the meta device; a parameter holds NaN or
            inf; or applying the operator overflows.

    Example:
        >>> import torch, structmat as sm
        >>> A = sm.Dense(10**5, 3) @ sm.Dense(3, 10**5)  # 10^10 entries, never formed
        >>> sm.numerical_rank(A)
        3
        >>> sm.numerical_rank(0.0 * sm.Dense(4, 5, heads=2))  # one rank per head
        [0, 0]
    """
    if not isinstance(op, LinearOperator):
        raise TypeError(f"numerical_rank: expected a LinearOperator, got {type(op).__name__}")
    where = f"numerical_rank({op.name})"
    if rtol is not None:
        if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real):
            raise TypeError(f"{where}: rtol must be a real number or None, got {type(rtol).__name__}")
        if not (math.isfinite(rtol) and rtol >= 0):
            raise ValueError(f"{where}: rtol must be a finite number >= 0, got {rtol!r}")
    if op.device.type == "meta":
        raise ValueError(f"{where}: the operator is on the meta device and has no values")
    _check_finite_parameters(where, op)
    bound = op.rank().bound
    if bound == 0:
        return [0] * op.heads if op.heads is not None else 0
    own = op.dtype or torch.get_default_dtype()
    dtype = torch.float32 if own in _HALF else own
    with torch.no_grad():
        s = _singular_values(where, op, bound, dtype)
    if rtol is None:
        rtol = max(op.shape) * torch.finfo(dtype).eps
    counts = (s > rtol * s.amax(dim=-1, keepdim=True)).sum(dim=-1)
    return counts.tolist() if op.heads is not None else int(counts)


def _check_finite_parameters(where: str, op: LinearOperator) -> None:
    """NaN or inf in a parameter has no rank: LAPACK would fail or return garbage, so say which parameter it is."""
    for name, t in op.named_parameters():
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{where}: parameter {name!r} of shape {tuple(t.shape)} holds {bad} NaN or inf value(s)")


def _apply(op: LinearOperator, x: torch.Tensor) -> torch.Tensor:
    """``op`` on ``x`` of shape ``(B, n)`` or ``(B, H, n)``, in ``x``'s dtype (the factors are cast per apply).

    Goes to the execution node directly: the operator's own checks would reject a dtype other than its parameters'.
    """
    return op._node.apply(x)


def _singular_values(where: str, op: LinearOperator, bound: int, dtype: torch.dtype) -> torch.Tensor:
    """Singular values of ``op`` (``(k,)``, or ``(H, k)`` for a stack), computed in ``dtype``."""
    m, n = op.shape
    if bound >= min(m, n):
        y = _apply(op, torch.eye(n, dtype=dtype, device=op.device))  # (n, m) or (n, H, m): the transpose
        _check_finite_result(where, y)
        return torch.linalg.svdvals(y.movedim(0, -1) if y.ndim == 3 else y)
    gen = torch.Generator(device=op.device).manual_seed(0)
    omega = torch.randn(bound, n, dtype=dtype, device=op.device, generator=gen)
    y = _apply(op, omega)  # (A Ω)^T: (r, m) or (r, H, m)
    _check_finite_result(where, y)
    q, _ = torch.linalg.qr(y.movedim(0, -1))  # (m, r) or (H, m, r)
    if op.heads is None:
        z = _apply(op.T, q.mT)  # (A^T Q)^T = Q^T A: (r, n)
    else:  # head h's transpose on head h's basis: (r, H, m) -> (r, H, n)
        z = _apply(op.T, q.permute(2, 0, 1)).movedim(0, 1)
    _check_finite_result(where, z)
    return torch.linalg.svdvals(z)


def _check_finite_result(where: str, y: torch.Tensor) -> None:
    if not bool(torch.isfinite(y).all()):
        raise ValueError(
            f"{where}: applying the operator overflowed to inf or NaN in {y.dtype} (its parameters are finite); "
            "rescale the operator"
        )
