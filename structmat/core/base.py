"""The one operator base class. A family says what its tensor network is (``_lower``); the rest is derived here."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.nn.utils import parametrize, prune

from ..checks import check_int
from . import family as _family
from . import freeze as _freeze
from .cost import Cost, Rank
from .nodes import Node

__all__ = ["LinearOperator"]

# one C call that says whether autocast is on for any device type: the common case (off) skips the per-device checks
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast casts ``x`` to, or None when autocast is off for its device type or that device type has
    no autocast at all (``meta``: asking ``torch.is_autocast_enabled("meta")`` would raise)."""
    if not _any_autocast():
        return None
    kind = x.device.type
    if not torch.amp.is_autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


# bumped whenever a hook is registered on an operator: a composite looks for hooks on its operands only then
_hook_epoch = [0]


def _counting_hooks(name: str) -> Any:
    """``torch.nn.Module``'s method ``name`` that also bumps :data:`_hook_epoch`."""
    register = getattr(torch.nn.Module, name)

    @functools.wraps(register)
    def method(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        _hook_epoch[0] += 1
        return register(self, *args, **kwargs)

    method.__doc__ = (
        f"As :meth:`torch.nn.Module.{name}`. The hook runs when this operator is called, never when a composition "
        "holding it is applied (that composition warns)."
    )
    return method


def _ignored_hooks(op: LinearOperator) -> list[str]:
    """Names of the operators nested in ``op`` that have hooks its application skips: forward (pre-)hooks and
    backward hooks. Pruning's pre-hook is not one of them: the factor reads the pruned tensor itself."""
    names = []
    for sub in op.modules():
        if sub is op or not isinstance(sub, LinearOperator):
            continue
        pre = [h for h in sub._forward_pre_hooks.values() if not isinstance(h, prune.BasePruningMethod)]
        if pre or sub._forward_hooks or sub._backward_hooks or sub._backward_pre_hooks:
            names.append(sub.name)
    return names


def _held(owner: torch.nn.Module, name: str) -> torch.Tensor:
    """The tensor that holds a factor's values (for its dtype and device), without computing anything: the
    parameter or buffer; for a pruned one its ``<name>_orig``; else the attribute (a parametrization computes it)."""
    t = owner._parameters.get(name)
    if t is None:
        t = owner._buffers.get(name)
    if t is None:
        t = owner._parameters.get(name + "_orig")
    if t is None and parametrize.is_parametrized(owner, name):  # its original: computing the value costs a call
        t = next(iter(owner.parametrizations[name].parameters()), None)
    if t is None:
        t = getattr(owner, name)
    return t


class LinearOperator(torch.nn.Module):
    """A structured linear map ``A`` of shape ``(m, n)``, applied like ``nn.Linear`` to the last dim.

    Subclasses implement one hook, ``_lower()``, which returns the operator's execution node (a tensor network, or a
    sum/chain of them). Application, ``dense()``, ``rank()``, ``cost()``, transposition and composition all come from
    that node. The structure is fixed at construction; parameter values may change freely.

    Hooks and parametrizations: an operator nested in a composition is not called (its network is fused into the
    composition's einsum), so only what its factors read is honored there:

    - ``torch.nn.utils.parametrize`` (``parametrizations.orthogonal``, ``weight_norm``, ``spectral_norm``, custom
      ones): supported everywhere; every application computes the factor from the current original.
    - ``torch.nn.utils.prune``: supported everywhere; every application multiplies the current ``<name>_orig`` by
      the current ``<name>_mask`` (the ``<name>`` attribute, refreshed only by the pruning pre-hook, is not read).
    - forward hooks, forward pre-hooks and backward hooks (``register_forward_hook`` ...): they run when the operator
      itself is called, never when a composition holding it is applied; that composition warns (``UserWarning``,
      once per composition and hook registration). Register them on the outermost operator instead. The
      pre-``parametrize`` utilities that work by a pre-hook (``torch.nn.utils.weight_norm``, ``spectral_norm``)
      are hooks of this kind: use their ``parametrizations`` versions.

    Example:
        >>> import torch, structmat as sm
        >>> _ = torch.manual_seed(0)
        >>> A = sm.Dense(5, 3) @ sm.Dense(3, 7)
        >>> A.shape
        (5, 7)
        >>> x = torch.randn(2, 7)
        >>> torch.allclose(A(x), x @ A.dense().T, atol=1e-6)
        True
        >>> A.rank().bound, A.cost(batch=4).flops
        (3, 288)
    """

    def __init__(self, shape: tuple[int, int], heads: int | None = None) -> None:
        super().__init__()
        kind = type(self).__name__
        m = check_int(kind, "m (rows)", shape[0])
        n = check_int(kind, "n (columns)", shape[1])
        self._shape = (m, n)
        self._heads = heads
        self._hooks_seen = -1  # the hook epoch at which nested operators were last looked at

    # -- the hook ----------------------------------------------------------------------------------------------------
    def _lower(self) -> Node:
        raise NotImplementedError  # abstract

    def _operands(self) -> tuple[LinearOperator, ...]:
        """The operators this one is built from (for printing); leaves have none."""
        return ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Lower every operator as soon as its constructor returns (structure is fixed from then on), so that
        applying it, traced by torch.compile or not, only reads the cached node; and register the class's expression
        name and projection rule (:func:`structmat.core.family.register`)."""
        super().__init_subclass__(**kwargs)
        _family.register(cls)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def __init__(self: LinearOperator, *args: Any, **kw: Any) -> None:  # noqa: N807
            init(self, *args, **kw)
            if type(self) is cls:
                self._node  # noqa: B018 - lowers and caches

        cls.__init__ = __init__  # type: ignore[method-assign]

    @property
    def _node(self) -> Node:
        node = self.__dict__.get("_lowered")
        if node is None:
            try:
                node = self._lower()
            except ValueError as err:
                raise ValueError(f"{self.name}: {err}") from None
            self.__dict__["_lowered"] = node
        return node

    # -- basic facts -------------------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)``: the operator maps ``(..., n)`` to ``(..., m)``."""
        return self._shape

    @property
    def heads(self) -> int | None:
        """H for a stack of H operators of one structure (one per attention head), None for a single operator."""
        return self._heads

    @property
    def name(self) -> str:
        """Short name for messages, e.g. ``Dense(5, 3)`` or ``LowRank(5, 3, rank=2, heads=4)``."""
        kind, extra = self._describe()
        args = [str(self._shape[0]), str(self._shape[1]), *([extra] if extra else [])]
        if self._heads is not None:
            args.append(f"heads={self._heads}")
        return f"{kind}({', '.join(args)})"

    def _describe(self) -> tuple[str, str]:
        """The name of the kind and its structural arguments beyond the shape, for :attr:`name`."""
        return type(self).__name__, ""

    def _tensors(self) -> Iterable[torch.Tensor]:
        yield from self.parameters()
        yield from self.buffers()

    def _first_tensor(self) -> torch.Tensor | None:
        """One parameter, found through the first factor of the lowered networks (cheaper than walking parameters()
        on every call); every parameter of an operator is a factor of one of its networks."""
        probe = self.__dict__.get("_probe")
        if probe is None:
            factors = [fa for net in self._node.networks() for fa in net.factors]
            probe = self.__dict__["_probe"] = (factors[0].owner, factors[0].name) if factors else ()
        if probe:
            return _held(probe[0], probe[1])
        return next(iter(self._tensors()), None)

    @property
    def dtype(self) -> torch.dtype | None:
        """dtype of the parameters (None for an operator with none, such as ``Identity``)."""
        t = self._first_tensor()
        return t.dtype if t is not None else None

    @property
    def device(self) -> torch.device:
        """Device of the parameters (cpu for an operator with none)."""
        t = self._first_tensor()
        return t.device if t is not None else torch.device("cpu")

    @property
    def num_params(self) -> int:
        """Number of parameter elements; a parameter shared by two places counts once."""
        return sum(p.numel() for p in self.parameters())

    # -- application -------------------------------------------------------------------------------------------------
    def _check_input(self, x: Any, what: str = "input") -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.name}: {what} must be a torch.Tensor, got {type(x).__name__}")
        n = self._shape[1]
        if x.ndim == 0 or x.shape[-1] != n:
            raise ValueError(f"{self.name}: {what} must have shape (..., {n}), got {tuple(x.shape)}")
        t = self._first_tensor()
        if t is None:
            return
        if x.dtype != t.dtype and _autocast_dtype(x) is None:
            raise TypeError(f"{self.name}: {what} has dtype {x.dtype} but the operator's parameters are {t.dtype}")
        if x.device != t.device:
            raise ValueError(f"{self.name}: {what} is on {x.device} but the operator's parameters are on {t.device}")

    def forward(self, x: torch.Tensor, per_head: bool = False) -> torch.Tensor:
        """Apply to the last dim: ``(..., n) -> (..., m)``.

        For a stack of H operators: ``(..., n) -> (..., H, m)`` (every head reads the same input), or with
        ``per_head=True``, ``(..., H, n) -> (..., H, m)`` (head h reads ``x[..., h, :]``).
        """
        if not torch.compiler.is_compiling():  # checks read Python state that torch.compile need not trace
            self._check_input(x)
            if self._hooks_seen != _hook_epoch[0]:
                self._warn_nested_hooks()
        m, n = self._shape
        heads = self._heads
        cast = _autocast_dtype(x)
        if cast is not None and x.is_floating_point():
            x = x.to(cast)
        if per_head:
            if heads is None:
                raise ValueError(f"{self.name}: per_head=True needs a stack of heads; this operator is single")
            if x.ndim < 2 or x.shape[-2] != heads:
                raise ValueError(
                    f"{self.name}: per_head input must have shape (..., {heads}, {n}), got {tuple(x.shape)}"
                )
            lead = x.shape[:-2]
            if x.numel() == 0:
                return x.new_zeros(*lead, heads, m)
            return self._node.apply(x.reshape(-1, heads, n)).reshape(*lead, heads, m)
        if x.ndim == 2 and heads is None and x.shape[0]:  # (B, n) -> (B, m): no reshapes
            return self._node.apply(x)
        lead = x.shape[:-1]
        out = (*lead, heads, m) if heads is not None else (*lead, m)
        if x.numel() == 0:
            return x.new_zeros(out)
        return self._node.apply(x.reshape(-1, n)).reshape(out)

    # -- inference ---------------------------------------------------------------------------------------------------
    def freeze(self, mode: bool = True) -> LinearOperator:
        """Contract weight-only sub-networks once and reuse them while the weights do not change (like ``eval()``:
        this operator and every operator nested in it). Returns ``self``.

        A frozen operator runs the constant-aware plan in any mode where it saves at least 10 % of the ordinary
        plan's flops per call, or where a weight is parametrized or pruned (under ``torch.inference_mode()`` every
        operator does so without being frozen); its ``cost()`` reports the plan it runs. Values never change, nor
        do gradients: while grad mode is on and a weight requires grad, the ordinary plan runs. The pieces are
        recomputed after any change of the weights (in-place updates, ``load_state_dict``, ``.to()``);
        :meth:`unfreeze` drops them.

        Example:
            >>> import torch, structmat as sm
            >>> A = sm.Dense(64, 16) @ sm.Dense(16, 16) @ sm.Dense(16, 64)
            >>> A.cost(8).flops
            36864
            >>> _ = A.freeze()
            >>> A.cost(8).flops  # the two right factors are one 16 x 64 matrix now: 2 * (64*16 + 16*64) * 8
            32768
            >>> x = torch.randn(8, 64)
            >>> with torch.no_grad():
            ...     torch.allclose(A(x), x @ A.dense().T, atol=1e-5)
            True
        """
        if not isinstance(mode, bool):
            raise TypeError(f"{self.name}.freeze: mode must be a bool, got {type(mode).__name__}")
        for op in self.modules():
            if isinstance(op, LinearOperator):
                op.__dict__["_frozen"] = mode
                _freeze.set_frozen(op._node, mode)
        return self

    def unfreeze(self) -> LinearOperator:
        """Back to the ordinary plan outside inference mode, and the kept pieces dropped. Returns ``self``."""
        return self.freeze(False)

    @property
    def frozen(self) -> bool:
        """True after :meth:`freeze` (until :meth:`unfreeze`)."""
        return self.__dict__.get("_frozen", False)

    # -- hooks -------------------------------------------------------------------------------------------------------
    def _warn_nested_hooks(self) -> None:
        self._hooks_seen = _hook_epoch[0]
        names = _ignored_hooks(self)
        if names:
            warnings.warn(
                f"{self.name}: hooks registered on {', '.join(names)} do not run when {self.name} is applied (a "
                "nested operator is fused into the composition's einsum, not called); register them on "
                f"{self.name}. Parametrizations and pruning of nested operators are honored.",
                UserWarning,
                stacklevel=5,  # the caller of op(x), through Module.__call__
            )

    # registering a hook bumps the epoch, so compositions look for hooks they would skip (they do not run inside one)
    register_forward_hook = _counting_hooks("register_forward_hook")
    register_forward_pre_hook = _counting_hooks("register_forward_pre_hook")
    register_full_backward_hook = _counting_hooks("register_full_backward_hook")
    register_full_backward_pre_hook = _counting_hooks("register_full_backward_pre_hook")
    register_backward_hook = _counting_hooks("register_backward_hook")

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, LinearOperator):
            from ..combinators import Product

            return Product(*_factors(self), other)  # a @ b @ c is one flat Product
        if isinstance(other, torch.Tensor):
            if other.ndim == 1:
                return self(other)
            if other.ndim < 1 or other.shape[-2] != self._shape[1]:
                raise ValueError(
                    f"{self.name} @ tensor: tensor must have shape (..., {self._shape[1]}, k), got {tuple(other.shape)}"
                )
            self._check_input(other.mT, "tensor")
            y = self(other.mT)  # (..., k, m) or (..., k, H, m)
            return y.movedim(-3, -1) if self._heads is not None else y.mT
        return NotImplemented

    def __rmatmul__(self, other: Any) -> Any:
        if isinstance(other, torch.Tensor):
            if other.ndim == 0 or other.shape[-1] != self._shape[0]:
                raise ValueError(
                    f"tensor @ {self.name}: tensor must have shape (..., {self._shape[0]}), got {tuple(other.shape)}"
                )
            y = self.T(other)  # (..., k, n) or (..., k, H, n)
            return y.movedim(-3, -2) if self._heads is not None and other.ndim > 1 else y
        return NotImplemented

    # -- algebra -----------------------------------------------------------------------------------------------------
    def __add__(self, other: Any) -> Any:
        if isinstance(other, LinearOperator):
            from ..combinators import Sum

            return Sum(*_terms(self), other)  # a + b + c is one flat Sum: long chains nest no modules
        if isinstance(other, torch.Tensor):
            from ..combinators import tensor_operand_error

            raise tensor_operand_error(f"{self.name} + ", other, "")
        return NotImplemented

    def __radd__(self, other: Any) -> Any:
        if isinstance(other, numbers.Number) and other == 0:  # so that sum([A, B]) works
            return self
        if isinstance(other, torch.Tensor):
            from ..combinators import tensor_operand_error

            raise tensor_operand_error("", other, f" + {self.name}")
        return NotImplemented

    def __sub__(self, other: Any) -> Any:
        if isinstance(other, LinearOperator):
            from ..combinators import Scaled, Sum

            return Sum(*_terms(self), Scaled(other, -1.0))
        if isinstance(other, torch.Tensor):
            from ..combinators import tensor_operand_error

            raise tensor_operand_error(f"{self.name} - ", other, "")
        return NotImplemented

    def __rsub__(self, other: Any) -> Any:
        if isinstance(other, torch.Tensor):
            from ..combinators import tensor_operand_error

            raise tensor_operand_error("", other, f" - {self.name}")
        return NotImplemented

    def __mul__(self, c: Any) -> Any:
        from ..combinators import Scaled

        if isinstance(c, numbers.Real) and not isinstance(c, bool):
            if type(self) is Scaled:  # c * (s * A) is (c s) * A: repeated scaling nests no modules
                return Scaled(self.op, _scale_product(self, self.scale, float(c)))
            return Scaled(self, float(c))
        if isinstance(c, torch.Tensor) or isinstance(c, LinearOperator):
            raise TypeError(
                f"{self.name} * {type(c).__name__}: an operator is scaled by a real number; use @ to compose "
                "operators and Diagonal for an elementwise scale"
            )
        return NotImplemented

    __rmul__ = __mul__

    def __truediv__(self, c: Any) -> Any:
        if isinstance(c, numbers.Real) and not isinstance(c, bool):
            if c == 0:
                raise ValueError(f"{self.name} / 0: division by zero")
            return self * (1.0 / float(c))
        return NotImplemented

    def __neg__(self) -> LinearOperator:
        return self * -1.0

    @property
    def T(self) -> LinearOperator:  # noqa: N802 - the matrix convention
        """The transpose; it shares this operator's parameters."""
        from ..combinators import Transpose

        return Transpose(self)

    # -- queries -----------------------------------------------------------------------------------------------------
    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``(m, n)`` matrix (``(H, m, n)`` for a stack), by applying the operator to the identity.

        Use only when it fits in memory.

        Args:
            dtype: for an operator without parameters (``Identity``, ``Permutation``), the dtype of the result
                (torch's default when None); an operator with parameters returns their dtype and rejects another.
        """
        m, n = self._shape
        own = self.dtype
        if dtype is not None and (
            not isinstance(dtype, torch.dtype) or not (dtype.is_floating_point or dtype.is_complex)
        ):
            raise TypeError(f"{self.name}.dense(dtype={dtype!r}): dtype must be a floating-point torch.dtype")
        if own is not None and dtype is not None and dtype != own:
            raise TypeError(f"{self.name}.dense(dtype={dtype}): the operator's parameters are {own}")
        dtype = own or dtype or torch.get_default_dtype()
        eye = torch.eye(n, dtype=dtype, device=self.device)
        y = self._node.apply(eye)
        return (y.permute(1, 2, 0) if y.ndim == 3 else y.T).contiguous()  # the apply gives the transpose

    def rank(self) -> Rank:
        """A bound on the rank from the structure alone; ``.exact`` when it is the rank for generic parameters.

        For a stack of heads, the bound holds for each head.
        """
        return self._node.rank()

    def cost(self, batch: int = 1, *, measure: bool = False) -> Cost:
        """Forward cost of applying the operator to ``batch`` vectors, from shapes alone (no data touched).

        With ``measure=True`` the result also carries ``.timing``: the operator timed against the same map as a dense
        matrix on this machine (see :func:`structmat.bench`; about a second).
        """
        batch = check_int(f"{self.name}.cost", "batch", batch)
        if not isinstance(measure, bool):
            raise TypeError(f"{self.name}.cost: measure must be a bool, got {type(measure).__name__}")
        cost = dataclasses.replace(self._node.cost(batch), heads=self._heads)
        if measure:
            from ..benchmark import measure_cost  # here: _bench imports this module

            return measure_cost(self, batch, cost)
        return cost

    def expr(self) -> str:
        """An expression that :func:`structmat.parse` turns back into an operator of the same structure.

        Example:
            >>> import structmat as sm
            >>> (2.0 * sm.LowRank(8, 6, rank=2) @ sm.Dense(4, 6).T).expr()
            '(2.0 * lowrank(8, 6, rank=2)) @ dense(4, 6).T'
        """
        from ..expr import to_expr

        return to_expr(self)

    def to_scipy(self) -> Any:
        """This operator as a ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out; ``rmatvec`` applies
        :attr:`T`): see :func:`structmat.interop.to_scipy`."""
        from ..interop import to_scipy

        return to_scipy(self)

    # -- printing ----------------------------------------------------------------------------------------------------
    def _summary(self) -> str:
        r = self.rank()
        return (
            f"{self.name}  params={self.num_params:,}  rank<={r.bound}{' (exact)' if r.exact else ''}"
            f"  flops/vec={self.cost(1).flops:,}"
        )

    def _tree(self, prefix: str = "") -> list[str]:
        lines = []
        ops = self._operands()
        for k, op in enumerate(ops):
            last = k == len(ops) - 1
            lines.append(prefix + ("└─ " if last else "├─ ") + op._summary())
            lines.extend(op._tree(prefix + ("   " if last else "│  ")))
        return lines

    def __repr__(self) -> str:
        return "\n".join([self._summary(), *self._tree()])


def _terms(op: LinearOperator) -> tuple[LinearOperator, ...]:
    """The terms of a Sum built by ``+`` (flattened), or the operator alone."""
    from ..combinators import Sum

    return tuple(op.terms) if type(op) is Sum else (op,)


def _factors(op: LinearOperator) -> tuple[LinearOperator, ...]:
    """The factors of a Product built by ``@`` (flattened), or the operator alone."""
    from ..combinators import Product

    return tuple(op.factors) if type(op) is Product else (op,)


def _scale_product(op: LinearOperator, a: float, b: float) -> float:
    """``a * b`` for folding ``b * (a * A)``; an overflow or an underflow to zero would be another operator."""
    c = a * b
    if not math.isfinite(c) or (c == 0 and a and b):
        what = (
            "scalars [{a:g}, {b:g}] overflows float64"
            if not math.isfinite(c)
            else "nonzero scalars [{a:g}, {b:g}] underflows float64 to 0"
        )
        raise ValueError(f"{op.name}: the product of its " + what.format(a=a, b=b))
    return c


def check_compatible(kind: str, ops: Sequence[LinearOperator]) -> int | None:
    """Raise when operators mix dtypes, devices or head counts (composites never move data).

    Returns the common number of heads (None when no operand is a stack).
    """
    for op in ops:
        if not isinstance(op, LinearOperator):
            raise TypeError(f"{kind}: expected LinearOperator operands, got {type(op).__name__}")
    stacked = [op for op in ops if op.heads is not None]
    if len({op.heads for op in stacked}) > 1:
        listing = ", ".join(op.name for op in stacked)
        raise ValueError(f"{kind}: operands are stacks of different numbers of heads: {listing}")
    typed = [op for op in ops if op.dtype is not None]
    dtypes = {op.dtype for op in typed}
    if len(dtypes) > 1:
        listing = ", ".join(f"{op.name} {op.dtype}" for op in typed)
        raise TypeError(f"{kind}: operators have different dtypes: {listing}")
    devices = {op.device for op in typed}
    if len(devices) > 1:
        listing = ", ".join(f"{op.name} on {op.device}" for op in typed)
        raise ValueError(f"{kind}: operators are on different devices: {listing}")
    return stacked[0].heads if stacked else None
