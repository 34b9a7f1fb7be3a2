"""``project``: the operator of a given structure nearest to a dense matrix in Frobenius norm.

``project(A, like=op)`` returns a new operator with ``op``'s structure (same class, shapes, ranks, dtype, device)
whose matrix ``P`` makes ``||P - A||_F`` as small as the method for that structure can:

==========================  ==================================================================================
structure                   method
==========================  ==================================================================================
``Dense``                   ``A`` itself.
``Diagonal``                the diagonal of ``A``.
``LowRank`` (rank r)        truncated SVD (Eckart–Young): optimal. The singular values are split evenly,
                            ``U = U_r sqrt(S_r)``, ``V = sqrt(S_r) V_r^T``.
2-core ``BTT``               ``W[(c,d),(a,b)] = sum_s L[c,d,a,s] R[a,c,b,s]``: every ``(a, c)`` block ``W[(c,:),(a,:)]``
                            of shape ``(d, b)`` is an independent matrix of rank <= s, so each block is its own
                            truncated SVD (optimal), singular values split evenly between the two cores.
``Monarch``                 ``W[(t,l),(a,b)] = sum_j L[l,t,r(a,j)] R[a,j,b]`` over the ``j`` with
                            ``(a q + j) mod k = l`` (``r = (a q + j) div k``): each pair ``(a, j)`` feeds exactly
                            one ``(l, a)`` block ``W[(:,l),(a,:)]`` of shape ``(m/k, n/k)``, so every block is an
                            independent matrix of rank <= its number of pairs, fitted by its truncated SVD
                            (optimal).
``Kronecker``               Van Loan–Pitsianis: ``A`` rearranged so that ``X_1 ⊗ ... ⊗ X_K`` becomes the rank-1
                            tensor ``vec X_1 ∘ ... ∘ vec X_K``. Two parts: the top singular pair (optimal). More
                            parts: the top singular pair taken greedily, one part at a time (exact on members),
                            then alternating least squares over the parts (the best rank-1 approximation of a
                            tensor of order >= 3 has no closed form). A part that is not ``Dense`` gets the
                            unconstrained least-squares optimum projected onto its own structure, in the same
                            alternation; this is optimal for that part given the others, so no sweep increases
                            the error. (A stacked part next to an unstacked one, shared by every head, goes to
                            the gradient fallback.)
``BlockDiagonal``           each diagonal block of ``A`` projected onto its block's structure (optimal when every
                            block's projection is); what lies off the diagonal blocks cannot be fitted.
``Scaled`` (``c * B``)      ``A / c`` projected onto ``B``.
``Transpose`` (``B.T``)     ``A.T`` projected onto ``B``.
multi-level (``.levels``)   block coordinate descent over the levels (``MultiLevelLowRank``): each level in turn
                            is projected onto ``A`` minus the other levels, until a sweep improves the squared
                            error by less than ``tol`` (relative) or ``iters`` sweeps are done. Every step is
                            an exact projection, so the error never increases; it ends at a stationary point,
                            not always the global optimum. It runs from two starts, ``op``'s own parameters and
                            the greedy coarse-to-fine fit (level 0 to ``A``, level 1 to what is left, ...), and
                            keeps the better.
anything else               gradient descent on ``||P - A||_F^2`` (``Sum``, ``Product``, ``TensorTrain``,
                            ``TensorNetwork``, N-core ``BTT`` ...): a copy of ``op`` starts from ``op``'s own
                            parameters and runs L-BFGS (default) or Adam for ``steps`` iterations; the best
                            iterate seen is returned, so it is never worse than ``op``.
==========================  ==================================================================================

The families above are examples: each family's closed form lives next to it, as its ``_project`` method (see
:mod:`structmat.core.family`), and its class attribute ``projection`` names its rule (``"closed form"``, ``"parts"``,
``"levels"``, ``"fixed"`` or the explicit ``"gradient"`` fallback). The gradient fallback is never silent: it logs on
the ``"structmat"`` logger (``logging.getLogger("structmat")``) at INFO, with the reason (the family has no closed
form, the closed form does not cover this instance, the parts share parameters), and at WARNING when the operator's
class declares no ``projection`` rule at all.

Composites recurse: the blocks of a ``BlockDiagonal``, the parts of a ``Kronecker``, the inner operator of ``Scaled``
and ``Transpose`` and the levels of a multi-level operator each use their own method. A composite whose parts share
a parameter (``block_diag(D, D)``) is fitted by gradient descent as a whole, since fitting the parts one at a time
would overwrite one with another.

For a stack of H heads, ``A`` is ``(H, m, n)`` and each head is projected onto its own operator.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
from dataclasses import dataclass
from typing import Literal

import torch

from .checks import check_int
from .combinators import BlockDiagonal, Kronecker, Scaled, Transpose
from .core.base import LinearOperator
from .core.family import truncated_svd as _truncated_svd
from .operators.dense import Dense

__all__ = ["project"]

logger = logging.getLogger("structmat")

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class _Options:
    iters: int
    tol: float
    steps: int
    lr: float | None
    optimizer: str


def project(
    A: torch.Tensor,
    like: LinearOperator,
    *,
    iters: int = 300,
    tol: float = 1e-12,
    steps: int = 500,
    lr: float | None = None,
    optimizer: Literal["lbfgs", "adam"] = "lbfgs",
) -> LinearOperator:
    """The operator with ``like``'s structure whose matrix is nearest to ``A`` in Frobenius norm.

    See the module documentation for the method used for each structure: a closed form (``Dense``, ``Diagonal``,
    ``LowRank``, 2-core ``BTT``, ``Monarch``, 2-part ``Kronecker`` of ``Dense``, and ``BlockDiagonal``/``Scaled``/
    ``Transpose`` of those), alternating exact projections (``Kronecker`` of more or structured parts, multi-level
    operators such as ``MultiLevelLowRank``), or gradient descent from ``like``'s parameters (anything else; logged on
    the ``"structmat"`` logger).

    Args:
        A: the target, ``(m, n)`` for an operator of shape ``(m, n)``, ``(H, m, n)`` for a stack of H heads (head h
            is projected onto ``A[h]``); same dtype and device as ``like``'s parameters.
        like: the operator whose structure the result takes. It is not modified.
        iters: most sweeps of the alternating methods (multi-level levels, Kronecker parts).
        tol: the alternating methods stop when a sweep lowers the squared error by less than ``tol`` times it.
        steps: iterations of the gradient fallback.
        lr: learning rate of the gradient fallback (default 1.0 for L-BFGS, 1e-2 for Adam); the loss is
            ``||P - A||_F^2 / ||A||_F^2``.
        optimizer: ``"lbfgs"`` (strong-Wolfe line search) or ``"adam"``, for the gradient fallback.

    Returns:
        A new operator of ``like``'s class and structure (a deep copy with new parameter values), on ``like``'s dtype
        and device. The gradient fallback and the alternating methods never return a worse fit than ``like``'s own
        parameters.

    Raises:
        TypeError: ``A`` is not a floating tensor of ``like``'s dtype, ``like`` is not a ``LinearOperator``, or an
            option has the wrong type.
        ValueError: ``A``'s shape does not match ``like``'s shape and heads, ``A`` is not finite or not on ``like``'s
            device, or an option is out of range.

    Example:
        >>> import torch, structmat as sm
        >>> _ = torch.manual_seed(0)
        >>> A = torch.randn(12, 20, dtype=torch.float64)
        >>> op = sm.LowRank(12, 20, rank=3, dtype=torch.float64)
        >>> P = sm.project(A, like=op)
        >>> type(P).__name__, P.shape, P is op
        ('LowRank', (12, 20), False)
        >>> eckart_young = torch.linalg.svdvals(A)[3:].norm()
        >>> bool(torch.isclose(torch.linalg.norm(P.dense() - A), eckart_young))
        True
    """
    opts = _check_options(iters, tol, steps, lr, optimizer)
    _check_target(A, like)
    out = copy.deepcopy(like)
    with torch.no_grad():
        _fit(out, A.detach(), opts)
    return out


# -- checks ------------------------------------------------------------------------------------------------------------
def _check_options(iters: object, tol: object, steps: object, lr: object, optimizer: object) -> _Options:
    for what, v, least in (("iters", iters, 1), ("steps", steps, 0)):
        check_int("project", what, v, least)
    for what, v in (("tol", tol), ("lr", lr)):
        if v is None and what == "lr":
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"project: {what} must be a real number, got {type(v).__name__} {v!r}")
        if not math.isfinite(float(v)) or v < 0 or (what == "lr" and v == 0):
            raise ValueError(f"project: {what} must be {'> 0' if what == 'lr' else '>= 0'} and finite, got {v}")
    if optimizer not in ("lbfgs", "adam"):
        raise ValueError(f"project: optimizer must be one of 'lbfgs', 'adam', got {optimizer!r}")
    rate = None if lr is None else float(lr)  # type: ignore[arg-type]
    return _Options(int(iters), float(tol), int(steps), rate, str(optimizer))  # type: ignore[arg-type]


def _check_target(A: object, like: object) -> None:
    if not isinstance(like, LinearOperator):
        raise TypeError(f"project: like must be a structmat LinearOperator, got {type(like).__name__}")
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"project(like={like.name}): A must be a torch.Tensor, got {type(A).__name__}")
    m, n = like.shape
    heads = like.heads
    want = (m, n) if heads is None else (heads, m, n)
    got = tuple(A.shape)
    if got != want:
        if heads is None and A.ndim == 3 and got[1:] == (m, n):
            raise ValueError(
                f"project(like={like.name}): like is a single operator (no heads) but A has a head axis: "
                f"A must have shape (m, n)={want}, got {got}"
            )
        if heads is not None and got[-2:] == (m, n):
            raise ValueError(
                f"project(like={like.name}): like is a stack of heads={heads}, so A must have shape "
                f"(heads, m, n)={want}, got {got}"
            )
        shape = "(m, n)" if heads is None else "(heads, m, n)"
        raise ValueError(f"project(like={like.name}): A must have shape {shape}={want}, got {got}")
    if not (A.is_floating_point() or A.is_complex()):
        raise TypeError(f"project(like={like.name}): A must be a floating-point tensor, got {A.dtype}")
    if like.dtype is not None and A.dtype != like.dtype:
        raise TypeError(f"project(like={like.name}): A has dtype {A.dtype} but like's parameters are {like.dtype}")
    if like.dtype is not None and A.device != like.device:
        raise ValueError(f"project(like={like.name}): A is on {A.device} but like's parameters are on {like.device}")
    if A.device.type == "meta":
        raise ValueError(f"project(like={like.name}): A is on the meta device and has no values to fit")
    if not bool(torch.isfinite(A).all()):
        raise ValueError(f"project(like={like.name}): A has non-finite entries (inf or nan)")


# -- dispatch ----------------------------------------------------------------------------------------------------------
def _fit(op: LinearOperator, A: torch.Tensor, opts: _Options) -> None:
    """Set ``op``'s parameters, in place, to (nearly) minimize ``||op.dense() - A||_F``. ``A`` is ``op``-shaped.

    Dispatch on the family: its own closed form (``_project``, defined next to the family), the composites' rules
    (parts, levels), and otherwise the gradient fallback, which is logged (see :func:`_fit_gradient`)."""
    if not list(op.parameters()):
        return  # a parameter-free operator (Identity, Permutation) is the only member of its structure
    closed_form = getattr(op, "_project", None)
    if closed_form is not None and closed_form(A):
        return
    if isinstance(op, Scaled):
        if op.scale != 0.0:  # c = 0: every parameter value gives the zero matrix
            _fit(op.op, A / op.scale, opts)
    elif isinstance(op, Transpose):
        _fit(op.op, A.mT, opts)
    elif _shares_parameters(op):
        _fit_gradient(op, A, opts, "its parts share parameters, so they cannot be fitted one at a time")
    elif isinstance(op, BlockDiagonal):
        _fit_block_diagonal(op, A, opts)
    elif isinstance(op, Kronecker) and len({p.heads for p in op.parts}) == 1:
        _fit_kronecker(op, A, opts)
    elif _levels(op, A) is not None:
        _fit_levels(op, A, opts)
    else:
        _fit_gradient(op, A, opts, _why_no_closed_form(op))


def _why_no_closed_form(op: LinearOperator) -> str | None:
    """Why ``op`` goes to the gradient fallback, or None when its class declares no projection rule at all."""
    rule = getattr(type(op), "projection", None)
    if rule is None:
        return None
    if rule == "closed form":
        return "its closed form does not cover this instance"
    if rule == "gradient":
        return "its family has no closed form"
    return f"its projection rule {rule!r} does not apply to it"


def _shares_parameters(op: LinearOperator) -> bool:
    return len(list(op.named_parameters(remove_duplicate=False))) != len(list(op.parameters()))


def _dense(op: LinearOperator, A: torch.Tensor) -> torch.Tensor:
    """``op``'s matrix in ``A``'s dtype (a parameter-free part such as ``Identity`` has none of its own)."""
    return op.dense(dtype=A.dtype if op.dtype is None else None)


def _error2(op: LinearOperator, A: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(_dense(op, A) - A) ** 2)


def _snapshot(op: LinearOperator) -> list[torch.Tensor]:
    return [p.detach().clone() for p in op.parameters()]


def _restore(op: LinearOperator, snap: list[torch.Tensor]) -> None:
    for p, s in zip(op.parameters(), snap):
        p.copy_(s)


# -- composites --------------------------------------------------------------------------------------------------------
def _fit_block_diagonal(op: BlockDiagonal, A: torch.Tensor, opts: _Options) -> None:
    blocks = list(op.blocks)
    if len(blocks) == 1 and blocks[0].heads is not None:  # a stack whose operators are the equal diagonal blocks
        inner = blocks[0]
        mb, nb = inner.shape
        per = inner.heads // (op.heads or 1)
        tiles = A.reshape(*A.shape[:-2], per, mb, per, nb).diagonal(dim1=-4, dim2=-2).movedim(-1, -3)
        _fit(inner, tiles.reshape(inner.heads, mb, nb), opts)  # head k's block j is stacked operator k*per + j
        return
    i = o = 0
    for block in blocks:
        mb, nb = block.shape
        _fit(block, A[..., o : o + mb, i : i + nb], opts)
        o += mb
        i += nb


def _fit_kronecker(op: Kronecker, A: torch.Tensor, opts: _Options) -> None:
    """Van Loan–Pitsianis, then alternating least squares over the parts (each projected onto its structure)."""
    parts = list(op.parts)
    K = len(parts)
    if K == 1:
        _fit(parts[0], A, opts)
        return
    lead = A.shape[:-2]
    nl = len(lead)
    ms = [p.shape[0] for p in parts]
    ns = [p.shape[1] for p in parts]
    # T[..., (m_1 n_1), ..., (m_K n_K)]: the Kronecker product becomes the outer product of the vec(X_k)
    T = A.reshape(*lead, *ms, *ns)
    T = T.permute(*range(nl), *(nl + j for k in range(K) for j in (k, K + k)))
    T = T.reshape(*lead, *(m * n for m, n in zip(ms, ns)))

    start = _snapshot(op)
    start_err = _error2(op, A)
    # greedy Van Loan–Pitsianis: peel off one part at a time by the top singular pair (exact for K = 2)
    rest = T
    for k, part in enumerate(parts[:-1]):
        L, R = _truncated_svd(rest.reshape(*lead, rest.shape[nl], -1), 1)
        _fit(part, L[..., 0].reshape(*lead, ms[k], ns[k]), opts)
        rest = R[..., 0, :].reshape(*lead, *T.shape[nl + k + 1 :])
    _fit(parts[-1], rest.reshape(*lead, ms[-1], ns[-1]), opts)
    err = _error2(op, A)
    if err > start_err:  # structured parts: the projected greedy start can be worse than like's own parameters
        _restore(op, start)
        err = start_err
    if K == 2 and all(isinstance(p, Dense) for p in parts):
        return  # the rank-1 SVD of the rearrangement is already optimal

    letters = _LETTERS[:K]
    for _ in range(opts.iters):
        best = _snapshot(op)
        for k, part in enumerate(parts):
            xs = [_dense(p, A).reshape(*lead, -1) for p in parts]
            others = [j for j in range(K) if j != k]
            norm2 = math.prod(x.square().sum(-1) for j, x in enumerate(xs) if j != k)
            if bool((norm2 == 0).any()):
                continue
            eq = f"...{letters}," + ",".join(f"...{letters[j]}" for j in others) + f"->...{letters[k]}"
            xk = torch.einsum(eq, T, *(xs[j] for j in others)) / norm2.unsqueeze(-1)
            _fit(part, xk.reshape(*lead, ms[k], ns[k]), opts)
        new = _error2(op, A)
        if new > err:  # only by rounding: each step is optimal for its part given the others
            _restore(op, best)
            break
        done = err - new <= opts.tol * err
        err = new
        if done:
            break


def _levels(op: LinearOperator, A: torch.Tensor) -> list[LinearOperator] | None:
    """The levels of a multi-level operator (``op == sum(op.levels)``), or None when ``op`` is not one."""
    levels = getattr(op, "levels", None)
    if not isinstance(levels, torch.nn.ModuleList) or len(levels) == 0:
        return None
    if not all(isinstance(lv, LinearOperator) and lv.shape == op.shape for lv in levels):
        return None
    full = _dense(op, A)
    total = sum(_dense(lv, A) for lv in levels)
    if total.shape != full.shape:  # e.g. single levels under a stacked operator
        return None
    scale = float(full.abs().max()) + float(total.abs().max())
    if not torch.allclose(total, full, rtol=0.0, atol=1e-6 * max(scale, 1e-30)):
        return None
    return list(levels)


def _fit_levels(op: LinearOperator, A: torch.Tensor, opts: _Options) -> None:
    """Block coordinate descent over the levels, from two starts; the better result is kept.

    The starts are ``op``'s own parameters, and the greedy coarse-to-fine start (the first sweep fits each level to
    ``A`` minus the levels already fitted, as if the later ones were zero). BCD is a local method: each start ends at
    a stationary point, and the two starts stall in different places often enough to be worth the second run.
    """
    levels = _levels(op, A) or []  # the dispatch only sends operators whose levels were found
    own = _snapshot(op)
    greedy_err = _bcd(levels, A, [torch.zeros_like(A) for _ in levels], math.inf, opts)
    greedy = _snapshot(op)
    _restore(op, own)
    parts = [_dense(lv, A) for lv in levels]
    own_err = _bcd(levels, A, parts, _norm2(sum(parts) - A), opts)
    if greedy_err < own_err:
        _restore(op, greedy)


def _bcd(levels: list[LinearOperator], A: torch.Tensor, parts: list[torch.Tensor], err: float, opts: _Options) -> float:
    """Sweeps of ``level_k <- projection of (A - sum of the other levels)``; ``parts`` are the levels' matrices as the
    first sweep sees them and ``err`` the squared error there. Returns the final squared error; no sweep raises it."""
    total = sum(parts)
    for _ in range(opts.iters):
        best = [_snapshot(lv) for lv in levels]
        for k, level in enumerate(levels):
            _fit(level, A - (total - parts[k]), opts)
            new_part = _dense(level, A)
            total = total - parts[k] + new_part
            parts[k] = new_part
        total = sum(parts)  # against drift of the running sum
        new = _norm2(total - A)
        if new > err:  # only by rounding: each step is an exact projection
            for lv, snap in zip(levels, best):
                _restore(lv, snap)
            break
        done = math.isfinite(err) and err - new <= opts.tol * err
        err = new
        if done:
            break
    return err


def _norm2(X: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(X) ** 2)


# -- gradient fallback -------------------------------------------------------------------------------------------------
def _fit_gradient(op: LinearOperator, A: torch.Tensor, opts: _Options, why: str | None) -> None:
    """Minimize ``||op.dense() - A||^2 / ||A||^2`` from ``op``'s parameters; keep the best iterate seen.

    Never silent: logs on the ``"structmat"`` logger at INFO ``why`` the operator has no closed form, or at WARNING
    when its class declares no ``projection`` rule at all (a family that forgot to say how it is projected)."""
    params = list(op.parameters())
    if not params:
        return
    method = f"{opts.optimizer}, {opts.steps} steps"
    if why is None:
        logger.warning(
            "project: %s declares no projection rule (class attribute 'projection'); fitting it by the gradient "
            "fallback (%s)",
            op.name,
            method,
        )
    else:
        logger.info("project: %s uses the gradient fallback (%s): %s", op.name, method, why)
    if opts.steps == 0:
        return
    flags = [p.requires_grad for p in params]
    norm2 = float(torch.linalg.vector_norm(A) ** 2) or 1.0
    best: list = [math.inf, None]

    def loss() -> torch.Tensor:
        value = torch.linalg.vector_norm(op.dense() - A) ** 2 / norm2
        if float(value.detach()) < best[0]:
            best[0], best[1] = float(value.detach()), _snapshot(op)
        return value

    try:
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            if opts.optimizer == "adam":
                adam = torch.optim.Adam(params, lr=opts.lr or 1e-2)
                for _ in range(opts.steps):
                    adam.zero_grad()
                    loss().backward()
                    adam.step()
                loss()
            else:
                lbfgs = torch.optim.LBFGS(
                    params,
                    lr=opts.lr or 1.0,
                    max_iter=opts.steps,
                    max_eval=2 * opts.steps,
                    history_size=50,
                    tolerance_grad=1e-14,
                    tolerance_change=1e-20,
                    line_search_fn="strong_wolfe",
                )

                def closure() -> torch.Tensor:
                    lbfgs.zero_grad()
                    value = loss()
                    value.backward()
                    return value

                lbfgs.step(closure)
                loss()
    finally:
        for p, flag in zip(params, flags):
            p.grad = None
            p.requires_grad_(flag)
    if best[1] is not None:
        _restore(op, best[1])
