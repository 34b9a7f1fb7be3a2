"""``BlockTensorTrain`` (``BTT``): N cores, each contracting one input mode while indexed by the other modes.

With the input split ``n = i_1 ... i_N`` and the output ``m = o_1 ... o_N`` (row-major), core ``k`` (applied k-th)
reads the input mode ``i_{N+1-k}`` and the bond ``r_{k-1}``, writes the output mode ``o_k`` and the bond ``r_k``, and
is a separate block for every value of the modes not yet read (``i_1 .. i_{N-k}``) and already written
(``o_1 .. o_{k-1}``). For two cores with bond ``s`` this is the paper's BTT, ``R[a,c,s,b] L[c,d,a,s]`` with input
``(a, b)`` and output ``(c, d)``. (A Monarch matrix whose block size is a multiple of its number of blocks is such a
BTT with its two output modes swapped; see :mod:`structmat.operators.monarch`.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, final

import torch

from ..core.base import LinearOperator
from ..core.family import check_heads, define_network, train_expr_args, truncated_svd
from ..core.network import Network
from ..core.nodes import NetNode, Node
from ..core.splits import Spec, check_train, default_splits, spec_rank_bound, warn_default_rank

__all__ = ["BlockTensorTrain", "BTT", "btt_network", "btt_spec"]


def btt_spec(in_factors: tuple[int, ...], out_factors: tuple[int, ...], ranks: tuple[int, ...]) -> Spec:
    """The BTT network as ``(factors, sizes, inputs, outputs)`` (see the module doc): core ``k`` is
    ``core{k}[o_0..o_{k-1}, i_0..i_{N-k-2}, r_k, o_k, i_{N-1-k}, r_{k+1}]``."""
    cores = len(in_factors)
    bonds = (1, *ranks, 1)
    sizes: dict[str, int] = {}
    for k in range(cores):
        sizes[f"i{k}"] = in_factors[k]
        sizes[f"o{k}"] = out_factors[k]
    for k in range(cores + 1):
        sizes[f"r{k}"] = bonds[k]
    factors = []
    for k in range(cores):
        read = cores - 1 - k  # the input mode core k contracts
        blocks = [f"o{j}" for j in range(k)] + [f"i{j}" for j in range(read)]
        labels = blocks + [f"r{k}", f"o{k}", f"i{read}", f"r{k + 1}"]
        factors.append((f"core{k}", tuple(labels)))
    inputs = tuple(f"i{k}" for k in range(cores))
    outputs = tuple(f"o{k}" for k in range(cores))
    return factors, sizes, inputs, outputs


def btt_network(
    owner: torch.nn.Module,
    in_factors: tuple[int, ...],
    out_factors: tuple[int, ...],
    ranks: tuple[int, ...],
    *,
    heads: int | None,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    where: str,
) -> Network:
    """Register the cores ``core0 .. core{N-1}`` on ``owner`` and return the BTT network (see the module doc)."""
    factors, sizes, inputs, outputs = btt_spec(in_factors, out_factors, ranks)
    return define_network(
        owner,
        factors,
        sizes,
        inputs,
        outputs,
        heads=heads,
        dtype=dtype,
        device=device,
        exact_rank=len(in_factors) == 2,
        where=where,
    )


@final
class BlockTensorTrain(LinearOperator):
    """A block tensor-train matrix (Qiu et al. 2024): N >= 2 cores joined by bond ranks, rectangular.

    Args:
        m: rows; split row-major as ``out_factors``.
        n: columns; split row-major as ``in_factors``.
        ranks: the bond rank between consecutive cores (an int for all, or N-1 ints); positional or keyword.
        in_factors: the input split, a sequence of ints (default: balanced, two cores unless ``out_factors`` says
            more; a size with no split into factors > 1, such as a prime, must be split explicitly).
        out_factors: the output split (same number of factors as ``in_factors``; default balanced likewise).
        heads: a stack of this many independent operators, or None.
        dtype: parameter dtype.
        device: parameter device.

    The rank bound is the network's minimal cut; for two cores it is the rank for generic parameters (each of the
    ``a * c`` blocks ``W[(c, :), (a, :)] = L[c, :, a, :] R[a, c, :, :]`` is an independent generic matrix of rank
    ``min(d, s, b)``), i.e. ``min(m, n, a * c * s)``. When a default split makes the bound smaller than
    ``min(m, n)`` (e.g. ``BTT(62, 62, ranks=2)``: splits ``(2, 31)``, bound ``2 * 2 * 2 = 8``), a ``UserWarning``
    names the bond rank that reaches full rank.

    Raises:
        TypeError: a size, rank or factor that is not an int; a split that is not a sequence.
        ValueError: a value below 1, splits that do not multiply to the size or differ in length, fewer than two
            cores, the wrong number of ranks, or a default split that needs a factor of 1.

    Example:
        >>> import structmat as sm
        >>> A = sm.BTT(64, 64, 2)  # input (a, b) = (8, 8), output (c, d) = (8, 8), bond s = 2
        >>> A.num_params  # core0 R[a, c, b, s]: 8*8*8*2 = 1024, core1 L[c, s, d, a]: 8*2*8*8 = 1024
        2048
        >>> A.rank(), A.cost().flops  # min(64, 64, a*c*s = 128); one multiply-add per core entry at batch 1
        (Rank(bound=64, exact=True), 4096)
    """

    def __init__(
        self,
        m: int,
        n: int,
        ranks: int | Sequence[int],
        *,
        in_factors: Sequence[int] | None = None,
        out_factors: Sequence[int] | None = None,
        heads: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        where = f"BlockTensorTrain({m!r}, {n!r}, ranks={ranks!r})"
        m, n, self_in, self_out, bonds = check_train(where, m, n, ranks, in_factors, out_factors)
        heads = check_heads(where, heads)
        defaults = default_splits(self_in, self_out, in_factors, out_factors)
        warn_default_rank(where, (m, n), defaults, bonds, lambda r: spec_rank_bound(btt_spec(self_in, self_out, r)))
        super().__init__((m, n), heads)
        self.in_factors, self.out_factors, self.ranks = self_in, self_out, bonds
        self._network = btt_network(
            self, self_in, self_out, bonds, heads=heads, dtype=dtype, device=device, where=where
        )

    def _describe(self) -> tuple[str, str]:
        return "BTT", f"ranks={list(self.ranks)}"

    @property
    def cores(self) -> list[torch.nn.Parameter]:
        """The core tensors, in the order they are applied."""
        return [getattr(self, f"core{k}") for k in range(len(self.in_factors))]

    expr_name: ClassVar[str] = "btt"
    projection: ClassVar[str] = "closed form"

    def _expr_args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return train_expr_args(self)

    def _project(self, A: torch.Tensor) -> bool:
        """Two cores: ``W[(c,d),(a,b)] = sum_s L[c,d,a,s] R[a,c,b,s]``, so every ``(a, c)`` block ``A[(c,:),(a,:)]``
        of shape ``(d, b)`` is an independent matrix of rank <= s, fitted by its truncated SVD (optimal), the singular
        values split evenly between the cores. core0 ``(a, 1, c, b, s)`` holds ``R[a,c,b,s]``, core1 ``(c, s, d, a,
        1)`` holds ``L[c,d,a,s]``. More cores have no closed form (returns False)."""
        if len(self.in_factors) != 2:
            return False
        core0, core1 = self.core0, self.core1
        a, _, c, b, s = core0.shape[-5:]
        d = core1.shape[-3]
        lead = A.shape[:-2]
        blocks = A.reshape(*lead, c, d, a, b).movedim(-2, -4)  # (..., a, c, d, b)
        L, R = truncated_svd(blocks, s)  # (..., a, c, d, s), (..., a, c, s, b)
        core0.copy_(R.mT.unsqueeze(-4))  # (..., a, 1, c, b, s)
        core1.copy_(L.permute(*range(len(lead)), -3, -1, -2, -4).unsqueeze(-1))  # (..., c, s, d, a, 1)
        return True

    def _lower(self) -> Node:
        return NetNode(self._network)


BTT = BlockTensorTrain
