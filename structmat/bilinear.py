"""``bilinear_split``: ``A = L^T R`` through the minimal cut of A's network, so ``x^T A y = <L x, R y>``.

This is how structured attention scores cost the cut width per pair of tokens instead of the full dimension.
"""

from __future__ import annotations

from typing import final

import torch

from .core.base import LinearOperator
from .core.nodes import NetNode, Node, SumNode
from .operators.identity import Identity

__all__ = ["bilinear_split"]


@final
class _Part(LinearOperator):
    """One side of a split: a node built from ``source``'s factors (it shares, and reports, their parameters)."""

    def __init__(self, node: Node, source: LinearOperator, role: str) -> None:
        super().__init__((node.m, node.n), node.heads)
        self._node_value = node
        self.source = source
        self.role = role

    def _describe(self) -> tuple[str, str]:
        return self.role, ""

    def _operands(self) -> tuple[LinearOperator, ...]:
        return ()

    def _lower(self) -> Node:
        return self._node_value


def _split(node: Node) -> tuple[Node, Node] | None:
    """``(L, R)`` nodes with ``node == L^T R``, through minimal cuts; None where no split beats the plain one."""
    if isinstance(node, NetNode):
        parts = node.network.bilinear_split()
        if parts is None:
            return None
        right, left = parts
        if right.m >= min(node.m, node.n):
            return None
        return NetNode(left), NetNode(right)
    if isinstance(node, SumNode) and node.full:
        splits = [_split(c) for c in node.children]
        if any(s is None for s in splits):
            return None
        width = sum(s[0].m for s in splits)  # type: ignore[index]
        if width >= min(node.m, node.n):
            return None
        slices, lo = [], 0
        for s in splits:
            slices.append((lo, lo + s[0].m))  # type: ignore[index]
            lo += s[0].m  # type: ignore[index]
        lefts = [s[0] for s in splits]  # type: ignore[index]
        rights = [s[1] for s in splits]  # type: ignore[index]
        return (
            SumNode(lefts, width, node.m, [(0, node.m)] * len(lefts), slices),
            SumNode(rights, width, node.n, [(0, node.n)] * len(rights), slices),
        )
    return None


_CACHE = "_bilinear_split_cache"


class _SplitCache:
    """Holds an operator's split in its ``__dict__`` (not a submodule: no parameters, no ``state_dict`` entries).

    Copies and pickles of the holder are empty, so a copied or unpickled operator computes its own split from its own
    parameters instead of sharing, or carrying, the original's.
    """

    __slots__ = ("parts",)

    def __init__(self, parts: tuple[LinearOperator, LinearOperator] | None = None) -> None:
        self.parts = parts

    def __copy__(self) -> _SplitCache:
        return _SplitCache()

    def __deepcopy__(self, memo: dict[int, object]) -> _SplitCache:
        return _SplitCache()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return _SplitCache, ()


def bilinear_split(op: LinearOperator) -> tuple[LinearOperator, LinearOperator]:
    """Operators ``L`` of shape ``(r, m)`` and ``R`` of shape ``(r, n)`` with ``op == L.T @ R`` and ``r`` smallest.

    For a single network the split is at its minimal cut (``r`` is the cut width, diagonal modes included); a sum of
    networks concatenates the splits of its terms. When no cut is narrower than ``min(m, n)`` the split is the plain
    one: ``(I_m, op)`` when ``m <= n``, else ``(op.T, I_n)`` — one side is then free. ``L`` and ``R`` share ``op``'s
    parameters (they read the parameters at every application, so they never go stale). For a stack of heads either
    side may be a stack or a single operator (shared by the heads).

    The split is computed once per operator (its structure is fixed) and kept on it, outside its submodules and
    parameters: ``state_dict`` is unchanged, a deep copy or an unpickled copy computes its own split from its own
    parameters, and the split is freed with the operator. The first call computes it eagerly (never traced by
    ``torch.compile``); later calls, compiled or not, only read it.

    Args:
        op: any operator.

    Returns:
        ``(L, R)``.

    Example:
        >>> import torch, structmat as sm
        >>> A = sm.LowRank(12, 7, rank=3)
        >>> L, R = sm.bilinear_split(A)
        >>> L.shape, R.shape
        ((3, 12), (3, 7))
        >>> torch.allclose((L.T @ R).dense(), A.dense(), atol=1e-6)
        True
        >>> sm.bilinear_split(A)[0] is L  # kept on A
        True
    """
    if not isinstance(op, LinearOperator):
        raise TypeError(f"bilinear_split: expected a LinearOperator, got {type(op).__name__}")
    cache = op.__dict__.get(_CACHE)
    if isinstance(cache, _SplitCache) and cache.parts is not None:
        return cache.parts
    return _compute_and_keep(op)


@torch.compiler.disable
def _compute_and_keep(op: LinearOperator) -> tuple[LinearOperator, LinearOperator]:
    """Compute ``op``'s split (eagerly, even under ``torch.compile``) and keep it on ``op``."""
    parts = _compute(op)
    op.__dict__[_CACHE] = _SplitCache(parts)
    return parts


def _compute(op: LinearOperator) -> tuple[LinearOperator, LinearOperator]:
    """The split itself: cut parts when a cut is narrower than ``min(m, n)``, else the plain one."""
    parts = _split(op._node)
    if parts is not None:
        left, right = parts
        return _Part(left, op, "CutLeft"), _Part(right, op, "CutRight")
    m, n = op.shape
    if m <= n:
        return Identity(m), op
    return op.T, Identity(n)
