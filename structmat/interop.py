"""Interoperability: a structmat operator as a ``scipy.sparse.linalg.LinearOperator``.

:func:`to_scipy` (also :meth:`structmat.LinearOperator.to_scipy`) wraps an operator so that the iterative solvers and
decompositions of ``scipy.sparse.linalg`` (``svds``, ``eigsh``, ``cg``, ``gmres``, ``lsqr`` ...) use it through its
fast application, never forming the dense matrix.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse.linalg
import torch

from .core.base import LinearOperator

__all__ = ["ScipyOperator", "to_scipy"]


class ScipyOperator(scipy.sparse.linalg.LinearOperator):
    """A structmat operator seen by scipy: float64 numpy arrays in and out.

    Build it with :func:`to_scipy`. ``matvec``/``matmat`` apply the operator, ``rmatvec``/``rmatmat`` its transpose
    (``op.T``, which for a real operator is the adjoint scipy asks for). Every call computes in the operator's dtype
    (float64 for an operator without parameters, such as ``Identity``) on the operator's device, without building an
    autograd graph, and returns a new float64 numpy array on the CPU: a float32 operator gives float32-accurate
    results in float64 arrays. The operator is held, not copied: later changes of its parameters are seen.

    Attributes:
        op: the wrapped structmat operator.
    """

    def __init__(self, op: LinearOperator) -> None:
        _check_operator(op)
        super().__init__(dtype=np.float64, shape=op.shape)
        self.op = op
        self._transposed = op.T

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        shape = (self.shape[0], 1) if np.ndim(x) == 2 else (self.shape[0],)
        return self._apply(self.op, "matvec", np.reshape(x, (-1, 1))).reshape(shape)

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        shape = (self.shape[1], 1) if np.ndim(x) == 2 else (self.shape[1],)
        return self._apply(self._transposed, "rmatvec", np.reshape(x, (-1, 1))).reshape(shape)

    def _matmat(self, x: np.ndarray) -> np.ndarray:
        return self._apply(self.op, "matmat", x)

    def _rmatmat(self, x: np.ndarray) -> np.ndarray:
        return self._apply(self._transposed, "rmatmat", x)

    def _apply(self, op: LinearOperator, what: str, x: Any) -> np.ndarray:
        """``op @ x`` for an ``(n, k)`` array: a new ``(m, k)`` float64 array."""
        arr = np.asarray(x)
        if np.iscomplexobj(arr):
            raise TypeError(
                f"{self.op.name}.to_scipy().{what}: input is complex ({arr.dtype}); the operator is real, apply it "
                "to the real and imaginary parts separately"
            )
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise TypeError(f"{self.op.name}.to_scipy().{what}: input must be a real numeric array, got {arr.dtype}")
        arr = np.ascontiguousarray(arr, dtype=np.float64)
        if not arr.flags.writeable:  # torch warns on a read-only array
            arr = arr.copy()
        dtype = self.op.dtype or torch.float64
        t = torch.from_numpy(arr).to(device=self.op.device, dtype=dtype)
        with torch.no_grad():
            y = op(t.T).T  # the operator acts on the last dim: (k, n) -> (k, m)
        out = y.to(device="cpu", dtype=torch.float64).numpy()
        if np.shares_memory(out, arr):  # Identity returns its input: scipy must get a new array
            out = out.copy()
        return out


def _check_operator(op: Any) -> None:
    if not isinstance(op, LinearOperator):
        raise TypeError(f"to_scipy: expected a structmat LinearOperator, got {type(op).__name__}")
    if op.heads is not None:
        raise ValueError(
            f"{op.name}.to_scipy(): the operator is a stack of {op.heads} heads; scipy needs one matrix. Build "
            "the operator without heads (heads=None) to use it with scipy"
        )
    if op.device.type == "meta":
        raise ValueError(
            f"{op.name}.to_scipy(): the operator is on the meta device (shapes only, no values); move it to a real "
            "device with values first (e.g. op.to_empty(device='cpu') and initialize, or build it on 'cpu')"
        )
    dtype = op.dtype
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"{op.name}.to_scipy(): the operator's dtype is {dtype}; only real floating-point operators")


def to_scipy(op: LinearOperator) -> ScipyOperator:
    """``op`` as a ``scipy.sparse.linalg.LinearOperator`` (a :class:`ScipyOperator`).

    The result has ``shape == op.shape`` and ``dtype == numpy.float64``; ``matvec``/``matmat`` apply ``op``,
    ``rmatvec``/``rmatmat`` apply ``op.T``, all through the operator's structured application (no dense matrix),
    with float64 numpy arrays in and out. The computation runs in the operator's dtype on its device (a CUDA
    operator gets the vectors moved there and back) under ``torch.no_grad()``.

    Args:
        op: a single (``heads=None``), real, floating-point operator with values (not on the ``meta`` device).

    Returns:
        The scipy operator; it holds ``op`` (its ``.op``), so later parameter changes are seen.

    Raises:
        TypeError: ``op`` is not a structmat operator or not real floating point; at call time, a complex input.
        ValueError: ``op`` is a stack of heads, or on the meta device.

    Example:
        >>> import numpy as np, scipy.sparse.linalg as sla, torch, structmat as sm
        >>> _ = torch.manual_seed(0)
        >>> B = sm.Dense(50, 4, dtype=torch.float64) @ sm.Dense(4, 50, dtype=torch.float64)
        >>> A = B.to_scipy()  # or structmat.interop.to_scipy(B)
        >>> A.shape, A.dtype
        ((50, 50), dtype('float64'))
        >>> s = sla.svds(A, k=3, return_singular_vectors=False, random_state=0)
        >>> np.allclose(np.sort(s)[::-1], torch.linalg.svdvals(B.dense().detach())[:3].numpy())
        True
    """
    return ScipyOperator(op)
