"""Combinators: operators built from operators. Each lowers its operands' networks; none has special cases.

``Sum`` concatenates networks, ``Product`` fuses networks whose mode splits refine (and chains otherwise),
``Transpose`` swaps input and output modes (sharing parameters), ``Kronecker`` puts networks side by side,
``BlockDiagonal`` gives each block its own slice of the input and output, ``Scaled`` multiplies by a constant.
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import Any, ClassVar, final

import torch

from .checks import check_int
from .core import nodes as _nodes
from .core.base import LinearOperator, check_compatible
from .core.family import check_heads
from .core.nodes import Node

__all__ = ["Sum", "Product", "Transpose", "Kronecker", "BlockDiagonal", "Scaled", "kron", "block_diag"]


def describe_operand(obj: object) -> str:
    """A non-operator as messages name it: its type, and a tensor's or array's shape (never its values).

    >>> import torch
    >>> describe_operand(torch.zeros(3, 5)), describe_operand(2.0)
    ('Tensor of shape (3, 5)', 'float')
    """
    shape = getattr(obj, "shape", None)
    if isinstance(shape, tuple) or isinstance(obj, torch.Tensor):
        return f"{type(obj).__name__} of shape {tuple(shape)}"  # type: ignore[arg-type]
    return type(obj).__name__


def check_operands(kind: str, ops: tuple[object, ...]) -> None:
    """Every operand must be a :class:`LinearOperator`; a tensor is named by its type and shape."""
    for k, op in enumerate(ops):
        if not isinstance(op, LinearOperator):
            hint = "; wrap a matrix as sm.Dense.from_tensor(t)" if isinstance(op, torch.Tensor) else ""
            raise TypeError(
                f"{kind}: expected LinearOperator operands, got {describe_operand(op)} as operand {k}{hint}"
            )


def tensor_operand_error(before: str, tensor: torch.Tensor, after: str) -> TypeError:
    """The error for ``op + tensor`` and the like: the expression with the tensor named by type and shape."""
    return TypeError(
        f"{before}{describe_operand(tensor)}{after}: an operator adds only to an operator; wrap a matrix as "
        "sm.Dense.from_tensor(t), or apply the operator to the tensor with op(x) or op @ t"
    )


def _operand_list(kind: str, ops: tuple[LinearOperator, ...]) -> tuple[torch.nn.ModuleList, int | None]:
    if not ops:
        raise ValueError(f"{kind}: needs at least one operator, got none")
    check_operands(kind, ops)
    heads = check_compatible(kind, ops)
    return torch.nn.ModuleList(ops), heads


def _scales(node: Node) -> list[float]:
    """Every scale a node tree holds, in a fixed order (networks' scales and gathers' scales)."""
    if isinstance(node, _nodes.NetNode):
        return [node.network.scale]
    if isinstance(node, _nodes.GatherNode):
        return [node.scale]
    return [s for child in getattr(node, "children", ()) for s in _scales(child)]


def check_scales(node: Node, operands: list[Node], factor: float = 1.0) -> Node:
    """``node``, combined from ``operands`` (and the scalar ``factor``), must hold only finite scales, and none that
    underflowed to zero from nonzero parts: either would silently be another operator."""
    parts = [s for nd in operands for s in _scales(nd)] + [factor]
    named = sorted(s for s in parts if s != 1.0)
    for s in _scales(node):
        if not math.isfinite(s):
            raise ValueError(
                f"the product of its scalars {named} overflows float64 (|scale| > {sys.float_info.max:.4g})"
            )
        if s == 0 and all(parts):
            raise ValueError(f"the product of its nonzero scalars {named} underflows float64 to 0")
    return node


@final
class Sum(LinearOperator):
    """``A_1 + A_2 + ...`` of operators of one shape.

    Example:
        >>> import structmat as sm
        >>> S = sm.Dense(5, 3) + sm.Identity(5) @ sm.Dense(5, 3)
        >>> S.shape, type(S).__name__
        ((5, 3), 'Sum')
    """

    def __init__(self, *ops: LinearOperator) -> None:
        terms, heads = _operand_list("Sum", ops)
        shapes = {op.shape for op in ops}
        if len(shapes) > 1:
            listing = " + ".join(f"{op.name}" for op in ops)
            raise ValueError(f"Sum: operands must share one shape, got {listing}")
        super().__init__(ops[0].shape, heads)
        self.terms = terms

    def _operands(self) -> tuple[LinearOperator, ...]:
        return tuple(self.terms)

    projection: ClassVar[str] = "gradient"  # written ``A + B``; no closed form for a sum of structures

    def _lower(self) -> Node:
        return _nodes.add([op._node for op in self.terms])


@final
class Product(LinearOperator):
    """``A_1 @ A_2 @ ...``: one network when neighbouring mode splits share a row-major refinement, else a chain.

    Example:
        >>> import structmat as sm
        >>> P = sm.Dense(5, 2) @ sm.Dense(2, 7)
        >>> len(P.cost().contractions)  # fused into one einsum
        1
    """

    def __init__(self, *ops: LinearOperator) -> None:
        factors, heads = _operand_list("Product", ops)
        for a, b in zip(ops, ops[1:]):
            if a.shape[1] != b.shape[0]:
                raise ValueError(
                    f"Product: cannot compose {a.name} @ {b.name}: inner sizes {a.shape[1]} and {b.shape[0]} differ"
                )
        super().__init__((ops[0].shape[0], ops[-1].shape[1]), heads)
        self.factors = factors

    def _operands(self) -> tuple[LinearOperator, ...]:
        return tuple(self.factors)

    projection: ClassVar[str] = "gradient"  # written ``A @ B``; no closed form for a product of structures

    def _lower(self) -> Node:
        parts = [op._node for op in self.factors]
        return check_scales(_nodes.compose(parts), parts)


@final
class Transpose(LinearOperator):
    """``A.T``: input and output modes swapped; the parameters are ``A``'s own.

    Example:
        >>> import structmat as sm
        >>> A = sm.Dense(5, 3)
        >>> A.T.shape, A.T.num_params == A.num_params, A.T.T is A
        ((3, 5), True, True)
    """

    def __init__(self, op: LinearOperator) -> None:
        heads = check_compatible("Transpose", (op,))
        super().__init__((op.shape[1], op.shape[0]), heads)
        self.op = op

    def _operands(self) -> tuple[LinearOperator, ...]:
        return (self.op,)

    @property
    def T(self) -> LinearOperator:  # noqa: N802
        return self.op

    expr_name: ClassVar[str] = "transpose"  # written ``A.T``; ``transpose(A)`` when ``A`` is a transpose
    projection: ClassVar[str] = "parts"

    def _expr_args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self.op,), {}

    def _lower(self) -> Node:
        return self.op._node.transpose()


@final
class Kronecker(LinearOperator):
    """``A_1 ⊗ A_2 ⊗ ...`` (``torch.kron`` order): shape ``(Π m_k, Π n_k)``.

    Example:
        >>> import torch, structmat as sm
        >>> A, B = sm.Dense(2, 3), sm.Dense(5, 7)
        >>> torch.allclose(sm.kron(A, B).dense(), torch.kron(A.dense(), B.dense()), atol=1e-6)
        True
    """

    def __init__(self, *ops: LinearOperator) -> None:
        parts, heads = _operand_list("Kronecker", ops)
        if heads is not None and not all(isinstance(op._node, _nodes.NetNode) for op in ops):
            raise ValueError(
                "Kronecker: stacks of heads combine by kron only when every part is a single network, got "
                + ", ".join(f"{op.name} ({type(op._node).__name__})" for op in ops)
            )
        super().__init__((math.prod(op.shape[0] for op in ops), math.prod(op.shape[1] for op in ops)), heads)
        self.parts = parts

    @classmethod
    def from_sizes(
        cls,
        *sizes: tuple[int, int],
        heads: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Kronecker:
        """``Dense(m_1, n_1) ⊗ Dense(m_2, n_2) ⊗ ...`` from ``(m_k, n_k)`` pairs.

        Example:
            >>> import structmat as sm
            >>> K = sm.Kronecker.from_sizes((3, 4), (5, 2))
            >>> K.shape, K.num_params, K.rank()
            ((15, 8), 22, Rank(bound=6, exact=True))
        """
        from .operators.dense import Dense

        for pair in sizes:
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise ValueError(f"Kronecker.from_sizes: each size must be an (m, n) pair, got {pair!r}")
        return cls(*(Dense(m, n, heads=heads, dtype=dtype, device=device) for m, n in sizes))

    def _operands(self) -> tuple[LinearOperator, ...]:
        return tuple(self.parts)

    expr_name: ClassVar[str] = "kron"
    projection: ClassVar[str] = "parts"

    def _expr_args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return tuple(self.parts), {}

    def _lower(self) -> Node:
        parts = [op._node for op in self.parts]
        return check_scales(_nodes.kron(parts), parts)


@final
class BlockDiagonal(LinearOperator):
    """``diag(A_1, A_2, ...)``: blocks of any shapes along the diagonal (``torch.block_diag`` layout).

    A single operand that is a stack of H operators gives the H-block diagonal of its heads, as one network; with
    ``heads=K`` it gives a stack of K block-diagonals of H/K blocks each (head k takes the stacked operators
    ``k*H/K .. (k+1)*H/K - 1``).

    Example:
        >>> import structmat as sm
        >>> sm.block_diag(sm.Dense(2, 3), sm.Dense(5, 7)).shape
        (7, 10)
    """

    def __init__(self, *ops: LinearOperator, heads: int | None = None) -> None:
        blocks, stack = _operand_list("BlockDiagonal", ops)
        if stack is not None and len(ops) > 1:
            raise ValueError(
                f"BlockDiagonal: a stack of heads must be the only operand (its heads become the blocks), got "
                f"{', '.join(op.name for op in ops)}"
            )
        if heads is not None:
            if stack is None:
                raise ValueError(
                    f"BlockDiagonal(heads={heads}): heads needs one stacked operand, got "
                    f"{', '.join(op.name for op in ops)}"
                )
            heads = check_heads(f"BlockDiagonal(heads={heads!r})", heads)
            if stack % heads:
                raise ValueError(
                    f"BlockDiagonal(heads={heads!r}): heads must be a positive int dividing the "
                    f"operand's {stack} stacked operators"
                )
        if stack is not None:  # one stack: its operators become equal blocks (grouped per head when heads is set)
            (op,) = ops
            nblocks = stack // (heads or 1)
            super().__init__((op.shape[0] * nblocks, op.shape[1] * nblocks), heads)
        else:
            super().__init__((sum(op.shape[0] for op in ops), sum(op.shape[1] for op in ops)))
        self.blocks = blocks

    @classmethod
    def from_sizes(
        cls,
        m: int,
        n: int,
        nblocks: int,
        *,
        heads: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> BlockDiagonal:
        """``nblocks`` dense ``(m / nblocks, n / nblocks)`` blocks held as one stacked parameter (one einsum).

        With ``heads=H``, a stack of H such block-diagonals (parameter ``(H * nblocks, m / nblocks, n / nblocks)``).

        Example:
            >>> import structmat as sm
            >>> B = sm.BlockDiagonal.from_sizes(12, 20, nblocks=4)
            >>> B.num_params, B.rank(), B.cost().flops  # 4 blocks of (3, 5)
            (60, Rank(bound=12, exact=True), 120)
        """
        from .operators.dense import Dense

        where = f"BlockDiagonal.from_sizes({m}, {n}, nblocks={nblocks})"
        m, n, nblocks = (check_int(where, what, v) for what, v in (("m", m), ("n", n), ("nblocks", nblocks)))
        if m % nblocks or n % nblocks:
            raise ValueError(f"{where}: nblocks must divide m={m} and n={n}")
        heads = check_heads(where, heads)
        stack = nblocks * (heads or 1)
        return cls(Dense(m // nblocks, n // nblocks, heads=stack, dtype=dtype, device=device), heads=heads)

    def _operands(self) -> tuple[LinearOperator, ...]:
        return tuple(self.blocks)

    expr_name: ClassVar[str] = "block_diag"
    projection: ClassVar[str] = "parts"

    def _expr_args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        stacked = len(self.blocks) == 1 and self.heads is not None
        return tuple(self.blocks), {"heads": self.heads if stacked else None}

    def _lower(self) -> Node:
        if len(self.blocks) == 1 and self.blocks[0].heads is not None:
            return _nodes.stack_blocks(self.blocks[0]._node, self.heads)
        return _nodes.block_diag([op._node for op in self.blocks])


@final
class Scaled(LinearOperator):
    """``c * A`` for a real constant ``c`` (not a parameter).

    Example:
        >>> import structmat as sm
        >>> (2.5 * sm.Identity(3)).dense().diagonal().tolist()
        [2.5, 2.5, 2.5]
    """

    def __init__(self, op: LinearOperator, scale: float) -> None:
        check_operands("Scaled", (op,))
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"Scaled({op.name}): scale must be a real number, got {type(scale).__name__}")
        if not math.isfinite(float(scale)):
            raise ValueError(f"Scaled({op.name}): scale must be finite, got {scale}")
        heads = check_compatible("Scaled", (op,))
        super().__init__(op.shape, heads)
        self.op = op
        self.scale = float(scale)

    def _operands(self) -> tuple[LinearOperator, ...]:
        return (self.op,)

    def _describe(self) -> tuple[str, str]:
        return "Scaled", f"scale={self.scale:g}"

    projection: ClassVar[str] = "parts"  # written ``c * A``

    def _lower(self) -> Node:
        return check_scales(self.op._node.scaled(self.scale), [self.op._node], self.scale)


def kron(*ops: LinearOperator) -> LinearOperator:
    """Kronecker product ``ops[0] ⊗ ops[1] ⊗ ...`` (one operand returns it unchanged).

    Example:
        >>> import structmat as sm
        >>> sm.kron(sm.Dense(2, 3), sm.Identity(4)).shape
        (8, 12)
    """
    return ops[0] if len(ops) == 1 and isinstance(ops[0], LinearOperator) else Kronecker(*ops)


def block_diag(*ops: LinearOperator) -> LinearOperator:
    """Block-diagonal operator with ``ops`` on the diagonal (one operand returns it unchanged).

    Example:
        >>> import structmat as sm
        >>> sm.block_diag(sm.Identity(2), sm.Dense(3, 4)).shape
        (5, 6)
    """
    return ops[0] if len(ops) == 1 and isinstance(ops[0], LinearOperator) else BlockDiagonal(*ops)
