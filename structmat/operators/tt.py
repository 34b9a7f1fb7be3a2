"""``TensorTrain`` (``TT``): the tensor-train matrix (MPO) format, a chain of cores ``G_k[r_{k-1}, o_k, i_k, r_k]``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, final

import torch

from ..core.base import LinearOperator
from ..core.family import check_heads, define_network, train_expr_args
from ..core.nodes import NetNode, Node
from ..core.splits import Spec, check_train, default_splits, spec_rank_bound, warn_default_rank

__all__ = ["TensorTrain", "TT", "tt_spec"]


def tt_spec(in_factors: tuple[int, ...], out_factors: tuple[int, ...], ranks: tuple[int, ...]) -> Spec:
    """The TT network as ``(factors, sizes, inputs, outputs)``: core ``k`` is ``core{k}[r_k, o_k, i_k, r_{k+1}]``."""
    parts = len(in_factors)
    full = (1, *ranks, 1)
    sizes = {f"r{k}": full[k] for k in range(parts + 1)}
    sizes.update({f"i{k}": in_factors[k] for k in range(parts)})
    sizes.update({f"o{k}": out_factors[k] for k in range(parts)})
    factors = [(f"core{k}", (f"r{k}", f"o{k}", f"i{k}", f"r{k + 1}")) for k in range(parts)]
    return factors, sizes, tuple(f"i{k}" for k in range(parts)), tuple(f"o{k}" for k in range(parts))


@final
class TensorTrain(LinearOperator):
    """A tensor-train matrix: ``A[(o_1..o_N), (i_1..i_N)] = G_1[o_1, i_1, :] G_2[:, o_2, i_2, :] ... G_N[:, o_N, i_N]``.

    The network is a chain (a tree), so its minimal cut is the rank for generic cores.

    Args:
        m: rows; split as ``out_factors``.
        n: columns; split as ``in_factors``.
        ranks: bond ranks (an int for all, or N-1 ints); positional or keyword.
        in_factors: the input split, a sequence of ints (default: balanced, two cores unless ``out_factors`` says
            more; a size with no split into factors > 1, such as a prime, must be split explicitly).
        out_factors: the output split, as many factors as ``in_factors`` (default balanced likewise).
        heads: a stack of this many independent operators, or None.
        dtype: parameter dtype.
        device: parameter device.

    A default split that leaves the rank bound below ``min(m, n)`` gives a ``UserWarning`` (as for ``BTT``).

    Raises:
        TypeError: a size, rank or factor that is not an int; a split that is not a sequence.
        ValueError: a value below 1, splits that do not multiply to the size or differ in length, fewer than two
            cores, the wrong number of ranks, or a default split that needs a factor of 1.

    Example:
        >>> import structmat as sm
        >>> A = sm.TT(27, 8, ranks=2, in_factors=(2, 2, 2), out_factors=(3, 3, 3))
        >>> A.num_params, A.rank()  # 6*2 + 2*6*2 + 2*6
        (48, Rank(bound=8, exact=True))
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
        where = f"TensorTrain({m!r}, {n!r}, ranks={ranks!r})"
        m, n, fin, fout, bonds = check_train(where, m, n, ranks, in_factors, out_factors)
        heads = check_heads(where, heads)
        defaults = default_splits(fin, fout, in_factors, out_factors)
        warn_default_rank(where, (m, n), defaults, bonds, lambda r: spec_rank_bound(tt_spec(fin, fout, r)))
        super().__init__((m, n), heads)
        self.in_factors, self.out_factors, self.ranks = fin, fout, bonds
        factors, sizes, inputs, outputs = tt_spec(fin, fout, bonds)
        self._network = define_network(
            self, factors, sizes, inputs, outputs, heads=heads, dtype=dtype, device=device, where=where
        )

    def _describe(self) -> tuple[str, str]:
        return "TT", f"ranks={list(self.ranks)}"

    @property
    def cores(self) -> list[torch.nn.Parameter]:
        """The cores ``G_1 .. G_N``, each ``(r_{k-1}, o_k, i_k, r_k)``."""
        return [getattr(self, f"core{k}") for k in range(len(self.in_factors))]

    expr_name: ClassVar[str] = "tt"
    projection: ClassVar[str] = "gradient"

    def _expr_args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return train_expr_args(self)

    def _lower(self) -> Node:
        return NetNode(self._network)


TT = TensorTrain
