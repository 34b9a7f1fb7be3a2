"""Linear algebra on operators that uses their structure: ``solve``, ``inv``, ``logdet``, ``eigvals``, ``svdvals``.

Each function picks a *rule* from the operator's structure (``Identity``, ``Diagonal``, ``Permutation``, ``Scaled``,
``Transpose``, ``Kronecker``, ``BlockDiagonal``, ``Product`` of square factors, and ``Identity``/``Diagonal`` plus a
low-rank term by Woodbury and the matrix determinant lemma) and falls back to ``torch.linalg`` on ``op.dense()``
otherwise. :func:`plan` shows the chosen rule with its estimated flops next to the dense fallback's, so it is visible
why a rule is cheap. A rule is chosen when it applies and its estimate is no larger than the dense one.

Choices:

- ``logdet`` returns ``(sign, logabsdet)`` like ``torch.linalg.slogdet``; a singular operator gives sign 0 and
  ``-inf``, as torch does. ``solve`` and ``inv`` of a singular operator raise ``ValueError`` naming it.
- A stack of heads is rejected with a ``ValueError``: apply ``torch.linalg`` to ``op.dense()`` (shape ``(H, n, n)``)
  for per-head results.
- ``inv`` returns a new operator whose parameters are computed values (a snapshot that does not track gradients);
  ``solve`` and ``logdet`` are differentiable through the operator's parameters.
- ``eigvals`` returns complex values in no particular order (like ``torch.linalg.eigvals``); ``svdvals`` returns
  real values in descending order. Every function needs a square operator except ``svdvals``, whose structured
  rules need square parts and whose dense fallback takes any shape.
- Flops are estimates (2 per multiply-add; ``2n^3/3`` for an LU, ``2n^3`` for an inverse, ``10n^3`` for the
  eigenvalues and ``4mn min(m, n)`` for the singular values of a dense matrix), plus the flops of forming
  ``op.dense()`` for the fallback.

Example:
    >>> import torch, structmat as sm
    >>> from structmat import linalg
    >>> A = sm.Identity(1000) + sm.LowRank(1000, 1000, rank=2, dtype=torch.float64)
    >>> p = linalg.plan(A, "solve")
    >>> p.rule, p.flops < p.dense_flops / 1000
    ('woodbury', True)
    >>> b = torch.randn(1000, dtype=torch.float64)
    >>> torch.allclose(A(linalg.solve(A, b)), b)
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .combinators import BlockDiagonal, Kronecker, Product, Scaled, Sum, Transpose, block_diag, kron
from .core.base import LinearOperator
from .operators.dense import Dense
from .operators.diagonal import Diagonal
from .operators.identity import Identity
from .operators.lowrank import LowRank
from .operators.permutation import Permutation

__all__ = ["Plan", "SignLogDet", "plan", "solve", "inv", "logdet", "eigvals", "svdvals", "TASKS"]

#: The tasks :func:`plan` knows.
TASKS = ("solve", "inv", "logdet", "eigvals", "svdvals")


class SignLogDet(NamedTuple):
    """``det(A) = sign * exp(logabsdet)``, as ``torch.linalg.slogdet`` returns it."""

    sign: torch.Tensor
    logabsdet: torch.Tensor


@dataclass(frozen=True)
class Plan:
    """The rule :func:`plan` chose for one task on one operator.

    Attributes:
        task: one of :data:`TASKS`.
        operator: the operator's name.
        rule: the chosen rule (``"dense"`` for the fallback).
        flops: the chosen rule's estimated flops.
        dense_flops: the dense fallback's estimated flops (forming ``op.dense()`` included).
        parts: the plans of the parts the rule recurses into.
    """

    task: str
    operator: str
    rule: str
    flops: int
    dense_flops: int
    parts: tuple[Plan, ...] = ()

    def __str__(self) -> str:
        lines = [f"{self.task}({self.operator}): rule {self.rule}, {self.flops} flops (dense {self.dense_flops})"]
        for p in self.parts:
            lines += ["  " + line for line in str(p).splitlines()]
        return "\n".join(lines)


# -- checks ----------------------------------------------------------------------------------------------------------
def _check(task: str, op: object, *, square: bool = True) -> LinearOperator:
    if not isinstance(op, LinearOperator):
        raise TypeError(f"structmat.linalg.{task}: expected a LinearOperator, got {type(op).__name__}")
    if op.heads is not None:
        raise ValueError(
            f"structmat.linalg.{task}: {op.name} is a stack of {op.heads} heads; linalg takes one operator "
            f"(for per-head results use torch.linalg on op.dense(), shape {(op.heads, *op.shape)})"
        )
    if square and op.shape[0] != op.shape[1]:
        raise ValueError(f"structmat.linalg.{task}: {op.name} must be square, got shape {op.shape}")
    return op


def _check_method(task: str, method: str) -> None:
    if method not in ("auto", "dense"):
        raise ValueError(f"structmat.linalg.{task}: method must be 'auto' or 'dense', got {method!r}")


def _singular(task: str, op: LinearOperator, why: str) -> ValueError:
    return ValueError(f"structmat.linalg.{task}: {op.name} is singular ({why})")


def _dtype(op: LinearOperator) -> torch.dtype:
    return op.dtype or torch.get_default_dtype()


# -- structure recognition -------------------------------------------------------------------------------------------
def _is_square(op: LinearOperator) -> bool:
    return op.shape[0] == op.shape[1]


def _diag_like(op: LinearOperator) -> bool:
    if isinstance(op, (Identity, Diagonal)):
        return True
    return isinstance(op, Scaled) and _diag_like(op.op)


def _diag_of(op: LinearOperator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(op, Identity):
        return torch.ones(op.shape[0], dtype=dtype, device=device)
    if isinstance(op, Diagonal):
        return op.diag
    return op.scale * _diag_of(op.op, dtype, device)  # type: ignore[attr-defined]


def _inner_rank(op: LinearOperator) -> int | None:
    """``r`` when ``op`` is visibly ``U V`` with ``U`` of shape ``(n, r)``, ``r < n``; else None."""
    n = op.shape[0]
    if isinstance(op, LowRank):
        r = op.rank_
    elif isinstance(op, Product):
        r = min(f.shape[1] for f in op.factors[:-1])
    elif isinstance(op, (Scaled, Transpose)):
        return _inner_rank(op.op)
    else:
        return None
    return r if r < n else None


def _low_rank_of(op: LinearOperator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, V)`` with ``op = U @ V`` (``_inner_rank(op)`` is not None)."""
    if isinstance(op, LowRank):
        return op.U, op.V
    if isinstance(op, Scaled):
        U, V = _low_rank_of(op.op)
        return op.scale * U, V
    if isinstance(op, Transpose):
        U, V = _low_rank_of(op.op)
        return V.T, U.T
    factors = list(op.factors)  # type: ignore[attr-defined]
    k = min(range(len(factors) - 1), key=lambda j: factors[j].shape[1])
    left, right = factors[: k + 1], factors[k + 1 :]
    return _product(left).dense(), _product(right).dense()


def _product(ops: list[LinearOperator]) -> LinearOperator:
    return ops[0] if len(ops) == 1 else Product(*ops)


def _woodbury_parts(op: LinearOperator) -> tuple[LinearOperator, LinearOperator, int] | None:
    """``(D, L, r)`` when ``op`` is ``D + L`` with ``D`` diagonal-like and ``L`` of inner rank ``r``."""
    if not isinstance(op, Sum) or len(op.terms) != 2:
        return None
    a, b = op.terms
    for d, low in ((a, b), (b, a)):
        if _diag_like(d):
            r = _inner_rank(low)
            if r is not None:
                return d, low, r
    return None


def _stacked_blocks(op: BlockDiagonal) -> bool:
    return len(op.blocks) == 1 and op.blocks[0].heads is not None


def _pushable(op: LinearOperator) -> bool:
    return isinstance(op, (Identity, Diagonal, Permutation, Scaled, Kronecker, Transpose, Product, Sum)) or (
        isinstance(op, BlockDiagonal) and not _stacked_blocks(op)
    )


def _transposed(op: LinearOperator) -> LinearOperator:
    """``op.T`` with the transpose pushed one level into the structure (``_pushable(op)``)."""
    if isinstance(op, (Identity, Diagonal)):
        return op
    if isinstance(op, Permutation):
        return _inverse_permutation(op)
    if isinstance(op, Transpose):
        return op.op
    if isinstance(op, Scaled):
        return Scaled(op.op.T, op.scale)
    if isinstance(op, Kronecker):
        return Kronecker(*(p.T for p in op.parts))
    if isinstance(op, BlockDiagonal):
        return BlockDiagonal(*(b.T for b in op.blocks))
    if isinstance(op, Product):
        return Product(*(f.T for f in reversed(op.factors)))
    return Sum(*(t.T for t in op.terms))  # type: ignore[attr-defined]


def _inverse_permutation(op: Permutation) -> Permutation:
    if op._axes is not None:
        sizes, order = op._axes
        back = sorted(range(len(order)), key=lambda k: order[k])
        return Permutation.from_axes(tuple(sizes[k] for k in order), back)
    inverse = [0] * op.shape[0]
    for k, p in enumerate(op.perm):
        inverse[p] = k
    return Permutation(inverse)


# -- costs -----------------------------------------------------------------------------------------------------------
def _factor_flops(task: str, m: int, n: int, k: int) -> int:
    """Estimated flops of ``task`` on a dense ``(m, n)`` matrix already formed."""
    return {
        "solve": 2 * n**3 // 3 + 2 * n * n * k,
        "inv": 2 * n**3,
        "logdet": 2 * n**3 // 3,
        "eigvals": 10 * n**3,
        "svdvals": 4 * m * n * min(m, n),
    }[task]


def _dense_flops(op: LinearOperator, task: str, k: int) -> int:
    m, n = op.shape
    return op.cost(batch=n).flops + _factor_flops(task, m, n, k)


def _rule(op: LinearOperator, task: str) -> str | None:
    """The structural rule that applies to ``op`` for ``task``, or None."""
    if isinstance(op, Identity):
        return "identity"
    if isinstance(op, Diagonal):
        return "diagonal"
    if isinstance(op, Permutation):
        return "permutation"
    if isinstance(op, Scaled):
        return "scaled"
    if isinstance(op, Transpose):
        return "transpose" if task not in ("solve", "inv") or _pushable(op.op) else None
    if isinstance(op, Kronecker) and all(_is_square(p) for p in op.parts):
        return "kronecker"
    if isinstance(op, BlockDiagonal) and all(_is_square(b) for b in op.blocks):
        return "block_diagonal"
    if task in ("solve", "inv", "logdet"):
        if _woodbury_parts(op) is not None:
            return "woodbury" if task != "logdet" else "determinant_lemma"
        if isinstance(op, Product) and all(_is_square(f) for f in op.factors):
            return "product"
    return None


def _parts(op: LinearOperator, rule: str) -> list[LinearOperator]:
    if rule == "scaled":
        return [op.op]  # type: ignore[attr-defined]
    if rule == "transpose":
        return [op.op]  # type: ignore[attr-defined]
    if rule == "kronecker":
        return list(op.parts)  # type: ignore[attr-defined]
    if rule == "block_diagonal":
        return [] if _stacked_blocks(op) else list(op.blocks)  # type: ignore[arg-type]
    if rule == "product":
        return list(op.factors)  # type: ignore[attr-defined]
    return []


def _plan(op: LinearOperator, task: str, k: int, method: str = "auto") -> Plan:
    dense = _dense_flops(op, task, k)
    rule = _rule(op, task) if method == "auto" else None
    if rule is None:
        return Plan(task, op.name, "dense", dense, dense)
    n = op.shape[0]
    if rule == "transpose" and task in ("solve", "inv"):
        parts = [_plan(_transposed(op.op), task, k)]  # type: ignore[attr-defined]
    elif rule == "kronecker" and task == "solve":  # each part solves along its axis, k n / n_i columns
        parts = [_plan(p, task, k * n // p.shape[0]) for p in op.parts]  # type: ignore[attr-defined]
    else:
        parts = [_plan(p, task, k) for p in _parts(op, rule)]
    inner = sum(p.flops for p in parts)
    if rule == "identity" or rule == "permutation":
        flops = 0 if task in ("solve", "inv", "svdvals") else n
    elif rule == "diagonal":
        flops = n * k if task == "solve" else n
    elif rule == "scaled":
        flops = inner + (n * k if task == "solve" else n)
    elif rule == "transpose":
        flops = inner
    elif rule == "kronecker":
        flops = inner + (n if task in ("logdet", "eigvals", "svdvals") else 0)
    elif rule == "block_diagonal" and _stacked_blocks(op):
        stack = op.blocks[0]  # type: ignore[attr-defined]
        b = stack.shape[0]
        flops = stack.cost(batch=b).flops + stack.heads * _factor_flops(task, b, b, k)
    elif rule in ("block_diagonal", "product"):
        flops = inner
    else:  # woodbury / determinant_lemma
        d, low, r = _woodbury_parts(op)  # type: ignore[misc]
        form = low.cost(batch=r).flops if not isinstance(low, LowRank) else 0
        capacitance = 2 * n * r * r + 2 * r**3 // 3
        flops = (
            form
            + capacitance
            + {"solve": 4 * n * r * k + 2 * r * r * k + 2 * n * k, "inv": 2 * r**3 + 2 * n * r * r}.get(task, n)
        )
    if flops > dense:
        return Plan(task, op.name, "dense", dense, dense)
    return Plan(task, op.name, rule, flops, dense, tuple(parts))


def plan(op: LinearOperator, task: str, *, k: int = 1) -> Plan:
    """The rule ``task`` would use on ``op``, with its estimated flops and the dense fallback's.

    Args:
        op: a single (not stacked) operator.
        task: one of ``"solve"``, ``"inv"``, ``"logdet"``, ``"eigvals"``, ``"svdvals"``.
        k: for ``"solve"``, the number of right-hand sides.

    Raises:
        ValueError: for an unknown task, a stack of heads, or a non-square operator (``svdvals`` excepted).

    Example:
        >>> import structmat as sm
        >>> from structmat import linalg
        >>> K = sm.kron(sm.Dense(30, 30), sm.Dense(40, 40))
        >>> p = linalg.plan(K, "logdet")
        >>> p.rule, [q.rule for q in p.parts], p.flops < p.dense_flops
        ('kronecker', ['dense', 'dense'], True)
    """
    if task not in TASKS:
        raise ValueError(f"structmat.linalg.plan: task must be one of {TASKS}, got {task!r}")
    _check(task, op, square=task != "svdvals")
    return _plan(op, task, k)


# -- execution -------------------------------------------------------------------------------------------------------
def _apply(op: LinearOperator, B: torch.Tensor) -> torch.Tensor:
    """``op @ B`` for ``B`` of shape ``(n, k)``."""
    return op(B.T).T


def _dense_linalg(task: str, op: LinearOperator, fn, *args):  # type: ignore[no-untyped-def]
    try:
        return fn(*args)
    except torch.linalg.LinAlgError as e:
        raise ValueError(f"structmat.linalg.{task}: {op.name} is singular (torch.linalg: {e})") from e


def _solve(op: LinearOperator, B: torch.Tensor, method: str) -> torch.Tensor:
    rule = _plan(op, "solve", B.shape[1], method).rule
    if rule == "identity":
        return B.clone()
    if rule == "diagonal":
        d = op.diag  # type: ignore[attr-defined]
        if bool((d == 0).any()):
            raise _singular("solve", op, f"diagonal entry {int((d == 0).nonzero()[0])} is 0")
        return B / d[:, None]
    if rule == "permutation":
        return _apply(_inverse_permutation(op), B)  # type: ignore[arg-type]
    if rule == "scaled":
        if op.scale == 0:  # type: ignore[attr-defined]
            raise _singular("solve", op, "its scale is 0")
        return _solve(op.op, B, method) / op.scale  # type: ignore[attr-defined]
    if rule == "transpose":
        return _solve(_transposed(op.op), B, method)  # type: ignore[attr-defined]
    if rule == "kronecker":
        sizes = [p.shape[0] for p in op.parts]  # type: ignore[attr-defined]
        X = B.reshape(*sizes, -1)
        for axis, p in enumerate(op.parts):  # type: ignore[attr-defined]
            moved = X.movedim(axis, 0)
            Y = _solve(p, moved.reshape(sizes[axis], -1), method)
            X = Y.reshape(moved.shape).movedim(0, axis)
        return X.reshape(B.shape)
    if rule == "block_diagonal":
        if _stacked_blocks(op):
            stack = op.blocks[0]  # type: ignore[attr-defined]
            H, b = stack.heads, stack.shape[0]
            Bs = B.reshape(H, b, -1)
            X = _dense_linalg("solve", op, torch.linalg.solve, stack.dense(), Bs)
            return X.reshape(H * b, -1)
        out, start = [], 0
        for blk in op.blocks:  # type: ignore[attr-defined]
            out.append(_solve(blk, B[start : start + blk.shape[0]], method))
            start += blk.shape[0]
        return torch.cat(out)
    if rule == "product":
        X = B
        for f in op.factors:  # type: ignore[attr-defined]
            X = _solve(f, X, method)
        return X
    if rule == "woodbury":
        dinv, W, Cinv_VDinv = _woodbury(op, "solve")
        return dinv[:, None] * B - W @ (Cinv_VDinv @ B)
    A = op.dense(dtype=B.dtype if op.dtype is None else None)
    return _dense_linalg("solve", op, torch.linalg.solve, A, B)


def _woodbury(op: LinearOperator, task: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(1/d, D^-1 U, C^-1 V D^-1)`` with ``A^-1 = D^-1 - (D^-1 U)(C^-1 V D^-1)``, ``C = I + V D^-1 U``."""
    d_op, low, r = _woodbury_parts(op)  # type: ignore[misc]
    U, V = _low_rank_of(low)
    d = _diag_of(d_op, U.dtype, U.device)
    if bool((d == 0).any()):
        raise ValueError(
            f"structmat.linalg.{task}: {op.name}: Woodbury needs an invertible diagonal part, but {d_op.name} has a "
            f"zero entry; use method='dense'"
        )
    dinv = 1 / d
    W = dinv[:, None] * U
    C = torch.eye(r, dtype=U.dtype, device=U.device) + V @ W
    VDinv = V * dinv
    return dinv, W, _dense_linalg(task, op, torch.linalg.solve, C, VDinv)


def _inv(op: LinearOperator, method: str) -> LinearOperator:
    rule = _plan(op, "inv", 1, method).rule
    if rule == "identity":
        return op
    if rule == "diagonal":
        d = op.diag.detach()  # type: ignore[attr-defined]
        if bool((d == 0).any()):
            raise _singular("inv", op, f"diagonal entry {int((d == 0).nonzero()[0])} is 0")
        return Diagonal.from_tensor(1 / d, requires_grad=False)
    if rule == "permutation":
        return _inverse_permutation(op)  # type: ignore[arg-type]
    if rule == "scaled":
        if op.scale == 0:  # type: ignore[attr-defined]
            raise _singular("inv", op, "its scale is 0")
        return Scaled(_inv(op.op, method), 1 / op.scale)  # type: ignore[attr-defined]
    if rule == "transpose":
        return _inv(_transposed(op.op), method)  # type: ignore[attr-defined]
    if rule == "kronecker":
        return kron(*(_inv(p, method) for p in op.parts))  # type: ignore[attr-defined]
    if rule == "block_diagonal":
        if _stacked_blocks(op):
            stack = op.blocks[0]  # type: ignore[attr-defined]
            Ainv = _dense_linalg("inv", op, torch.linalg.inv, stack.dense().detach())
            return BlockDiagonal(Dense.from_tensor(Ainv, requires_grad=False))
        return block_diag(*(_inv(b, method) for b in op.blocks))  # type: ignore[attr-defined]
    if rule == "product":
        return _product([_inv(f, method) for f in reversed(op.factors)])  # type: ignore[attr-defined]
    if rule == "woodbury":
        with torch.no_grad():
            dinv, W, R = _woodbury(op, "inv")
        low = Dense.from_tensor(W.clone(), requires_grad=False) @ Dense.from_tensor(R.clone(), requires_grad=False)
        return Diagonal.from_tensor(dinv.clone(), requires_grad=False) - low
    with torch.no_grad():
        Ainv = _dense_linalg("inv", op, torch.linalg.inv, op.dense())
    return Dense.from_tensor(Ainv, requires_grad=False)


def _logdet(op: LinearOperator, method: str) -> SignLogDet:
    rule = _plan(op, "logdet", 1, method).rule
    dtype, n = _dtype(op), op.shape[0]
    one, zero = torch.ones((), dtype=dtype), torch.zeros((), dtype=dtype)
    if rule == "identity":
        return SignLogDet(one, zero)
    if rule == "diagonal":
        d = op.diag  # type: ignore[attr-defined]
        return SignLogDet(torch.sign(d).prod(), torch.log(d.abs()).sum())
    if rule == "permutation":
        return SignLogDet(one * _perm_sign(op.perm), zero)  # type: ignore[attr-defined]
    if rule == "scaled":
        s, la = _logdet(op.op, method)  # type: ignore[attr-defined]
        c = op.scale  # type: ignore[attr-defined]
        csign = 0.0 if c == 0 else math.copysign(1.0, c) ** n
        return SignLogDet(s * csign, la + n * (math.log(abs(c)) if c else -math.inf))
    if rule == "transpose":
        return _logdet(op.op, method)  # type: ignore[attr-defined]
    if rule == "kronecker":
        s, la = one, zero
        for p in op.parts:  # type: ignore[attr-defined]
            ps, pla = _logdet(p, method)
            times = n // p.shape[0]
            s, la = s * ps**times, la + times * pla
        return SignLogDet(s, la)
    if rule == "block_diagonal":
        if _stacked_blocks(op):
            s, la = torch.linalg.slogdet(op.blocks[0].dense())  # type: ignore[attr-defined]
            return SignLogDet(s.prod(), la.sum())
        parts = [_logdet(b, method) for b in op.blocks]  # type: ignore[attr-defined]
        return SignLogDet(torch.stack([p.sign for p in parts]).prod(), torch.stack([p.logabsdet for p in parts]).sum())
    if rule == "product":
        parts = [_logdet(f, method) for f in op.factors]  # type: ignore[attr-defined]
        return SignLogDet(torch.stack([p.sign for p in parts]).prod(), torch.stack([p.logabsdet for p in parts]).sum())
    if rule == "determinant_lemma":
        d_op, low, r = _woodbury_parts(op)  # type: ignore[misc]
        U, V = _low_rank_of(low)
        d = _diag_of(d_op, U.dtype, U.device)
        if bool((d == 0).any()):
            return _logdet(op, "dense")
        C = torch.eye(r, dtype=U.dtype, device=U.device) + V @ (U / d[:, None])
        cs, cla = torch.linalg.slogdet(C)
        return SignLogDet(torch.sign(d).prod() * cs, torch.log(d.abs()).sum() + cla)
    s, la = torch.linalg.slogdet(op.dense(dtype=None if op.dtype else dtype))
    return SignLogDet(s, la)


def _perm_sign(perm: tuple[int, ...]) -> int:
    """``(-1)^(n - number of cycles)``."""
    seen = [False] * len(perm)
    cycles = 0
    for start in range(len(perm)):
        if not seen[start]:
            cycles += 1
            j = start
            while not seen[j]:
                seen[j] = True
                j = perm[j]
    return -1 if (len(perm) - cycles) % 2 else 1


def _cycle_lengths(perm: tuple[int, ...]) -> list[int]:
    seen = [False] * len(perm)
    out = []
    for start in range(len(perm)):
        if not seen[start]:
            j, length = start, 0
            while not seen[j]:
                seen[j] = True
                j = perm[j]
                length += 1
            out.append(length)
    return out


def _complex(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _products(values: list[torch.Tensor]) -> torch.Tensor:
    """All products ``v_1[i_1] v_2[i_2] ...``, flattened in row-major (``torch.kron``) order."""
    out = values[0]
    for v in values[1:]:
        out = (out[:, None] * v[None, :]).reshape(-1)
    return out


def _eigvals(op: LinearOperator, method: str) -> torch.Tensor:
    rule = _plan(op, "eigvals", 1, method).rule
    dtype, n = _dtype(op), op.shape[0]
    cdtype = _complex(dtype)
    if rule == "identity":
        return torch.ones(n, dtype=cdtype)
    if rule == "diagonal":
        return op.diag.to(cdtype)  # type: ignore[attr-defined]
    if rule == "permutation":
        roots = [
            torch.polar(torch.ones(L, dtype=dtype), 2 * math.pi * torch.arange(L, dtype=dtype) / L)
            for L in _cycle_lengths(op.perm)
        ]  # type: ignore[attr-defined]
        return torch.cat(roots).to(cdtype)
    if rule == "scaled":
        return op.scale * _eigvals(op.op, method)  # type: ignore[attr-defined]
    if rule == "transpose":
        return _eigvals(op.op, method)  # type: ignore[attr-defined]
    if rule == "kronecker":
        return _products([_eigvals(p, method) for p in op.parts])  # type: ignore[attr-defined]
    if rule == "block_diagonal":
        if _stacked_blocks(op):
            return torch.linalg.eigvals(op.blocks[0].dense()).reshape(-1)  # type: ignore[attr-defined]
        return torch.cat([_eigvals(b, method) for b in op.blocks])  # type: ignore[attr-defined]
    return torch.linalg.eigvals(op.dense(dtype=None if op.dtype else dtype))


def _svdvals(op: LinearOperator, method: str) -> torch.Tensor:
    rule = _plan(op, "svdvals", 1, method).rule
    dtype, n = _dtype(op), op.shape[0]
    if rule in ("identity", "permutation"):
        return torch.ones(n, dtype=dtype)
    if rule == "diagonal":
        return op.diag.abs()  # type: ignore[attr-defined]
    if rule == "scaled":
        return abs(op.scale) * _svdvals(op.op, method)  # type: ignore[attr-defined]
    if rule == "transpose":
        return _svdvals(op.op, method)  # type: ignore[attr-defined]
    if rule == "kronecker":
        return _products([_svdvals(p, method) for p in op.parts])  # type: ignore[attr-defined]
    if rule == "block_diagonal":
        if _stacked_blocks(op):
            return torch.linalg.svdvals(op.blocks[0].dense()).reshape(-1)  # type: ignore[attr-defined]
        return torch.cat([_svdvals(b, method) for b in op.blocks])  # type: ignore[attr-defined]
    return torch.linalg.svdvals(op.dense(dtype=None if op.dtype else dtype))


# -- public functions ------------------------------------------------------------------------------------------------
def solve(op: LinearOperator, b: torch.Tensor, *, method: str = "auto") -> torch.Tensor:
    """``x`` with ``op @ x = b``, using ``op``'s structure (see :func:`plan`).

    Args:
        op: a square, single operator of shape ``(n, n)``.
        b: a tensor of shape ``(n,)`` or ``(..., n, k)`` (columns are right-hand sides, as ``torch.linalg.solve``).
        method: ``"auto"`` (the structural rule when one applies) or ``"dense"`` (always ``torch.linalg.solve``).

    Returns:
        ``x`` of ``b``'s shape.

    Raises:
        ValueError: a non-square operator, a stack of heads, a ``b`` of the wrong shape, or a singular operator.

    Example:
        >>> import torch, structmat as sm
        >>> from structmat import linalg
        >>> D = sm.Diagonal.from_tensor(torch.tensor([2.0, 4.0, 8.0]))
        >>> linalg.solve(D, torch.tensor([2.0, 2.0, 2.0])).tolist()
        [1.0, 0.5, 0.25]
    """
    _check("solve", op)
    _check_method("solve", method)
    n = op.shape[0]
    if not isinstance(b, torch.Tensor):
        raise TypeError(f"structmat.linalg.solve({op.name}): b must be a torch.Tensor, got {type(b).__name__}")
    if b.ndim == 0 or (b.ndim == 1 and b.shape[0] != n) or (b.ndim > 1 and b.shape[-2] != n):
        raise ValueError(
            f"structmat.linalg.solve({op.name}): b must have shape ({n},) or (..., {n}, k), got {tuple(b.shape)}"
        )
    if b.ndim == 1:
        return _solve(op, b[:, None], method)[:, 0]
    moved = b.movedim(-2, 0)
    X = _solve(op, moved.reshape(n, -1), method)
    return X.reshape(moved.shape).movedim(0, -2)


def inv(op: LinearOperator, *, method: str = "auto") -> LinearOperator:
    """The inverse of ``op`` as an operator of matching structure (a Kronecker's inverse is a Kronecker, ...).

    The result holds computed values (a snapshot; it does not track gradients). The dense fallback returns a
    ``Dense``.

    Raises:
        ValueError: a non-square operator, a stack of heads, or a singular operator.

    Example:
        >>> import torch, structmat as sm
        >>> from structmat import linalg
        >>> K = sm.kron(sm.Diagonal.from_tensor(torch.tensor([2.0, 4.0])), sm.Permutation([1, 2, 0]))
        >>> type(linalg.inv(K)).__name__, linalg.plan(K, "inv").flops
        ('Kronecker', 2)
    """
    _check("inv", op)
    _check_method("inv", method)
    return _inv(op, method)


def logdet(op: LinearOperator, *, method: str = "auto") -> SignLogDet:
    """``(sign, logabsdet)`` of ``det(op)``, as ``torch.linalg.slogdet`` (sign 0 and ``-inf`` when singular).

    Raises:
        ValueError: a non-square operator or a stack of heads.

    Example:
        >>> import torch, structmat as sm
        >>> from structmat import linalg
        >>> sign, la = linalg.logdet(3.0 * sm.Permutation([1, 0]))
        >>> sign.item(), round(la.exp().item(), 6)
        (-1.0, 9.0)
    """
    _check("logdet", op)
    _check_method("logdet", method)
    return _logdet(op, method)


def eigvals(op: LinearOperator, *, method: str = "auto") -> torch.Tensor:
    """The ``n`` eigenvalues of ``op`` (complex, in no particular order, as ``torch.linalg.eigvals``).

    Raises:
        ValueError: a non-square operator or a stack of heads.

    Example:
        >>> import structmat as sm
        >>> from structmat import linalg
        >>> linalg.eigvals(2.0 * sm.Identity(2)).tolist()
        [(2+0j), (2+0j)]
    """
    _check("eigvals", op)
    _check_method("eigvals", method)
    return _eigvals(op, method)


def svdvals(op: LinearOperator, *, method: str = "auto") -> torch.Tensor:
    """The singular values of ``op``, real and in descending order (as ``torch.linalg.svdvals``).

    Raises:
        ValueError: a stack of heads.

    Example:
        >>> import torch, structmat as sm
        >>> from structmat import linalg
        >>> linalg.svdvals(sm.Diagonal.from_tensor(torch.tensor([1.0, -3.0]))).tolist()
        [3.0, 1.0]
    """
    _check("svdvals", op, square=False)
    _check_method("svdvals", method)
    return torch.sort(_svdvals(op, method), descending=True).values
