"""``TensorNetwork``: any structure in one line, from an einsum-like spec such as ``"y[o] = U[o,r] V[r,i] x[i]"``."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, ClassVar, final

import torch

from ..checks import check_int
from ..core.base import LinearOperator
from ..core.family import check_heads, define_network
from ..core.nodes import NetNode, Node

__all__ = ["TensorNetwork"]

_TERM = re.compile(r"\s*([A-Za-z_]\w*)\s*\[([^\[\]]*)\]\s*")
_NAME = re.compile(r"[A-Za-z_]\w*\Z")


def _parse(spec: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """``"y[a,b] = F[a,c] x[c,b]"`` -> (output labels, [(name, labels), ...]), checked for form only."""
    where = f"TensorNetwork({spec!r})"
    lhs, sep, rhs = spec.partition("=")
    if not sep:
        raise ValueError(f"{where}: expected the form 'y[out labels] = F[labels] ... x[in labels]', found no '='")
    match = _TERM.fullmatch(lhs)
    if match is None or match.group(1) != "y":
        raise ValueError(f"{where}: the left side must be y[labels], got {lhs.strip()!r}")
    out = _labels(where, "y", match.group(2))
    terms = []
    pos = 0
    offset = len(lhs) + 1
    while pos < len(rhs):
        match = _TERM.match(rhs, pos)
        if match is None:
            if not rhs[pos:].strip():
                break
            raise ValueError(
                f"{where}: expected a term like F[a,b] at position {offset + pos}, found {rhs[pos : pos + 12]!r}"
            )
        terms.append((match.group(1), _labels(where, match.group(1), match.group(2))))
        pos = match.end()
    names = [name for name, _ in terms]
    if names.count("x") != 1:
        raise ValueError(
            f"{where}: the right side must hold the input x[labels] exactly once, found {names.count('x')}"
        )
    for name in names:
        if name == "y":
            raise ValueError(f"{where}: y is the output and cannot be a factor")
        if names.count(name) > 1:
            raise ValueError(f"{where}: factor {name!r} appears twice; give each factor its own name")
        if name.startswith("_"):
            raise ValueError(f"{where}: {name!r} cannot be a factor name (it starts with '_')")
    return out, terms


def _mapping(where: str, what: str, meaning: str, value: object) -> dict:
    """``value`` (None: empty) as a dict; anything but a mapping is a TypeError naming its type (and a tensor's
    shape: never its values)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        shape = f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else ""
        raise TypeError(f"{where}: {what} must be a mapping of {meaning}, got {type(value).__name__}{shape}")
    return dict(value)


def _labels(where: str, term: str, text: str) -> list[str]:
    labs = [s.strip() for s in text.split(",")] if text.strip() else []
    for lab in labs:
        if not _NAME.match(lab):
            raise ValueError(f"{where}: bad label {lab!r} in {term}[{text}]; labels are identifiers")
    for lab in labs:
        if labs.count(lab) > 1:
            raise ValueError(f"{where}: label {lab!r} appears twice in {term}[{text}]")
    return labs


@final
class TensorNetwork(LinearOperator):
    """A linear operator defined by an einsum-like spec: ``y[out] = F1[...] F2[...] ... x[in]``.

    ``x``'s labels split the input dim row-major (``n`` is the product of their sizes), ``y``'s split the output dim;
    every other label is summed. A label in both ``x`` and ``y`` is a diagonal (block) mode. Sizes come from
    ``sizes`` and from the shapes of the given ``factors``; factors not given are created as parameters with the
    spectral µP initialization for their fans in the network.

    Args:
        spec: e.g. ``"y[o] = U[o,r] V[r,i] x[i]"`` (a low-rank map).
        sizes: size of each label not fixed by a given factor.
        factors: tensors for some or all factors, by name (registered as parameters, not copied); with ``heads``
            each has a leading axis of size H.
        heads: a stack of this many independent operators of this structure, or None for one.
        dtype: dtype of created factors.
        device: device of created factors.

    Example:
        >>> import torch, structmat as sm
        >>> A = sm.TensorNetwork("y[o] = U[o,r] V[r,i] x[i]", sizes=dict(o=5, r=2, i=7))
        >>> A.shape, A.rank(), A.num_params
        ((5, 7), Rank(bound=2, exact=True), 24)
        >>> B = sm.TensorNetwork("y[b,o] = W[b,o,i] x[b,i]", factors=dict(W=torch.randn(3, 2, 4)))
        >>> B.shape, B.rank().bound  # block-diagonal: 3 blocks of (2, 4)
        ((6, 12), 6)
    """

    def __init__(
        self,
        spec: str,
        sizes: Mapping[str, int] | None = None,
        factors: Mapping[str, torch.Tensor] | None = None,
        *,
        heads: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(spec, str):
            raise TypeError(f"TensorNetwork: spec must be a str, got {type(spec).__name__}")
        where = f"TensorNetwork({spec!r})"
        out, terms = _parse(spec)
        sizes = _mapping(where, "sizes", "label sizes, e.g. dict(o=5, r=2, i=7)", sizes)
        factors = _mapping(where, "factors", "tensors by factor name", factors)
        heads = check_heads(where, heads)
        names = [name for name, _ in terms if name != "x"]
        for name in factors:
            if name not in names:
                raise ValueError(f"{where}: factor {name!r} is given but the spec has only {names}")
        used = set(out) | {lab for _, labs in terms for lab in labs}
        for lab, s in sizes.items():
            if lab not in used:
                raise ValueError(f"{where}: unknown label {lab!r} in sizes; the spec's labels are {sorted(used)}")
            check_int(where, f"size of label {lab!r}", s)
        known: dict[str, tuple[int, str]] = {lab: (int(s), "sizes") for lab, s in sizes.items()}
        for name, labs in terms:
            if name not in factors:
                continue
            t = factors[name]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where}: factor {name!r} must be a torch.Tensor, got {type(t).__name__}")
            lead = 0 if heads is None else 1
            if t.ndim != len(labs) + lead:
                raise ValueError(
                    f"{where}: factor {name!r} has labels [{','.join(labs)}]"
                    f"{' and a head axis' if lead else ''} but a tensor of shape {tuple(t.shape)}"
                )
            for axis, (lab, s) in enumerate(zip(labs, t.shape[lead:]), start=lead):
                if s < 1:
                    raise ValueError(f"{where}: size of label {lab!r} ({name} axis {axis}) must be >= 1, got {s}")
                if lab in known and known[lab][0] != s:
                    size, source = known[lab]
                    raise ValueError(
                        f"{where}: label {lab!r} has two sizes: {size} ({source}) and {s} ({name} axis {axis})"
                    )
                known.setdefault(lab, (int(s), f"{name} axis {axis}"))
        missing = sorted(used - set(known))
        if missing:
            raise ValueError(f"{where}: no size for label(s) {missing}; pass them in sizes")
        reachable = {lab for name, labs in terms for lab in labs}
        for lab in out:
            if lab not in reachable:
                raise ValueError(f"{where}: output label {lab!r} appears in no factor and not in x")
        x_labels = dict(terms)["x"]
        in_factors = {lab for name, labs in terms if name != "x" for lab in labs}
        for lab in x_labels:
            if lab not in in_factors and lab not in out:
                raise ValueError(
                    f"{where}: input label {lab!r} appears in no factor and not in y (a bare sum over x is not "
                    "closed under transpose); add a factor that carries it"
                )
        dtypes = {t.dtype for t in factors.values()}
        devices = {t.device for t in factors.values()}
        if len(dtypes) > 1:
            raise TypeError(f"{where}: the given factors have different dtypes {sorted(map(str, dtypes))}")
        if len(devices) > 1:
            raise ValueError(f"{where}: the given factors are on different devices {sorted(map(str, devices))}")
        if dtype is not None and dtypes and dtype not in dtypes:
            raise TypeError(f"{where}: the given factors have dtype {dtypes.pop()} but dtype={dtype} was asked")
        super().__init__((math.prod(known[lab][0] for lab in out), math.prod(known[lab][0] for lab in x_labels)), heads)
        taken = set(dir(self)) | {"spec"}  # dir() lists properties without running them
        for name in names:
            if name in taken:
                raise ValueError(f"{where}: {name!r} cannot be a factor name (the operator has that attribute)")
        self.spec = spec
        self._network = define_network(
            self,
            [(name, labs) for name, labs in terms if name != "x"],
            {lab: size for lab, (size, _) in known.items()},
            x_labels,
            out,
            heads=heads,
            dtype=dtype,
            device=device,
            given=factors,
            where=where,
        )

    expr_name: ClassVar[str] = "tensor_network"
    projection: ClassVar[str] = "gradient"

    def _expr_args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The spec and the size of every label, read from the factors' shapes and the network's input and output
        modes."""
        out, terms = _parse(self.spec)
        lead = 0 if self.heads is None else 1
        known: dict[str, int] = {}
        for name, labels in terms:
            if name != "x":
                known.update(zip(labels, getattr(self, name).shape[lead:]))
        network = self._network
        known.update(zip(dict(terms)["x"], (size for _, size in network.in_modes)))
        known.update(zip(out, (size for _, size in network.out_modes)))
        order = [*out, *(lab for _, labels in terms for lab in labels)]
        sizes = {lab: int(known[lab]) for lab in dict.fromkeys(order)}
        return (self.spec,), {"sizes": sizes, "heads": self.heads}

    def _lower(self) -> Node:
        return NetNode(self._network)
