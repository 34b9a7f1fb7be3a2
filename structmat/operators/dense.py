"""``Dense``: an unstructured ``(m, n)`` matrix; its network is the single factor ``W[o, i]``."""

from __future__ import annotations

from typing import Any, ClassVar, final

import torch

from ..core.base import LinearOperator
from ..core.family import check_heads, define_network
from ..core.nodes import NetNode, Node
from ..core.params import check_float_dtype

__all__ = ["Dense"]


@final
class Dense(LinearOperator):
    """A dense matrix ``W`` of shape ``(m, n)``: ``y = x @ W.T``, like ``nn.Linear`` without bias.

    Initialized with std ``(1/sqrt(n)) * min(1, sqrt(m/n))`` (spectral µP).

    Args:
        m: rows (output size).
        n: columns (input size).
        heads: a stack of this many independent matrices (shape ``(H, m, n)``), or None for one.
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
        self,
        m: int,
        n: int,
        *,
        heads: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__((m, n), check_heads("Dense", heads))
        self._network = define_network(
            self,
            [("weight", ("o", "i"))],
            dict(o=m, i=n),
            ("i",),
            ("o",),
            heads=heads,
            dtype=dtype,
            device=device,
            where=self.name,
        )

    @classmethod
    def from_tensor(cls, weight: torch.Tensor, *, requires_grad: bool = True) -> Dense:
        """A ``Dense`` holding ``weight`` as its parameter, without copying.

        ``weight`` of shape ``(m, n)`` gives one operator, ``(H, m, n)`` a stack of H.
        """
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"Dense.from_tensor: weight must be a torch.Tensor, got {type(weight).__name__}")
        if weight.ndim not in (2, 3):
            raise ValueError(
                f"Dense.from_tensor: weight must be a 2-D (m, n) or 3-D (H, m, n) tensor, got {tuple(weight.shape)}"
            )
        heads = weight.shape[0] if weight.ndim == 3 else None
        m, n = weight.shape[-2:]
        obj = cls.__new__(cls)
        LinearOperator.__init__(obj, (m, n), heads)
        check_float_dtype(obj.name, weight.dtype)
        obj._network = define_network(
            obj,
            [("weight", ("o", "i"))],
            dict(o=m, i=n),
            ("i",),
            ("o",),
            heads=heads,
            given={"weight": _as_parameter(weight, requires_grad)},
            where=obj.name,
        )
        obj._node  # noqa: B018 - lower now, as the constructor does
        return obj

    expr_name: ClassVar[str] = "dense"
    projection: ClassVar[str] = "closed form"

    def _expr_args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return self.shape, {"heads": self.heads}

    def _project(self, A: torch.Tensor) -> bool:
        """The nearest dense matrix is ``A`` itself."""
        self.weight.copy_(A)
        return True

    def _lower(self) -> Node:
        return NetNode(self._network)


def _as_parameter(t: torch.Tensor, requires_grad: bool) -> torch.nn.Parameter:
    """``t`` itself when it is a Parameter (so two operators built from it share one), else a Parameter over it."""
    if isinstance(t, torch.nn.Parameter):
        return t.requires_grad_(requires_grad)
    return torch.nn.Parameter(t, requires_grad=requires_grad)
