"""``Identity``: the network with no factor, whose one mode is both input and output."""

from __future__ import annotations

from typing import Any, ClassVar, final

from ..core.base import LinearOperator
from ..core.network import Network
from ..core.nodes import NetNode, Node

__all__ = ["Identity"]


@final
class Identity(LinearOperator):
    """The ``(n, n)`` identity. It holds no parameter, so it takes the dtype of whatever it is combined with.

    Example:
        >>> import torch, structmat as sm
        >>> I = sm.Identity(3)
        >>> I(torch.tensor([1.0, 2.0, 3.0])).tolist(), I.rank().bound, I.cost(batch=5).flops
        ([1.0, 2.0, 3.0], 3, 0)
    """

    def __init__(self, n: int) -> None:
        super().__init__((n, n))

    expr_name: ClassVar[str] = "identity"
    projection: ClassVar[str] = "fixed"

    def _expr_args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self.shape[0],), {"heads": self.heads}

    def _lower(self) -> Node:
        n = self.shape[1]
        return NetNode(Network((), ((0, n),), ((0, n),)))
