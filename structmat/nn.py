"""Swap the ``nn.Linear`` layers of an existing model for structmat operators: :func:`replace_linear`.

``replace_linear(model, like)`` finds the ``torch.nn.Linear`` layers of ``model`` that the ``include``/``exclude``
selectors pick, builds an operator for each from ``like`` (a factory ``(m, n) -> LinearOperator`` with ``m`` the
layer's ``out_features`` and ``n`` its ``in_features``, or an expression template such as
``"btt({m}, {n}, ranks=2)"``), starts it from the projection of the trained weight (``init="project"``) or keeps the
operator's own µP initialization (``init="mup"``), and puts a :class:`StructuredLinear` (the operator plus the layer's
bias) in the layer's place. The model is changed in place; the returned :class:`ReplaceReport` says, per layer, what
the parameters and FLOPs were and are, and how far the projection is from the trained weight.

Example:
    >>> import torch, structmat as sm
    >>> from structmat.nn import replace_linear
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10))
    >>> report = replace_linear(model, "lowrank({m}, {n}, rank=8)", include=["0"])
    >>> type(model[0]).__name__, model[0].in_features, model[0].out_features
    ('StructuredLinear', 64, 48)
    >>> row = report.rows[0]
    >>> row.name, row.old_params, row.new_params, row.old_flops, row.new_flops
    ('0', 3120, 944, 6144, 1792)
    >>> model(torch.randn(5, 64)).shape
    torch.Size([5, 10])
"""

from __future__ import annotations

import fnmatch
import math
import string
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .checks import check_int
from .core.base import LinearOperator
from .expr import parse
from .project import project

__all__ = ["replace_linear", "StructuredLinear", "ReplaceReport", "LayerReport"]

#: What ``include``/``exclude`` accept: fnmatch patterns, module types, or a predicate ``(name, module) -> bool``.
Selector = str | Sequence[str] | type | tuple[type, ...] | Callable[[str, torch.nn.Module], bool] | None

_WHERE = "replace_linear"


class StructuredLinear(torch.nn.Module):
    """A structmat operator and a bias in the place of an ``nn.Linear``: ``forward(x) = op(x) + bias``.

    The state dict holds the operator's parameters under ``op.*`` and ``bias`` (no ``weight``); ``op.dense()`` is the
    weight matrix, ``(out_features, in_features)`` as in ``nn.Linear``.

    Args:
        op: the operator, shape ``(out_features, in_features)``, a single operator (no heads).
        bias: the bias, ``(out_features,)``, or None for none. It is copied into a new parameter.

    Example:
        >>> import torch, structmat as sm
        >>> from structmat.nn import StructuredLinear
        >>> layer = StructuredLinear(sm.LowRank(6, 4, rank=2), torch.zeros(6))
        >>> layer.in_features, layer.out_features, sorted(layer.state_dict())
        (4, 6, ['bias', 'op.U', 'op.V'])
        >>> layer(torch.randn(3, 4)).shape
        torch.Size([3, 6])
    """

    def __init__(self, op: LinearOperator, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if not isinstance(op, LinearOperator):
            raise TypeError(f"StructuredLinear: op must be a structmat LinearOperator, got {type(op).__name__}")
        if op.heads is not None:
            raise ValueError(f"StructuredLinear: op must be a single operator, got {op.name} with heads={op.heads}")
        self.op = op
        self.out_features, self.in_features = op.shape
        if bias is None:
            self.register_parameter("bias", None)
            return
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"StructuredLinear: bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (self.out_features,):
            raise ValueError(
                f"StructuredLinear({op.name}): bias must have shape (out_features,)=({self.out_features},), "
                f"got {tuple(bias.shape)}"
            )
        self.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in_features) -> (..., out_features)``: ``op(x) + bias``."""
        y = self.op(x)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@dataclass(frozen=True)
class LayerReport:
    """One replaced layer.

    Attributes:
        name: the layer's qualified name in the model (the first one, for a layer held in several places).
        shape: ``(out_features, in_features)``.
        structure: the new operator's name, e.g. ``"LowRank(48, 64, rank=8)"``.
        old_params: the ``nn.Linear``'s parameter elements (weight and bias).
        new_params: the :class:`StructuredLinear`'s parameter elements (operator and bias).
        old_flops: ``2 * m * n * batch``, the dense product at the report's batch (the bias add, the same before and
            after, is not counted).
        new_flops: ``op.cost(batch).flops``.
        error: ``||W - op.dense()||_F / ||W||_F`` for ``init="project"`` (0 for a zero ``W`` fitted exactly), None
            for ``init="mup"``.
    """

    name: str
    shape: tuple[int, int]
    structure: str
    old_params: int
    new_params: int
    old_flops: int
    new_flops: int
    error: float | None


@dataclass(frozen=True)
class ReplaceReport:
    """What :func:`replace_linear` did: one :class:`LayerReport` per replaced layer, and totals.

    ``str(report)`` is a table with a total line. Iterating gives the rows.

    Attributes:
        rows: the replaced layers, in the order of ``model.named_modules()``.
        batch: the batch the FLOPs are counted at.
        init: ``"project"`` or ``"mup"``.
        error: the relative projection error of all replaced weights together,
            ``sqrt(sum ||W - P||_F^2 / sum ||W||_F^2)``; None for ``init="mup"``.
        model_params_before: every parameter element of the model before the replacement.
        model_params_after: the same after.
    """

    rows: tuple[LayerReport, ...]
    batch: int
    init: str
    error: float | None
    model_params_before: int
    model_params_after: int

    @property
    def old_params(self) -> int:
        """Parameter elements of the replaced layers, before."""
        return sum(r.old_params for r in self.rows)

    @property
    def new_params(self) -> int:
        """Parameter elements of the replacing layers."""
        return sum(r.new_params for r in self.rows)

    @property
    def old_flops(self) -> int:
        """FLOPs of the replaced layers at ``batch``, before."""
        return sum(r.old_flops for r in self.rows)

    @property
    def new_flops(self) -> int:
        """FLOPs of the replacing operators at ``batch``."""
        return sum(r.new_flops for r in self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[LayerReport]:
        return iter(self.rows)

    def __str__(self) -> str:
        head = ("layer", "shape", "structure", "params", "new params", f"FLOPs@{self.batch}", "new FLOPs", "error")
        body = [
            (
                r.name,
                f"{r.shape[0]}x{r.shape[1]}",
                r.structure,
                f"{r.old_params:,}",
                f"{r.new_params:,}",
                f"{r.old_flops:,}",
                f"{r.new_flops:,}",
                "-" if r.error is None else f"{r.error:.3g}",
            )
            for r in self.rows
        ]
        total = (
            f"total ({len(self.rows)})",
            "",
            "",
            f"{self.old_params:,}",
            f"{self.new_params:,}",
            f"{self.old_flops:,}",
            f"{self.new_flops:,}",
            "-" if self.error is None else f"{self.error:.3g}",
        )
        table = [head, *body, total]
        widths = [max(len(row[k]) for row in table) for k in range(len(head))]

        def line(row: tuple[str, ...]) -> str:
            cells = [row[k].ljust(widths[k]) if k < 3 else row[k].rjust(widths[k]) for k in range(len(row))]
            return "  ".join(cells).rstrip()

        rule = "  ".join("-" * w for w in widths)
        ratio_p = self.new_params / self.old_params if self.old_params else float("nan")
        ratio_f = self.new_flops / self.old_flops if self.old_flops else float("nan")
        return "\n".join(
            [
                line(head),
                rule,
                *(line(r) for r in body),
                rule,
                line(total),
                f"replaced layers: params x{ratio_p:.3f}, FLOPs x{ratio_f:.3f}; "
                f"model params {self.model_params_before:,} -> {self.model_params_after:,} (init={self.init!r})",
            ]
        )


def replace_linear(
    model: torch.nn.Module,
    like: str | Callable[[int, int], LinearOperator],
    *,
    include: Selector = None,
    exclude: Selector = None,
    init: Literal["project", "mup"] = "project",
    batch: int = 1,
    rank_budget: int | None = None,
) -> ReplaceReport:
    """Replace the matching ``nn.Linear`` layers of ``model``, in place, by structmat operators plus their biases.

    Each matching layer ``W`` (``out_features = m``, ``in_features = n``) becomes a :class:`StructuredLinear` whose
    operator comes from ``like`` on the layer's dtype and device. With ``init="project"`` the operator is
    ``structmat.project(W, like=op)``, the nearest member of the structure to the trained weight (see
    :func:`structmat.project`: closed forms for ``Dense``, ``LowRank``, 2-core ``BTT``, ``Monarch`` ...; gradient
    descent for the rest); with ``init="mup"`` it keeps the operator's own µP initialization. The bias is copied;
    training mode and a frozen weight (``requires_grad=False``) carry over. A layer held in several places (tied) is
    replaced everywhere by the same new module. ``nn.Linear`` layers inside an ``nn.MultiheadAttention`` are never
    replaced (that module reads its ``out_proj.weight`` directly).

    Use :func:`structmat.mup_param_groups` on the result for the optimizer's µP learning rates. A model built the
    same way (same ``like``, selectors) loads the result's state dict; ``init="mup"`` builds it without projecting.

    Args:
        model: the module whose layers are replaced (not an ``nn.Linear`` itself: wrap it in ``nn.Sequential``).
        like: a factory ``(m, n) -> LinearOperator`` returning a single operator of shape ``(m, n)``, or an
            expression template: ``like.format(m=m, n=n)`` is built by :func:`structmat.parse` (never ``eval``), e.g.
            ``"btt({m}, {n}, ranks=2)"`` or ``"lowrank({m}, {n}, rank=16) + diag({m})"`` when ``m == n``. A literal
            brace is written ``{{`` or ``}}``.
        include: which layers to consider (None: every ``nn.Linear``). A pattern or list of ``fnmatch`` patterns
            matched against the qualified name (``"blocks.*.mlp.*"``; ``*`` crosses dots); a type or tuple of types,
            matched when the layer or a module containing it is an instance (``include=TransformerBlock``); or a
            predicate ``(name, module) -> bool``.
        exclude: the same forms; a layer matching ``exclude`` is skipped even when ``include`` matches it.
        init: ``"project"`` (start from the trained weight) or ``"mup"`` (the operator's own initialization).
        batch: the number of input vectors the report's FLOPs are counted at (e.g. batch times sequence length).
        rank_budget: a rank for every layer, capped at the layer's ``min(m, n)``: a template writes it ``{r}``
            (``"lowrank({m}, {n}, rank={r})"``) and a factory receives it as a third argument ``(m, n, r)``.
            Given, the template must use ``{r}``; a template using ``{r}`` needs it (never silently ignored).

    Returns:
        A :class:`ReplaceReport`: per layer the old and new parameters and FLOPs and the projection error, totals, and
        a readable table as ``str(report)``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or is an ``nn.Linear``; ``like`` is neither a string nor a
            callable (an operator instance is refused: each layer needs its own); a factory returns something that is
            not a ``LinearOperator``; a selector has the wrong type or a predicate does not return a bool.
        ValueError: a template names a field other than ``{m}``/``{n}``/``{r}``, uses ``{r}`` without
            ``rank_budget`` or ``rank_budget`` without ``{r}``, or its text does not parse or build; an
            operator has the wrong shape or heads; ``init`` or ``batch`` is out of range; a matching layer is lazy
            (uninitialized); or no layer matches. No match is an error, not a warning: an empty replacement is almost
            always a pattern typo, and the message lists the layers there are. Nothing is replaced when an error is
            raised.

    Example:
        >>> import torch, structmat as sm
        >>> from structmat.nn import replace_linear
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.GELU(), torch.nn.Linear(20, 7))
        >>> x = torch.randn(4, 12)
        >>> before = model(x)
        >>> report = replace_linear(model, lambda m, n: sm.LowRank(m, n, rank=min(m, n)))  # full rank: exact
        >>> torch.allclose(model(x), before, atol=1e-5), [r.name for r in report]
        (True, ['0', '2'])
        >>> report.old_params, report.new_params
        (407, 600)
        >>> groups = sm.mup_param_groups(model, lr=1e-3, base_width=20)
        >>> opt = torch.optim.AdamW(groups)
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{_WHERE}: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.nn.Linear):
        raise TypeError(
            f"{_WHERE}: model is itself an nn.Linear ({model.out_features}x{model.in_features}); layers are replaced "
            f"inside a model: wrap it, e.g. torch.nn.Sequential(layer)"
        )
    rank_budget = check_int(_WHERE, "rank_budget", rank_budget, optional=True)
    build = _builder(like, rank_budget)
    _check_selector("include", include)
    _check_selector("exclude", exclude)
    if init not in ("project", "mup"):
        raise ValueError(f"{_WHERE}: init must be 'project' or 'mup', got {init!r}")
    batch = check_int(_WHERE, "batch", batch)

    chosen, every = _select(model, include, exclude)
    if not chosen:
        names = ", ".join(every[:8]) + (", ..." if len(every) > 8 else "")
        have = f"its nn.Linear layers are: {names}" if every else "it has no nn.Linear layer"
        raise ValueError(
            f"{_WHERE}: no layer matched include={include!r}, exclude={exclude!r}; {have} "
            f"(names are fnmatch'ed against the qualified names of model.named_modules())"
        )

    before = _count(model)
    # Build and check everything first, so that an error leaves the model untouched.
    new: list[tuple[str, torch.nn.Linear, StructuredLinear, LayerReport, float, float]] = []
    for name, layer in chosen:
        weight = layer.weight
        m, n = layer.out_features, layer.in_features
        op = build(name, m, n, weight.dtype, weight.device)
        w = weight.detach()
        sq_err = sq_norm = 0.0
        error: float | None = None
        if init == "project":
            op = project(w, like=op)
            with torch.no_grad():
                sq_err = float(torch.linalg.norm(op.dense() - w)) ** 2
                sq_norm = float(torch.linalg.norm(w)) ** 2
            error = _ratio(sq_err, sq_norm)
        if not weight.requires_grad:
            op.requires_grad_(False)
        module = StructuredLinear(op, layer.bias)
        module.train(layer.training)
        bias = 0 if layer.bias is None else layer.bias.numel()
        row = LayerReport(
            name=name,
            shape=(m, n),
            structure=op.name,
            old_params=weight.numel() + bias,
            new_params=op.num_params + bias,
            old_flops=2 * m * n * batch,
            new_flops=op.cost(batch).flops,
            error=error,
        )
        new.append((name, layer, module, row, sq_err, sq_norm))

    replacement = {id(layer): module for _, layer, module, _, _, _ in new}
    for parent in list(model.modules()):
        for key, child in list(parent._modules.items()):
            if child is not None and id(child) in replacement:
                parent._modules[key] = replacement[id(child)]

    total_error = None
    if init == "project":
        total_error = _ratio(sum(e for *_, e, _ in new), sum(s for *_, s in new))
    return ReplaceReport(
        rows=tuple(row for _, _, _, row, _, _ in new),
        batch=batch,
        init=init,
        error=total_error,
        model_params_before=before,
        model_params_after=_count(model),
    )


# -- helpers ----------------------------------------------------------------------------------------------------------
def _ratio(sq_err: float, sq_norm: float) -> float:
    if sq_norm > 0:
        return math.sqrt(sq_err / sq_norm)
    return 0.0 if sq_err == 0 else math.inf


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _builder(
    like: object, budget: int | None = None
) -> Callable[[str, int, int, torch.dtype, torch.device], LinearOperator]:
    """``(name, m, n, dtype, device) -> operator`` from ``like`` (with the rank ``min(budget, m, n)`` when a budget is
    given), checking what it returns."""
    if isinstance(like, LinearOperator):
        raise TypeError(
            f"{_WHERE}: like must be a factory (m, n) -> LinearOperator or a template string, got the operator "
            f"{like.name}; every layer needs its own operator: pass e.g. lambda m, n: ... or {like.expr()!r} with "
            f"the sizes written {{m}} and {{n}}"
        )
    if isinstance(like, str):
        template = like
        _format(template, 1, 1, 1)  # unknown fields and bad braces fail before anything is built
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        if budget is not None and "r" not in fields:
            raise ValueError(
                f"{_WHERE}: rank_budget={budget} is given but the template {template!r} has no {{r}} to put it in "
                f"(e.g. 'lowrank({{m}}, {{n}}, rank={{r}})')"
            )
        if budget is None and "r" in fields:
            raise ValueError(f"{_WHERE}: the template {template!r} uses {{r}}: give rank_budget=")

        def from_template(name: str, m: int, n: int, dtype: torch.dtype, device: torch.device) -> LinearOperator:
            text = _format(template, m, n, None if budget is None else min(budget, m, n))
            try:
                op = parse(text, dtype=dtype, device=device)
            except ValueError as e:
                raise ValueError(
                    f"{_WHERE}: the template {template!r} for layer {name!r} ({m}x{n}) reads {text!r}, which does "
                    f"not build: {e}"
                ) from e
            return _check_op(f"the template {template!r}", op, name, m, n)

        return from_template
    if callable(like):
        factory = like

        def from_factory(name: str, m: int, n: int, dtype: torch.dtype, device: torch.device) -> LinearOperator:
            what = f"the factory {getattr(factory, '__name__', type(factory).__name__)}"
            made = factory(m, n) if budget is None else factory(m, n, min(budget, m, n))
            op = _check_op(what, made, name, m, n)
            return op.to(dtype=dtype, device=device) if op.dtype is not None else op

        return from_factory
    raise TypeError(
        f"{_WHERE}: like must be a factory (m, n) -> LinearOperator or an expression template such as "
        f"'btt({{m}}, {{n}}, ranks=2)', got {type(like).__name__} {like!r}"
    )


def _format(template: str, m: int, n: int, r: int | None = None) -> str:
    try:
        return template.format_map({"m": m, "n": n} if r is None else {"m": m, "n": n, "r": r})
    except KeyError as e:
        raise ValueError(
            f"{_WHERE}: the template {template!r} names the field {{{e.args[0]}}}; only {{m}} (out_features), "
            f"{{n}} (in_features) and, with rank_budget, {{r}} are filled in (write a literal brace as {{{{ or }}}})"
        ) from None
    except (IndexError, ValueError) as e:
        raise ValueError(
            f"{_WHERE}: the template {template!r} is not a valid format string ({e}); use {{m}} and {{n}}"
        ) from None


def _check_op(what: str, op: object, name: str, m: int, n: int) -> LinearOperator:
    if not isinstance(op, LinearOperator):
        raise TypeError(
            f"{_WHERE}: {what} must return a structmat LinearOperator for layer {name!r}, got {type(op).__name__}"
        )
    if op.heads is not None:
        raise ValueError(
            f"{_WHERE}: {what} returned {op.name}, a stack of heads={op.heads}, for layer {name!r}; a layer needs "
            f"a single operator"
        )
    if op.shape != (m, n):
        raise ValueError(
            f"{_WHERE}: {what} returned {op.name} of shape {op.shape} for layer {name!r}, which needs shape "
            f"(out_features, in_features)=({m}, {n})"
        )
    return op


def _check_selector(what: str, sel: object) -> None:
    if sel is None or isinstance(sel, str) or _is_types(sel) or callable(sel):
        return
    if isinstance(sel, Sequence) and all(isinstance(p, str) for p in sel):
        return
    raise TypeError(
        f"{_WHERE}: {what} must be None, an fnmatch pattern or a list of them, a module type or a tuple of types, "
        f"or a predicate (name, module) -> bool; got {type(sel).__name__} {sel!r}"
    )


def _is_types(sel: object) -> bool:
    if isinstance(sel, type):
        return True
    return isinstance(sel, tuple) and len(sel) > 0 and all(isinstance(t, type) for t in sel)


def _matches(what: str, sel: Selector, name: str, module: torch.nn.Module, ancestors: list[torch.nn.Module]) -> bool:
    if isinstance(sel, str):
        return fnmatch.fnmatchcase(name, sel)
    if _is_types(sel):
        return any(isinstance(mod, sel) for mod in (module, *ancestors))  # type: ignore[arg-type]
    if callable(sel):
        got = sel(name, module)
        if not isinstance(got, bool):
            raise TypeError(f"{_WHERE}: the {what} predicate must return a bool, got {type(got).__name__} for {name!r}")
        return got
    return any(fnmatch.fnmatchcase(name, p) for p in sel)  # type: ignore[union-attr]


def _select(
    model: torch.nn.Module, include: Selector, exclude: Selector
) -> tuple[list[tuple[str, torch.nn.Linear]], list[str]]:
    """The (name, layer) pairs to replace, and the names of every candidate ``nn.Linear``."""
    chosen: list[tuple[str, torch.nn.Linear]] = []
    every: list[str] = []
    seen: set[int] = set()

    def walk(module: torch.nn.Module, prefix: str, ancestors: list[torch.nn.Module]) -> None:
        if isinstance(module, torch.nn.MultiheadAttention):
            return
        chain = [*ancestors, module]
        for key, child in module._modules.items():
            if child is None:
                continue
            name = f"{prefix}.{key}" if prefix else key
            if isinstance(child, torch.nn.Linear):
                if id(child) in seen:
                    continue
                seen.add(id(child))
                every.append(name)
                keep = include is None or _matches("include", include, name, child, chain)
                if keep and exclude is not None and _matches("exclude", exclude, name, child, chain):
                    keep = False
                if keep and isinstance(child.weight, torch.nn.parameter.UninitializedParameter):
                    raise ValueError(
                        f"{_WHERE}: layer {name!r} is an nn.LazyLinear that is not initialized yet; run a forward "
                        f"pass first"
                    )
                if keep:
                    chosen.append((name, child))
                continue
            walk(child, name, chain)

    walk(model, "", [])
    return chosen, every
