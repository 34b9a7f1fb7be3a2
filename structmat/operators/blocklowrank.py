"""``BlockLowRank``: a ``p x q`` grid of rank-r blocks; its network is ``U[P,Q,a,r] V[P,Q,r,b]``.

With ``s = m / p`` rows and ``t = n / q`` columns per block, the rows split row-major as ``(P, a)`` and the columns as
``(Q, b)``, block ``(P, Q)`` is ``W[(P, :), (Q, :)] = U[P, Q] V[P, Q]``: an ``(s, r) @ (r, t)`` product. Every block
is independent, so the nearest member to a matrix is each block's truncated SVD.

This file is the whole family: the network (:func:`~structmat.core.family.define_network`), the expression
(``expr_name``, ``_expr_args``) and the projection (``projection``, ``_project``). Defining the class registers it.
"""

from __future__ import annotations

from typing import Any, ClassVar, final

import torch

from ..checks import check_int
from ..core.base import LinearOperator
from ..core.family import check_heads, define_network, truncated_svd
from ..core.nodes import NetNode, Node

__all__ = ["BlockLowRank"]


@final
class BlockLowRank(LinearOperator):
    """An ``(m, n)`` matrix cut into a ``p x q`` grid of ``(m/p, n/q)`` blocks, each of rank ``r``.

    Block ``(P, Q)`` (rows ``P s .. P s + s - 1``, columns ``Q t .. Q t + t - 1`` with ``s = m/p``, ``t = n/q``) is
    ``U[P, Q] @ V[P, Q]`` with ``U`` of shape ``(p, q, s, r)`` and ``V`` of shape ``(p, q, r, t)``.

    Parameters: ``p q r (s + t)``. Rank: ``min(m, n, p q r)`` for generic parameters, exactly. It bounds the rank
    (the map goes through the ``p q r`` values ``V x``); it is reached by a member whose blocks are partial
    permutation matrices with ``c[P, Q] <= r`` ones, row sums ``<= s``, column sums ``<= t`` and ``min(m, n, p q r)``
    ones in all, every one in its own row and column (such integer ``c`` exist: the capacities pass every cut), and
    the rank of a generic member is at least that of any member. Cost: ``p q r (s + t)`` multiply-adds per input row
    when applied factor by factor. ``p = q = 1`` is :class:`~structmat.LowRank`; ``r = min(s, t)`` is a dense matrix.

    Args:
        m: rows; ``p`` must divide it.
        n: columns; ``q`` must divide it.
        p: block rows of the grid.
        q: block columns of the grid.
        rank: the rank r of every block, ``1 <= r <= min(m/p, n/q)``.
        heads: a stack of this many independent operators (parameters ``(H, p, q, s, r)``, ``(H, p, q, r, t)``), or
            None.
        dtype: parameter dtype.
        device: parameter device (``"meta"`` for shape-only queries).

    Raises:
        TypeError: a size, ``p``, ``q`` or ``rank`` that is not an int.
        ValueError: a value below 1, ``p`` not dividing ``m``, ``q`` not dividing ``n``, or a rank above the block size.

    Example:
        >>> import torch, structmat as sm
        >>> A = sm.BlockLowRank(12, 15, p=3, q=5, rank=2)  # 3 x 5 blocks of shape (4, 3)
        >>> A.num_params, A.rank().bound  # 3*5*2*(4 + 3); min(12, 15, 3*5*2)
        (210, 12)
        >>> W = A.dense()
        >>> block = W[4:8, 6:9]  # block (1, 2)
        >>> torch.allclose(block, A.U[1, 2] @ A.V[1, 2]), int(torch.linalg.matrix_rank(block))
        (True, 2)
        >>> A.expr()
        'block_lowrank(12, 15, p=3, q=5, rank=2)'
    """

    U: torch.nn.Parameter
    V: torch.nn.Parameter

    expr_name: ClassVar[str] = "block_lowrank"
    projection: ClassVar[str] = "closed form"

    def __init__(
        self,
        m: int,
        n: int,
        *,
        p: int,
        q: int,
        rank: int,
        heads: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        where = f"BlockLowRank({m!r}, {n!r}, p={p!r}, q={q!r}, rank={rank!r})"
        m = check_int(where, "m", m)
        n = check_int(where, "n", n)
        p = check_int(where, "p", p)
        q = check_int(where, "q", q)
        rank = check_int(where, "rank", rank)
        if m % p:
            raise ValueError(f"{where}: p={p} must divide m={m}")
        if n % q:
            raise ValueError(f"{where}: q={q} must divide n={n}")
        s, t = m // p, n // q
        if rank > min(s, t):
            raise ValueError(f"{where}: rank must be <= min(m/p, n/q) = min({s}, {t}) = {min(s, t)}, got {rank}")
        heads = check_heads(where, heads)
        super().__init__((m, n), heads)
        self.p, self.q, self.rank_ = p, q, rank
        self._network = define_network(
            self,
            [("U", ("P", "Q", "a", "r")), ("V", ("P", "Q", "r", "b"))],
            dict(P=p, Q=q, a=s, b=t, r=rank),
            ("Q", "b"),
            ("P", "a"),
            heads=heads,
            dtype=dtype,
            device=device,
            exact_rank=True,
            where=where,
        )

    def _describe(self) -> tuple[str, str]:
        return "BlockLowRank", f"p={self.p}, q={self.q}, rank={self.rank_}"

    def _lower(self) -> Node:
        return NetNode(self._network)

    def _expr_args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return self.shape, {"p": self.p, "q": self.q, "rank": self.rank_, "heads": self.heads}

    def _project(self, A: torch.Tensor) -> bool:
        """Each block of ``A`` by its rank-r truncated SVD (optimal: the blocks are independent), the singular values
        split evenly between ``U`` and ``V``."""
        m, n = self.shape
        lead = A.shape[:-2]
        blocks = A.reshape(*lead, self.p, m // self.p, self.q, n // self.q).movedim(-2, -3)  # (..., p, q, s, t)
        L, R = truncated_svd(blocks, self.rank_)
        self.U.copy_(L)
        self.V.copy_(R)
        return True
