"""Building a family's network: register its factors as parameters (stacked when ``heads`` is given), initialize
them by the spectral µP rule from their fans in the network, and return the :class:`Network`.

Every single-network family (``Dense``, ``LowRank``, ``BlockTensorTrain``, ``Monarch``, ``TensorTrain``,
``TensorNetwork`` …) is a spec handed to :func:`define_network`; nothing else about it is family-specific.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from ._factors import check_optional_int
from ._init import check_float_dtype, spectral_std
from ._network import Factor, Network

__all__ = ["define_network", "check_heads"]

Init = Callable[[torch.Tensor, int, int], None]


def check_heads(owner: str, heads: object) -> int | None:
    """``heads`` must be None (a single operator) or a positive int (a stack of that many).

    Raises TypeError for a non-int (as every size check does) and ValueError for an int below 1.

    >>> check_heads("Dense(3, 5)", 4), check_heads("Dense(3, 5)", None)
    (4, None)
    """
    return check_optional_int(owner, "heads", heads)


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
