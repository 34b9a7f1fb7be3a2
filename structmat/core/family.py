"""What a family is made of, and the registry of families.

A family is one file in ``structmat/operators/`` holding one :class:`~structmat.LinearOperator` subclass that says
everything about itself:

- its network: the constructor hands a spec to :func:`define_network` (factors registered as parameters, stacked
  when ``heads`` is given, initialized by the spectral µP rule from their fans in the network);
- its expression: the class attribute ``expr_name`` (the name :func:`structmat.parse` calls) and the method
  ``_expr_args(self) -> (args, kwargs)`` (the arguments that rebuild the same structure; :func:`structmat.to_expr`
  writes ``expr_name(*args, **kwargs)``, leaving out keywords whose value is None). ``expr_aliases`` maps further
  names to a class attribute that builds (``{"diagonal": ""}``: the class itself; ``{"permute_axes":
  "from_axes"}``); an operator written under an alias defines ``_expr_name(self)``;
- its projection: the class attribute ``projection`` (one of :data:`PROJECTIONS`) and, for ``"closed form"``, the
  method ``_project(self, A) -> bool`` that sets the parameters, in place, to the nearest member to ``A``
  (``(m, n)``, or ``(H, m, n)`` for a stack) and returns True, or returns False where this instance has no closed
  form (then :func:`structmat.project` falls back to gradient descent and logs that it did).

Defining the class registers it (``LinearOperator.__init_subclass__`` calls :func:`register`): nothing else in the
library names a family.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..checks import check_int
from .network import Factor, Network
from .params import check_float_dtype, spectral_std

__all__ = [
    "define_network",
    "check_heads",
    "register",
    "register_expression",
    "EXPRESSIONS",
    "FAMILIES",
    "PROJECTIONS",
    "truncated_svd",
    "train_expr_args",
]

#: The names an expression may call, each mapped to what builds it (a class, a class method, or a plain function such
#: as ``dict``). Filled by :func:`register` when a class is defined and by :func:`register_expression`.
EXPRESSIONS: dict[str, Callable[..., Any]] = {}

#: Every operator class that declared an ``expr_name``, by that name.
FAMILIES: dict[str, type] = {}

#: The values of a family's ``projection`` attribute and what :func:`structmat.project` does for each:
#: ``"closed form"`` calls the family's ``_project`` (optimal); ``"parts"`` projects each part onto its own structure
#: (composites); ``"levels"`` runs block coordinate descent over the levels; ``"fixed"`` has no parameters (the only
#: member of its structure); ``"gradient"`` is the explicit gradient fallback (L-BFGS or Adam from the operator's own
#: parameters).
PROJECTIONS = ("closed form", "parts", "levels", "fixed", "gradient")


def register(cls: type) -> None:
    """Register ``cls`` under its ``expr_name`` (and ``expr_aliases``) when it declares one in its own body.

    Called by ``LinearOperator.__init_subclass__`` for every subclass; a class without ``expr_name`` in its body is
    left out (it has no expression). Raises ValueError when ``projection`` is not one of :data:`PROJECTIONS` or the
    name is taken by a different class (a class defined again under the same module and name replaces itself).
    """
    body = vars(cls)
    projection = body.get("projection")
    if projection is not None and projection not in PROJECTIONS:
        raise ValueError(f"{cls.__name__}: projection must be one of {PROJECTIONS}, got {projection!r}")
    name = body.get("expr_name")
    if name is None:
        return
    names = {name: ""} | dict(body.get("expr_aliases", {}))
    for key in names:
        old = EXPRESSIONS.get(key)
        owner = getattr(old, "__self__", old)  # a class method's class
        if old is not None and _key(owner) != _key(cls):
            raise ValueError(f"{cls.__name__}: the expression name {key!r} is taken by {old!r}")
    FAMILIES[name] = cls
    for key, attr in names.items():
        EXPRESSIONS[key] = getattr(cls, attr) if attr else cls


def _key(obj: object) -> tuple[str, str]:
    return getattr(obj, "__module__", ""), getattr(obj, "__qualname__", repr(obj))


def register_expression(name: str, fn: Callable[..., Any]) -> None:
    """Let expressions call ``name(...)``, built by ``fn`` (a helper that is not an operator class, e.g. ``dict``)."""
    old = EXPRESSIONS.get(name)
    if old is not None and _key(old) != _key(fn):
        raise ValueError(f"register_expression: the name {name!r} is taken by {old!r}")
    EXPRESSIONS[name] = fn


def train_expr_args(op: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``_expr_args`` of a train family (``BlockTensorTrain``, ``TensorTrain``): ``(m, n)`` and the ranks (one int
    when they are all equal), with the factor splits only when the constructor would not choose the same ones."""
    fin, fout = tuple(op.in_factors), tuple(op.out_factors)
    m, n = op.shape
    ranks: int | list[int] = op.ranks[0] if len(set(op.ranks)) == 1 else list(op.ranks)
    splits: dict[str, Any] = {"in_factors": list(fin), "out_factors": list(fout)}
    try:
        with warnings.catch_warnings():  # a probe: the family's advice about its defaults is not for this call
            warnings.simplefilter("ignore")
            plain = type(op)(m, n, ranks=ranks, heads=op.heads, device="meta")
    except (TypeError, ValueError):  # these ranks need the explicit splits
        plain = None
    if plain is not None and (tuple(plain.in_factors), tuple(plain.out_factors)) == (fin, fout):
        splits = {}
    return (m, n), {"ranks": ranks, **splits, "heads": op.heads}


def truncated_svd(X: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``X (..., p, q) ≈ L R`` with ``L (..., p, r)`` and ``R (..., r, q)``: the best rank-r fit (Eckart–Young), the
    singular values split evenly (``L = U_r sqrt(S_r)``, ``R = sqrt(S_r) V_r^T``), zero-padded past the rank.

    Example:
        >>> import torch
        >>> X = torch.outer(torch.arange(1.0, 4.0), torch.arange(1.0, 3.0))
        >>> L, R = truncated_svd(X, 2)
        >>> L.shape, R.shape, bool(torch.allclose(L @ R, X))
        (torch.Size([3, 2]), torch.Size([2, 2]), True)
    """
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    k = min(r, S.shape[-1])
    root = S[..., :k].sqrt()
    L = U[..., :k] * root.unsqueeze(-2)
    R = Vh[..., :k, :] * root.unsqueeze(-1)
    if k < r:
        L = torch.cat([L, L.new_zeros(*L.shape[:-1], r - k)], dim=-1)
        R = torch.cat([R, R.new_zeros(*R.shape[:-2], r - k, R.shape[-1])], dim=-2)
    return L, R


Init = Callable[[torch.Tensor, int, int], None]


def check_heads(owner: str, heads: object) -> int | None:
    """``heads`` must be None (a single operator) or a positive int (a stack of that many).

    Raises TypeError for a non-int (as every size check does) and ValueError for an int below 1.

    >>> check_heads("Dense(3, 5)", 4), check_heads("Dense(3, 5)", None)
    (4, None)
    """
    return check_int(owner, "heads", heads, optional=True)


def define_network(
    owner: torch.nn.Module,
    factors: Sequence[tuple[str, Sequence[str]]],
    sizes: Mapping[str, int],
    inputs: Sequence[str],
    outputs: Sequence[str],
    *,
    heads: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    given: Mapping[str, torch.Tensor] | None = None,
    init: Mapping[str, Init] | None = None,
    exact_rank: bool = False,
    where: str = "",
) -> Network:
    """Register ``factors`` on ``owner`` and return the network ``y[outputs] = prod(factors) x[inputs]``.

    Args:
        owner: the module that holds the parameters (``getattr(owner, name)``).
        factors: ``(name, labels)`` of each factor.
        sizes: size of every label.
        inputs: labels splitting the input dim, row-major.
        outputs: labels splitting the output dim, row-major.
        heads: stack this many independent copies (a leading axis on every factor), or None.
        dtype: dtype of created parameters.
        device: device of created parameters.
        given: tensors to use for some factors, by name (shape ``(H, *shape)`` for a stack); used without copying.
        init: per-factor initializer ``fn(tensor, fan_in, fan_out)`` replacing the spectral µP normal.
        exact_rank: the family proves that the network's cut bound is the rank for generic parameters (a tree
            network needs no such proof).
        where: the operator's name, for messages.

    Returns:
        The network; its factors fetch the parameters from ``owner`` at apply time.
    """
    given = dict(given or {})
    names = sorted({lab for _, labs in factors for lab in labs} | set(inputs) | set(outputs))
    ids = {lab: k for k, lab in enumerate(names)}
    head = (len(names), heads) if heads is not None else None
    dtypes = {t.dtype for t in given.values()}
    if dtype is None and dtypes:
        dtype = next(iter(dtypes))
    dtype = check_float_dtype(where, dtype)
    if device is None and given:
        device = next(iter(given.values())).device
    uses = {lab: sum(lab in f for _, f in factors) + (lab in inputs) + (lab in outputs) for lab in names}
    fs = []
    for name, labs in factors:
        shape = tuple(int(sizes[lab]) for lab in labs)
        full = ((heads,) if heads is not None else ()) + shape
        if math.prod(full) >= 2**60:  # torch counts storage bytes in int64
            raise ValueError(f"{where}: factor {name!r} of shape {full} has too many elements for one tensor")
        t = given.get(name)
        if t is None:
            t = torch.empty(full, dtype=dtype, device=device)
        elif tuple(t.shape) != full:
            raise ValueError(f"{where}: factor {name!r} must have shape {full}, got {tuple(t.shape)}")
        elif t.dtype != dtype:
            raise TypeError(f"{where}: factor {name!r} has dtype {t.dtype}, expected {dtype}")
        owner.register_parameter(name, t if isinstance(t, torch.nn.Parameter) else torch.nn.Parameter(t))
        # a size-1 label held by this factor alone (an end bond of a train) is dropped from the network: the factor
        # is read through a view without that axis
        kept = [(lab, size) for lab, size in zip(labs, shape) if size != 1 or uses[lab] > 1]
        labels = ((head[0],) if head is not None else ()) + tuple(ids[lab] for lab, _ in kept)
        view = ((heads,) if heads is not None else ()) + tuple(size for _, size in kept)
        fs.append(Factor(owner, name, labels, view))
    network = Network(
        tuple(fs),
        tuple((ids[lab], int(sizes[lab])) for lab in inputs),
        tuple((ids[lab], int(sizes[lab])) for lab in outputs),
        head=head,
        vouched=exact_rank,
    )
    init = dict(init or {})
    with torch.no_grad():
        for (name, _), (fan_in, fan_out) in zip(factors, network.factor_fans()):
            if name in given:
                continue
            param = getattr(owner, name)
            if param.is_meta:  # nothing to initialize (and torch's meta random ops are slow to load)
                continue
            if name in init:
                init[name](param, fan_in, fan_out)
            else:
                param.normal_(0.0, spectral_std(fan_in, fan_out))
    return network
