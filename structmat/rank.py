"""``numerical_rank``: the rank of an operator's actual parameters, without forming the matrix when a cut is thin."""

from __future__ import annotations

import torch

from ._base import LinearOperator

__all__ = ["numerical_rank"]


def numerical_rank(op: LinearOperator, rtol: float | None = None) -> int | list[int]:
    """Rank of ``op`` with its current parameter values.

    The structural bound ``r = op.rank().bound`` (the width of the network's minimal cut) says the range of ``op``
    has at most ``r`` dimensions. When ``r < min(m, n)`` the rank is read off a thin factorization ``A = Q (Q^T A)``:
    ``Q`` is an orthonormal basis of ``A Ω`` for a Gaussian ``Ω`` of ``r`` columns (which spans the range of ``A``
    with probability one, since ``rank A <= r``), and the singular values of the ``r x n`` matrix ``Q^T A = (A^T Q)^T``
    are those of ``A``. This applies ``A`` and ``A^T`` to ``r`` vectors each and never forms the ``m x n`` matrix.
    Otherwise the dense matrix is formed.

    Args:
        op: the operator.
        rtol: singular values at most ``rtol * σ_max`` count as zero; default ``max(m, n) * eps(dtype)``
            (as ``torch.linalg.matrix_rank``).

    Returns:
        The number of singular values above the tolerance; for a stack of H heads, a list of H such numbers.

    Example:
        >>> import torch, structmat as sm
        >>> A = sm.Dense(10**5, 3) @ sm.Dense(3, 10**5)  # 10^10 entries, never formed
        >>> sm.numerical_rank(A)
        3
    """
    if not isinstance(op, LinearOperator):
        raise TypeError(f"numerical_rank: expected a LinearOperator, got {type(op).__name__}")
    if rtol is not None and not (isinstance(rtol, (int, float)) and rtol >= 0):
        raise ValueError(f"numerical_rank({op.name}): rtol must be a non-negative number, got {rtol!r}")
    if op.device.type == "meta":
        raise ValueError(f"numerical_rank({op.name}): the operator is on the meta device and has no values")
    m, n = op.shape
    bound = op.rank().bound
    if bound == 0:
        return 0
    dtype = op.dtype or torch.get_default_dtype()
    with torch.no_grad():
        if bound >= min(m, n):
            s = torch.linalg.svdvals(op.dense())  # (min(m, n),) or (H, min(m, n))
        else:
            gen = torch.Generator(device=op.device).manual_seed(0)
            omega = torch.randn(n, bound, dtype=dtype, device=op.device, generator=gen)
            q, _ = torch.linalg.qr(op @ omega)  # (m, r) or (H, m, r)
            if op.heads is None:
                s = torch.linalg.svdvals(op.T @ q)
            else:  # head h's transpose on head h's basis: (r, H, m) -> (r, H, n)
                s = torch.linalg.svdvals(op.T(q.permute(2, 0, 1), per_head=True).permute(1, 0, 2))
    if rtol is None:
        rtol = max(m, n) * torch.finfo(s.dtype).eps
    counts = (s > rtol * s.amax(dim=-1, keepdim=True)).sum(dim=-1)
    return counts.tolist() if op.heads is not None else int(counts)
