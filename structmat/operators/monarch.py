"""``Monarch``: Dao et al.'s (2022) Monarch matrix, ``P_out L P_mid R`` with block-diagonal ``R`` and ``L``.

Definition (the ``MonarchLinear(in_features, out_features, nblocks)`` layer and ``blockdiag_butterfly_multiply`` of
the authors' code): with ``k = nblocks``, ``p = n / k``, ``s = m / k`` and ``q = min(p, s)``,

1. ``x`` is viewed as ``(k, p)`` and ``R`` applies ``k`` blocks ``blkdiag1[a]`` of shape ``(q, p)``:
   ``h[a, j] = sum_b blkdiag1[a, j, b] x[a, b]``, an intermediate of ``N = k q = min(m, n)`` entries;
2. the intermediate is read as ``(q, k)`` (row-major, ``h[f]`` with ``f = r k + l``) and transposed, so block ``l`` of
   ``L`` sees the entries ``f = l, l + k, l + 2k, ...``;
3. ``L`` applies ``k`` blocks ``blkdiag2[l]`` of shape ``(s, q)``: ``z[l, t] = sum_r blkdiag2[l, t, r] h[r k + l]``;
4. the output is ``z`` transposed and flattened: ``y[t k + l] = z[l, t]``.

As one einsum: ``y[t, l] = sum_{a, j, b} [ (a q + j) mod k = l ] blkdiag2[l, t, (a q + j) div k] blkdiag1[a, j, b]
x[a, b]``. When ``k`` divides ``q`` (``j = (j1, l)``) or ``q`` divides ``k`` (``a = (a1, a2)``, ``l = (a2, j)``), the
bracket is a relabelling and the operator is a single tensor network (a 2-core BTT with bond ``q / k`` and permuted
output modes, respectively a block-diagonal of ``k / q`` such BTTs with bond 1); otherwise the two block-diagonal
networks are applied one after the other. Either way ``R`` is generically onto ``N`` and ``L`` one-to-one from it,
so the rank is exactly ``min(m, n)``.
"""

from __future__ import annotations

from typing import Any, ClassVar, final

import torch

from ..checks import check_int
from ..core.base import LinearOperator
from ..core.family import check_heads, define_network, truncated_svd
from ..core.nodes import NetNode, Node, compose

__all__ = ["Monarch"]


@final
class Monarch(LinearOperator):
    """A Monarch matrix of shape ``(m, n)``: block-diagonal ``R``, a reshape-transpose, block-diagonal ``L``.

    With ``k = nblocks``, ``p = n / k``, ``s = m / k`` and ``q = min(p, s)``: ``R`` has ``k`` blocks of shape
    ``(q, p)`` (parameter ``blkdiag1``, ``(k, q, p)``), ``L`` has ``k`` blocks of shape ``(s, q)`` (``blkdiag2``,
    ``(k, s, q)``), and the intermediate of ``k q = min(m, n)`` entries is viewed as ``(k, q)`` after ``R`` and as
    ``(q, k)``-transposed before ``L``; the output is ``L``'s ``(k, s)`` result transposed to ``(s, k)``. This is
    the authors' ``MonarchLinear(n, m, nblocks)`` exactly (same parameter layout, see the module documentation):
    for ``m >= n`` the blocks are ``(n/k, n/k)`` and ``(m/k, n/k)``, for ``m < n`` they are ``(m/k, n/k)`` and
    ``(m/k, m/k)``.

    Parameters: ``q (m + n) = min(m, n) (m + n) / nblocks`` (``n^2/k + m n/k`` when ``m >= n``). Rank: ``min(m, n)``
    for generic parameters, exactly. ``nblocks`` must divide ``m`` and ``n``.

    Args:
        m: rows.
        n: columns.
        nblocks: number of diagonal blocks of each factor.
        heads: a stack of this many independent operators, or None.
        dtype: parameter dtype.
        device: parameter device.

    Example:
        >>> import torch, structmat as sm
        >>> A = sm.Monarch(1024, 1024, nblocks=4)
        >>> tuple(A.blkdiag1.shape), tuple(A.blkdiag2.shape)  # R's blocks, L's blocks
        ((4, 256, 256), (4, 256, 256))
        >>> A.num_params, A.rank()  # 1024**2 / 4 + 1024**2 / 4
        (524288, Rank(bound=1024, exact=True))
        >>> B = sm.Monarch(12, 20, nblocks=4)  # q = min(5, 3) = 3: blocks (3, 5), then (3, 3)
        >>> B.num_params, B.rank()  # 3 * (12 + 20)
        (96, Rank(bound=12, exact=True))
    """

    blkdiag1: torch.nn.Parameter
    blkdiag2: torch.nn.Parameter

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
        where = f"Monarch({m!r}, {n!r}, nblocks={nblocks!r})"
        m = check_int(where, "m", m)
        n = check_int(where, "n", n)
        nblocks = check_int(where, "nblocks", nblocks)
        if m % nblocks or n % nblocks:
            raise ValueError(f"{where}: nblocks must divide m={m} and n={n}")
        heads = check_heads(where, heads)
        super().__init__((m, n), heads)
        self.nblocks = nblocks
        k, p, s = nblocks, n // nblocks, m // nblocks
        q = min(p, s)
        options = dict(heads=heads, dtype=dtype, device=device, where=where)
        # R: x[a, b] -> h[a, j], block a of shape (q, p)
        self._right = define_network(
            self, [("blkdiag1", ("a", "j", "b"))], dict(a=k, j=q, b=p), ("a", "b"), ("a", "j"), **options
        )
        # L: h read as (r, l) -> y[t, l], block l of shape (s, q); the output (t, l) is the final transpose
        self._left = define_network(
            self, [("blkdiag2", ("l", "t", "r"))], dict(l=k, t=s, r=q), ("r", "l"), ("t", "l"), **options
        )

    def _describe(self) -> tuple[str, str]:
        return "Monarch", f"nblocks={self.nblocks}"

    expr_name: ClassVar[str] = "monarch"
    projection: ClassVar[str] = "closed form"

    def _expr_args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return self.shape, {"nblocks": self.nblocks, "heads": self.heads}

    def _project(self, A: torch.Tensor) -> bool:
        """Block ``(l, a)`` of ``A``, rows ``t k + l`` and columns ``a p + b``, is ``sum_j blkdiag2[l, :, r]
        blkdiag1[a, j, :]`` over the ``j`` of ``a`` that land in ``L``'s block ``l`` (at ``r``): each pair ``(a, j)``
        feeds exactly one block, so every block is an independent matrix of rank <= its number of pairs, fitted by its
        truncated SVD (optimal), its i-th singular pair going to its i-th such ``j``."""
        k, q, p = self.blkdiag1.shape[-3:]
        s = self.blkdiag2.shape[-2]
        lead = A.shape[:-2]
        blocks = A.reshape(*lead, s, k, k, p).movedim(-3, -4)  # (..., l, t, a, b) -> [..., l, a] is the (s, p) block
        blocks = blocks.movedim(-2, -3)  # (..., l, a, t, b)
        pairs: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (l, a) -> [(j, r), ...] in increasing j
        for a in range(k):
            for j in range(q):
                r, lb = divmod(a * q + j, k)
                pairs.setdefault((lb, a), []).append((j, r))
        groups: dict[int, list[tuple[int, int]]] = {}  # blocks by their number of pairs (their rank bound)
        for la, js in pairs.items():
            groups.setdefault(len(js), []).append(la)
        right = self.blkdiag1  # (..., a, j, b)
        left = self.blkdiag2.transpose(-1, -2)  # (..., l, r, t): a view, written in place
        for count, members in groups.items():
            ls = torch.tensor([lb for lb, _ in members])
            as_ = torch.tensor([a for _, a in members])
            L, R = truncated_svd(blocks[..., ls, as_, :, :], count)  # (..., G, s, count), (..., G, count, p)
            js = torch.tensor([j for la in members for j, _ in pairs[la]])
            rs = torch.tensor([r for la in members for _, r in pairs[la]])
            right[..., as_.repeat_interleave(count), js, :] = R.reshape(*lead, -1, p)
            left[..., ls.repeat_interleave(count), rs, :] = L.mT.reshape(*lead, -1, s)
        return True

    def _lower(self) -> Node:
        # one network when k | q or q | k, else two einsums; either way R is onto the min(m, n) intermediate and L
        # one-to-one from it, so the products' rank rules (fuse, ChainNode.rank) make min(m, n) exact
        return compose([NetNode(self._left), NetNode(self._right)])
