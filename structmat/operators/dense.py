"""``Dense``: an unstructured ``(m, n)`` matrix; its network is the single factor ``W[o, i]``."""

from __future__ import annotations

from typing import final

import torch

from .._base import LinearOperator
from .._init import check_float_dtype, spectral_std
from .._network import Factor, Network
from .._nodes import NetNode, Node

__all__ = ["Dense"]


@final
class Dense(LinearOperator):
    """A dense matrix ``W`` of shape ``(m, n)``: ``y = x @ W.T``, like ``nn.Linear`` without bias.

    Initialized with std ``(1/sqrt(n)) * min(1, sqrt(m/n))`` (spectral µP).

    Args:
        m: rows (output size).
        n: columns (input size).
        dtype: parameter dtype (torch's default when None).
        device: parameter device; ``"meta"`` allocates nothing, for shape-only queries.

    Example:
        >>> import torch, structmat as sm
        >>> W = torch.arange(6.0).reshape(2, 3)
        >>> sm.Dense.from_tensor(W)(torch.ones(3)).tolist()
        [3.0, 12.0]
        >>> sm.Dense(5, 3).num_params
        15
    """

    weight: torch.nn.Parameter

    def __init__(
        self, m: int, n: int, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> None:
        super().__init__((m, n))
        dtype = check_float_dtype(self.name, dtype)
        self.weight = torch.nn.Parameter(torch.empty(m, n, dtype=dtype, device=device))
        with torch.no_grad():
            self.weight.normal_(0.0, spectral_std(n, m))

    @classmethod
    def from_tensor(cls, weight: torch.Tensor, *, requires_grad: bool = True) -> Dense:
        """A ``Dense`` holding ``weight`` (shape ``(m, n)``) as its parameter, without copying."""
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"Dense.from_tensor: weight must be a 2-D tensor, got {got}")
        obj = cls.__new__(cls)
        LinearOperator.__init__(obj, (weight.shape[0], weight.shape[1]))
        check_float_dtype(obj.name, weight.dtype)
        obj.weight = torch.nn.Parameter(weight, requires_grad=requires_grad)
        return obj

    def _lower(self) -> Node:
        m, n = self.shape
        return NetNode(Network((Factor(self, "weight", (1, 0), (m, n)),), ((0, n),), ((1, m),)))
