"""``LowRank``: ``U V`` with an inner rank r; its network is the chain ``U[o,r] V[r,i]``."""

from __future__ import annotations

from typing import Any, ClassVar, final

import torch

from ..checks import check_int
from ..core.base import LinearOperator
from ..core.family import check_heads, define_network, truncated_svd
from ..core.nodes import NetNode, Node

__all__ = ["LowRank"]


@final
class LowRank(LinearOperator):
    """``A = U V`` with ``U`` of shape ``(m, r)`` and ``V`` of shape ``(r, n)``: rank ``r``, ``r (m + n)`` parameters.

    Args:
        m: rows.
        n: columns.
        rank: the inner dimension r, ``1 <= r <= min(m, n)``; positional or keyword.
        heads: a stack of this many independent operators (parameters ``(H, m, r)``, ``(H, r, n)``), or None.
        dtype: parameter dtype.
        device: parameter device (``"meta"`` for shape-only queries).

    Example:
        >>> import torch, structmat as sm
        >>> A = sm.LowRank(12, 7, rank=3)
        >>> A.rank(), A.num_params, A.cost(batch=2).flops  # 2 * 2 * 3 * (12 + 7)
        (Rank(bound=3, exact=True), 57, 228)
        >>> torch.allclose(A.dense(), A.U @ A.V)
        True
    """

    U: torch.nn.Parameter
    V: torch.nn.Parameter

    def __init__(
        self,
        m: int,
        n: int,
        rank: int,
        *,
        heads: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        where = f"LowRank({m!r}, {n!r}, rank={rank!r})"
        m = check_int(where, "m", m)
        n = check_int(where, "n", n)
        rank = check_int(where, "rank", rank)
        if rank > min(m, n):
            raise ValueError(f"{where}: rank must be <= min(m, n) = {min(m, n)}, got {rank}")
        heads = check_heads(where, heads)
        super().__init__((m, n), heads)
        self.rank_ = rank
        self._network = define_network(
            self,
            [("U", ("o", "r")), ("V", ("r", "i"))],
            dict(o=m, r=rank, i=n),
            ("i",),
            ("o",),
            heads=heads,
            dtype=dtype,
            device=device,
            where=where,
        )

    def _describe(self) -> tuple[str, str]:
        return "LowRank", f"rank={self.rank_}"

    expr_name: ClassVar[str] = "lowrank"
    projection: ClassVar[str] = "closed form"

    def _expr_args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return self.shape, {"rank": self.rank_, "heads": self.heads}

    def _project(self, A: torch.Tensor) -> bool:
        """Truncated SVD (Eckart–Young): optimal; the singular values are split evenly between ``U`` and ``V``."""
        L, R = truncated_svd(A, self.rank_)
        self.U.copy_(L)
        self.V.copy_(R)
        return True

    def _lower(self) -> Node:
        return NetNode(self._network)
