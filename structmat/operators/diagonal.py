"""``Diagonal``: the network ``d[i]`` whose one mode is both input and output."""

from __future__ import annotations

from typing import Any, ClassVar, final

import torch

from ..core.base import LinearOperator
from ..core.network import Factor, Network
from ..core.nodes import NetNode, Node
from ..core.params import check_float_dtype

__all__ = ["Diagonal"]


@final
class Diagonal(LinearOperator):
    """``diag(d)`` of shape ``(n, n)``: ``y = d * x``. Initialized to ones.

    Example:
        >>> import torch, structmat as sm
        >>> D = sm.Diagonal.from_tensor(torch.tensor([1.0, 0.0, 3.0]))
        >>> D(torch.ones(3)).tolist(), D.rank()
        ([1.0, 0.0, 3.0], Rank(bound=3, exact=True))
    """

    diag: torch.nn.Parameter

    def __init__(self, n: int, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__((n, n))
        dtype = check_float_dtype(self.name, dtype)
        self.diag = torch.nn.Parameter(torch.ones(n, dtype=dtype, device=device))

    @classmethod
    def from_tensor(cls, diag: torch.Tensor, *, requires_grad: bool = True) -> Diagonal:
        """A ``Diagonal`` holding the 1-D tensor ``diag`` as its parameter, without copying."""
        if not isinstance(diag, torch.Tensor):
            raise TypeError(f"Diagonal.from_tensor: diag must be a torch.Tensor, got {type(diag).__name__}")
        if diag.ndim != 1:
            raise ValueError(f"Diagonal.from_tensor: diag must be a 1-D tensor, got {tuple(diag.shape)}")
        obj = cls.__new__(cls)
        LinearOperator.__init__(obj, (diag.shape[0], diag.shape[0]))
        check_float_dtype(obj.name, diag.dtype)
        obj.diag = (
            diag.requires_grad_(requires_grad)
            if isinstance(diag, torch.nn.Parameter)
            else torch.nn.Parameter(diag, requires_grad=requires_grad)
        )
        obj._node  # noqa: B018 - lower now, as the constructor does
        return obj

    expr_name: ClassVar[str] = "diag"
    expr_aliases: ClassVar[dict[str, str]] = {"diagonal": ""}
    projection: ClassVar[str] = "closed form"

    def _expr_args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self.shape[0],), {"heads": self.heads}

    def _project(self, A: torch.Tensor) -> bool:
        """The nearest diagonal matrix keeps ``A``'s diagonal."""
        self.diag.copy_(A.diagonal(dim1=-2, dim2=-1))
        return True

    def _lower(self) -> Node:
        n = self.shape[1]
        return NetNode(Network((Factor(self, "diag", (0,), (n,)),), ((0, n),), ((0, n),)))
