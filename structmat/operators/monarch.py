"""``Monarch``: ``P L P^T R`` with block-diagonal ``L`` and ``R`` (Dao et al. 2022), a 2-core BTT with bond 1."""

from __future__ import annotations

from typing import final

import torch

from .._base import LinearOperator
from .._factors import check_int
from .._family import check_heads
from .._nodes import NetNode, Node
from .btt import btt_network

__all__ = ["Monarch"]


@final
class Monarch(LinearOperator):
    """A Monarch matrix of shape ``(m, n)`` with ``nblocks`` blocks in each factor.

    The input splits as ``(nblocks, n / nblocks)`` and the output as ``(nblocks, m / nblocks)``: the first factor
    ``R`` is block-diagonal with ``nblocks`` blocks of shape ``(nblocks, n / nblocks)``, the second ``L`` (after the
    transposing permutation) block-diagonal with ``nblocks`` blocks of shape ``(m / nblocks, nblocks)``.
    ``nblocks`` must divide both ``m`` and ``n``; parameters ``nblocks * (m + n)``.

    Args:
        m: rows.
        n: columns.
        nblocks: number of diagonal blocks of each factor.
        heads: a stack of this many independent operators, or None.
        dtype: parameter dtype.
        device: parameter device.

    Example:
        >>> import structmat as sm
        >>> A = sm.Monarch(12, 20, nblocks=4)
        >>> A.num_params, A.rank()
        (128, Rank(bound=12, exact=True))
    """

    def __init__(
        self,
        m: int,
        n: int,
        nblocks: int,
        *,
        heads: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        where = f"Monarch({m}, {n}, nblocks={nblocks})"
        m = check_int(where, "m", m)
        n = check_int(where, "n", n)
        nblocks = check_int(where, "nblocks", nblocks)
        if m % nblocks or n % nblocks:
            raise ValueError(f"{where}: nblocks must divide m={m} and n={n}")
        super().__init__((m, n), check_heads(where, heads))
        self.nblocks = nblocks
        self._network = btt_network(
            self,
            (nblocks, n // nblocks),
            (nblocks, m // nblocks),
            (1,),
            heads=heads,
            dtype=dtype,
            device=device,
            where=where,
        )

    def _describe(self) -> tuple[str, str]:
        return "Monarch", f"nblocks={self.nblocks}"

    def _lower(self) -> Node:
        return NetNode(self._network)
