"""Spectral µP initialization and µP learning rates for structmat operators (and the modules that hold them).

Every factor of every network of an operator is a dense tensor that reads some labels (its *fan-in*) and writes
others (its *fan-out*); the remaining labels index independent blocks. The spectral µP rule of Yang, Simon and
Bernstein ("A Spectral Condition for Feature Learning", 2023), applied per factor as Qiu et al. do for structured
layers ("Compute Better Spent", 2024), draws each factor from ``N(0, std^2)`` with

    ``std = (1 / sqrt(fan_in)) * min(1, sqrt(fan_out / fan_in))``

so that each factor's spectral norm is about ``sqrt(fan_out / fan_in)``, and trains it (with Adam) at a learning rate
proportional to ``1 / fan_in``.

What the rule promises, and what it does not:

- The *spectral norm* of a freshly initialized operator is Θ(1) (times ``sqrt(m / n)``) at every width, for every
  structure: that is the condition for feature learning.
- The *output RMS on a random input* is ``prod_k min(1, sqrt(fan_out_k / fan_in_k))`` (independent Gaussian factors,
  tree networks; the networks of a sum add their squares). It is 1 when no factor narrows (Dense, Kronecker,
  BlockDiagonal, a square Monarch with any ``nblocks``), ``1 / sqrt(s)`` for a BTT or TT with bond ``s`` on
  ``n = k * k``, and ``sqrt(r / n)`` for ``LowRank(n, n, r)``: a random input lies mostly in the null space of a
  factor that narrows, and shrinks. Training aligns the input with the row space, after which the spectral norm is
  what counts. So the RMS stays in ``[0.5, 2]`` across widths only where the narrowing ratios stay bounded: a rank
  proportional to width (more than ``n / 4``), a small fixed BTT/TT bond (up to 2-4).

Fans are taken from the networks as the operator uses them (see :func:`parameter_fans`): factors are applied in order
from the input, each reading the labels it is the last to need (fan-in), writing the labels it introduces (fan-out),
and passing the others through as blocks (diagonal, head, and block labels such as a BTT core's other input mode).

Example:
    >>> import torch, structmat as sm
    >>> A = sm.BTT(64, 64, ranks=2)                   # cores: 8 -> 8*2 and 8*2 -> 8, in blocks of 8
    >>> sorted(sm.init.parameter_fans(A).items())
    [('core0', (8, 16)), ('core1', (16, 8))]
    >>> stds = sm.init.spectral_(A)
    >>> round(stds["core0"], 4), round(stds["core1"], 4)  # 1/sqrt(8), 1/sqrt(16) * sqrt(8/16)
    (0.3536, 0.1768)
    >>> groups = sm.mup_param_groups(A, lr=1e-3, base_width=64)
    >>> [(g["names"], g["fan_in"], g["lr"]) for g in groups]   # lr * 64 / fan_in
    [(['core0'], 8, 0.008), (['core1'], 16, 0.004)]
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from .core.base import LinearOperator
from .core.params import spectral_std

__all__ = ["spectral_", "spectral_std", "parameter_fans", "mup_param_groups"]

Fans = tuple[int, int]


# -- fans -------------------------------------------------------------------------------------------------------------
def _operators(module: torch.nn.Module) -> list[LinearOperator]:
    """The structmat operators ``module`` holds directly: reachable without passing through another operator.

    An operator nested inside another (a term of a ``Sum``, the operand of a ``Transpose``) is seen through the
    networks of the outer one, which say how it is used; it counts on its own only where the module also holds it
    directly.
    """
    found: dict[int, LinearOperator] = {}
    seen: set[int] = set()
    stack = [module]
    while stack:
        mod = stack.pop()
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        if isinstance(mod, LinearOperator):
            found.setdefault(id(mod), mod)
            continue
        stack.extend(reversed(list(mod.children())))
    return list(found.values())


def _choose(uses: list[Fans]) -> Fans:
    """One ``(fan_in, fan_out)`` for a parameter used in several places: the largest fan-in, then the smaller std.

    That gives the smaller learning rate and (almost always) the smaller init, the safe side for every use.
    """
    return max(uses, key=lambda f: (f[0], -spectral_std(*f)))


def _memory(p: torch.Tensor) -> tuple[Any, ...]:
    """What a parameter's values are: two parameter objects over the same memory (e.g. ``Dense.from_tensor(w)`` twice
    wraps ``w`` in two ``Parameter`` objects) are one tensor to initialize."""
    if p.is_meta:
        return (id(p),)
    return (p.device, p.data_ptr(), p.dtype, tuple(p.shape), p.stride())


def _factor_fans(module: torch.nn.Module) -> dict[int, tuple[torch.nn.Parameter, Fans]]:
    """Every parameter that is a factor of a network of an operator in ``module``, with its chosen fans.

    Keyed by ``id`` of the parameter, in the order of ``module.parameters()``. A parameter used by several factors or
    operators appears once, with one choice (:func:`_choose`) over all its uses and those of parameters aliasing its
    memory. Factors that are buffers, not parameters, are data and are left out.
    """
    found: dict[int, torch.nn.Parameter] = {}
    uses: dict[tuple[Any, ...], list[Fans]] = {}
    for op in _operators(module):
        for network in op._node.networks():
            for factor, fans in zip(network.factors, network.factor_fans()):
                t = getattr(factor.owner, factor.name)
                if isinstance(t, torch.nn.Parameter):
                    found.setdefault(id(t), t)
                    uses.setdefault(_memory(t), []).append(fans)
    order = {id(p): k for k, p in enumerate(module.parameters())}
    keys = sorted(found, key=lambda key: order.get(key, len(order)))
    return {key: (found[key], _choose(uses[_memory(found[key])])) for key in keys}


def _names(module: torch.nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in module.named_parameters()}


def _check_module(where: str, module: Any) -> None:
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"{where}: module must be a torch.nn.Module, got {type(module).__name__}")


def parameter_fans(module: torch.nn.Module) -> dict[str, Fans]:
    """``(fan_in, fan_out)`` of every parameter that is a factor of a structmat operator in ``module``, by name.

    The fans are the sizes a factor reads and writes in its network, per block (see the module doc). A parameter used
    in several places (shared between operators, or held both directly and transposed) gets the use with the largest
    fan-in. ``(1, 1)`` marks an elementwise factor such as ``Diagonal``'s, which mixes nothing.

    Args:
        module: a structmat operator, or any module holding some.

    Returns:
        ``{qualified parameter name: (fan_in, fan_out)}``, in the order of ``module.named_parameters()``.

    Example:
        >>> import structmat as sm
        >>> sm.init.parameter_fans(sm.LowRank(12, 7, rank=3))
        {'U': (3, 12), 'V': (7, 3)}
        >>> sm.init.parameter_fans(sm.Dense(5, 3).T)     # the transpose reads 5 and writes 3
        {'op.weight': (5, 3)}
    """
    _check_module("parameter_fans", module)
    names = _names(module)
    return {names.get(key, f"<unregistered {tuple(p.shape)}>"): fans for key, (p, fans) in _factor_fans(module).items()}


# -- initialization ---------------------------------------------------------------------------------------------------
def spectral_(module: torch.nn.Module, *, generator: torch.Generator | None = None) -> dict[str, float]:
    """Re-initialize, in place, every factor of every structmat operator in ``module`` by the spectral µP rule.

    Each factor parameter is drawn from ``N(0, std^2)`` with ``std = spectral_std(fan_in, fan_out)``, the fans from
    :func:`parameter_fans` (the factor as its network uses it, per block; for a reshaped view of a parameter the
    parameter itself is drawn). Each parameter is drawn once, however many operators or factors share it (parameter
    objects over the same memory count as one).
    Left alone: parameters that are not factors of a structmat network (biases, norms, ``nn.Linear``), factors that are
    buffers, elementwise factors (fans ``(1, 1)``, e.g. ``Diagonal``, whose values are gains, initialized by their
    family), and parameters on the ``meta`` device (nothing to fill).

    Works under ``torch.no_grad``/``torch.inference_mode`` and on any device (each parameter is filled where it lives).

    Args:
        module: a structmat operator, or any module holding some (operators nested inside other operators are seen
            through the outer ones).
        generator: a ``torch.Generator`` on the parameters' device, for reproducible draws.

    Returns:
        ``{qualified parameter name: std used}`` for each parameter drawn.

    Example:
        >>> import torch, structmat as sm
        >>> model = torch.nn.Sequential(sm.LowRank(4096, 1024, rank=64), torch.nn.LayerNorm(4096))
        >>> stds = sm.init.spectral_(model)
        >>> stds == {"0.V": 1 / 1024 ** 0.5 * (64 / 1024) ** 0.5, "0.U": 1 / 64 ** 0.5}
        True
        >>> abs(model[0].U.std().item() - 1 / 64 ** 0.5) < 0.01, bool((model[1].weight == 1).all())  # LayerNorm kept
        (True, True)
    """
    _check_module("spectral_", module)
    names = _names(module)
    out: dict[str, float] = {}
    drawn: set[tuple[Any, ...]] = set()
    with torch.no_grad():
        for key, (p, (fan_in, fan_out)) in _factor_fans(module).items():
            if (fan_in, fan_out) == (1, 1) or p.is_meta or _memory(p) in drawn:
                continue
            drawn.add(_memory(p))
            std = spectral_std(fan_in, fan_out)
            p.normal_(0.0, std, generator=generator)
            out[names.get(key, f"<unregistered {tuple(p.shape)}>")] = std
    return out


# -- learning rates ---------------------------------------------------------------------------------------------------
def _check_positive(where: str, what: str, value: Any, minimum: float, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {what} must be a real number, got {type(value).__name__} {value!r}")
    bad = value <= minimum if strict else value < minimum
    if not math.isfinite(value) or bad:
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ValueError(f"{where}: {what} must be finite and {bound}, got {value!r}")
    return float(value)


def _torch_fan_ins(module: torch.nn.Module) -> dict[int, int]:
    """Fan-ins of the weights of torch layers whose weights are hidden matrices: ``nn.Linear`` and ``nn.ConvNd``."""
    out: dict[int, int] = {}
    for mod in module.modules():
        weight = getattr(mod, "weight", None)
        if not isinstance(weight, torch.nn.Parameter):
            continue
        if isinstance(mod, torch.nn.Linear):
            out.setdefault(id(weight), int(mod.in_features))
        elif isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            out.setdefault(id(weight), int(mod.in_channels // mod.groups * math.prod(mod.kernel_size)))
    return out


def mup_param_groups(module: torch.nn.Module, lr: float, base_width: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups with µP learning rates ``lr * base_width / fan_in`` per tensor (Adam-type).

    The rule (µP for Adam: Yang & Hu 2021, Yang, Simon & Bernstein 2023; applied per factor of a structured layer by
    Qiu et al. 2024, the rule the structured-attention paper uses): a matrix-like tensor whose fan-in grows with width
    gets a learning rate proportional to ``1 / fan_in``, normalized so that a dense layer of width ``base_width`` (where
    ``lr`` was tuned) keeps ``lr``; a vector-like tensor keeps ``lr``.

    Per tensor:

    - a factor of a structmat operator: ``fan_in`` is what it reads per block in its network (:func:`parameter_fans`),
      ``lr * base_width / fan_in``; an elementwise factor (fans ``(1, 1)``, e.g. ``Diagonal``) keeps ``lr``;
    - an ``nn.Linear`` weight: ``fan_in = in_features``; an ``nn.Conv1d/2d/3d`` weight:
      ``fan_in = in_channels / groups * prod(kernel_size)``; both ``lr * base_width / fan_in``;
    - everything else (biases, norm gains, embeddings, scalars): ``lr``.

    Why vector-like tensors keep ``lr``: with Adam every entry moves by about ``lr`` per step, so a bias or a gain
    changes by Θ(lr) whatever the width, which is what µP asks of them; an embedding's fan-in is the vocabulary (or a
    one-hot), which does not grow with width, so it is an input weight with a Θ(1) learning rate in µP. Other
    matrix-like parameters that are neither structmat factors nor torch layers above (e.g. the packed
    ``nn.MultiheadAttention.in_proj_weight``) cannot be told apart from vectors by shape and also keep ``lr``: hold such
    weights in an ``nn.Linear`` or a structmat operator, or adjust their group. Qiu et al.'s reference code further
    divides a structured layer's rates by its number of factors, a width-independent constant left to ``lr`` here.

    Args:
        module: any module; structmat operators inside it are found as :func:`parameter_fans` finds them.
        lr: the learning rate tuned at ``base_width`` (> 0).
        base_width: the width at which ``lr`` was tuned (>= 1).

    Returns:
        A list of dicts for ``torch.optim.AdamW`` (or any optimizer), one per distinct learning rate, in the order
        their first parameters appear in ``module.named_parameters()``. Each holds ``params``, ``lr``, ``fan_in`` (the
        fan-in that gives the group's ``lr``; ``base_width`` for the groups that keep ``lr``) and ``names``. Every
        parameter appears exactly once.

    Example:
        >>> import torch, structmat as sm
        >>> model = torch.nn.Sequential(sm.Dense(6, 4), sm.LowRank(12, 6, rank=2), torch.nn.LayerNorm(12))
        >>> groups = sm.mup_param_groups(model, lr=1.0, base_width=24)
        >>> [(g["names"], g["fan_in"], g["lr"]) for g in groups]
        [(['0.weight'], 4, 6.0), (['1.U'], 2, 12.0), (['1.V'], 6, 4.0), (['2.weight', '2.bias'], 24, 1.0)]
        >>> opt = torch.optim.AdamW(groups)
    """
    where = f"mup_param_groups(lr={lr!r}, base_width={base_width!r})"
    _check_module(where, module)
    lr = _check_positive(where, "lr", lr, 0.0, strict=True)
    base_width = _check_positive(where, "base_width", base_width, 1.0, strict=False)
    base_fan: int | float = int(base_width) if base_width == int(base_width) else base_width
    fan_ins: dict[int, int] = {}
    for key, (_, (fan_in, fan_out)) in _factor_fans(module).items():
        if (fan_in, fan_out) != (1, 1):
            fan_ins[key] = fan_in
    for key, fan_in in _torch_fan_ins(module).items():
        fan_ins.setdefault(key, fan_in)
    groups: dict[int | float, dict[str, Any]] = {}
    for name, p in module.named_parameters():
        if isinstance(p, torch.nn.parameter.UninitializedParameter):
            raise ValueError(f"{where}: parameter {name!r} is uninitialized (a lazy module); run a forward pass first")
        fan = fan_ins.get(id(p), base_fan)
        group = groups.get(fan)
        if group is None:
            group = groups[fan] = {"params": [], "lr": lr * (base_width / fan), "fan_in": fan, "names": []}
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())
