"""Spectral µP initialization (``structmat.init.spectral_``) and µP learning rates (``structmat.mup_param_groups``).

What µP promises at initialization, tested across widths 64 .. 4096 (square, float32):

- every structure's spectral norm is Θ(1): no trend with width (``test_spectral_norm_is_order_one``);
- the output RMS on a unit-RMS Gaussian input is ``sqrt(prod_k min(1, fan_out_k / fan_in_k))`` (independent Gaussian
  factors, tree networks; levels of a sum add their squares). It stays within [0.5, 2] at every width exactly when the
  narrowing ratios stay bounded, i.e. for the width-scaled hyperparameters the papers use (rank proportional to width,
  fixed small BTT/TT bond, Monarch with any ``nblocks``): ``IN_BAND``. For configurations with a narrowing that grows
  with width (a fixed rank, the ``rank = sqrt(n)`` default of Qiu et al.'s code, a large BTT bond) the spectral rule
  provably shrinks the RMS of a random input; there the test asserts the analytic prediction and that the band is
  left at width 4096: ``OUT_OF_BAND``.

Predictions are derived by hand per family below, not from the library's fan computation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import zoo

import structmat as sm
from structmat.core.splits import balanced_factors
from structmat.init import spectral_std

WIDTHS = [64, 128, 256, 512, 1024, 2048, 4096]


def _square(d: int) -> tuple[int, int]:
    return balanced_factors(d, 2)  # (a, b) with a <= b, a * b = d


def _btt_var(d: int, s: int) -> float:
    """BTT(d, d, ranks=s), input (a, b), output (c, e): core0 reads b, writes c*s; core1 reads a*s, writes e."""
    a, b = _square(d)
    c, e = a, b
    return min(1, c * s / b) * min(1, e / (a * s))


def _tt_var(d: int, r: int) -> float:
    """TT(d, d, ranks=r): core0 reads a, writes c*r; core1 reads b*r, writes e."""
    a, b = _square(d)
    c, e = a, b
    return min(1, c * r / a) * min(1, e / (b * r))


def _monarch_var(d: int, nb: int) -> float:
    """Monarch(d, d, nblocks=nb): each block of either factor reads d/nb and writes d/nb, so nothing narrows."""
    return min(1, (d // nb) / (d // nb)) ** 2


def _mlr_var(d: int, ranks: list[int], blocks: list[int]) -> float:
    """A sum over levels of block-diagonal LowRank blocks of size q = d/k: each level adds k * (r/q) / k = r*k/d."""
    return sum(min(1, r / (d // k)) for r, k in zip(ranks, blocks))


Config = tuple[Callable[[int], sm.LinearOperator], Callable[[int], float]]

IN_BAND: dict[str, Config] = {
    "Dense": (lambda d: sm.Dense(d, d), lambda d: 1.0),
    "LowRank rank=d/2": (lambda d: sm.LowRank(d, d, rank=d // 2), lambda d: 0.5),
    "BTT ranks=2": (lambda d: sm.BTT(d, d, ranks=2), lambda d: _btt_var(d, 2)),
    "Monarch nblocks~sqrt(d)": (
        lambda d: sm.Monarch(d, d, nblocks=_square(d)[0]),
        lambda d: _monarch_var(d, _square(d)[0]),
    ),
    "Monarch nblocks=4": (lambda d: sm.Monarch(d, d, nblocks=4), lambda d: _monarch_var(d, 4)),
    "TT ranks=2": (lambda d: sm.TT(d, d, ranks=2), lambda d: _tt_var(d, 2)),
    "Kronecker": (lambda d: sm.Kronecker.from_sizes(*[(a, a) for a in _square(d)]), lambda d: 1.0),
    "BlockDiagonal nblocks=4": (lambda d: sm.BlockDiagonal.from_sizes(d, d, nblocks=4), lambda d: 1.0),
    "MLR ranks=[d/4,d/8] blocks=[1,2]": (
        lambda d: sm.MLR(d, d, ranks=[d // 4, d // 8], blocks=[1, 2]),
        lambda d: _mlr_var(d, [d // 4, d // 8], [1, 2]),
    ),
}

OUT_OF_BAND: dict[str, Config] = {
    "LowRank rank=8": (lambda d: sm.LowRank(d, d, rank=8), lambda d: 8 / d),
    "LowRank rank=sqrt(d)": (lambda d: sm.LowRank(d, d, rank=math.isqrt(d)), lambda d: math.isqrt(d) / d),
    "BTT ranks=8": (lambda d: sm.BTT(d, d, ranks=8), lambda d: _btt_var(d, 8)),
    "MLR ranks=[8,4] blocks=[1,4]": (
        lambda d: sm.MLR(d, d, ranks=[8, 4], blocks=[1, 4]),
        lambda d: _mlr_var(d, [8, 4], [1, 4]),
    ),
}


def _fresh(name: str, make: Callable[[int], sm.LinearOperator], d: int, seed: int = 0) -> sm.LinearOperator:
    torch.manual_seed(seed)
    op = make(d)
    sm.init.spectral_(op)
    return op


def _rms(op: sm.LinearOperator, d: int, seed: int) -> float:
    x = torch.randn(16, d, generator=torch.Generator().manual_seed(10_000 + seed))  # not the operator's stream
    with torch.no_grad():
        return op(x).pow(2).mean().sqrt().item()


def _measure(name: str, config: Config) -> list[tuple[int, list[float], float]]:
    """Per width: the output RMS of each of a few fresh operators (more at small widths, where one draw of a
    structure with few parameters fluctuates by ~15%), and the predicted RMS."""
    make, var = config
    rows = []
    for d in WIDTHS:
        draws = max(1, 1024 // d)
        rows.append((d, [_rms(_fresh(name, make, d, seed), d, seed) for seed in range(draws)], math.sqrt(var(d))))
    return rows


def _mean_rms(draws: list[float]) -> float:
    return math.sqrt(sum(r * r for r in draws) / len(draws))


@pytest.mark.parametrize("name", list(IN_BAND))
def test_output_rms_within_band_for_width_scaled_configurations(name: str) -> None:
    for d, draws, predicted in _measure(name, IN_BAND[name]):
        for rms in draws:
            assert 0.5 <= rms <= 2.0, f"{name} at width {d}: output RMS {rms:.3f} (predicted {predicted:.3f})"
        rms = _mean_rms(draws)
        assert rms == pytest.approx(predicted, rel=0.15), f"{name} at width {d}: {rms:.3f} vs predicted {predicted:.3f}"


@pytest.mark.parametrize("name", list(OUT_OF_BAND))
def test_output_rms_follows_prediction_where_the_band_cannot_hold(name: str) -> None:
    rows = _measure(name, OUT_OF_BAND[name])
    for d, draws, predicted in rows:
        rms = _mean_rms(draws)
        assert rms == pytest.approx(predicted, rel=0.15), f"{name} at width {d}: {rms:.3f} vs predicted {predicted:.3f}"
    d, draws, predicted = rows[-1]
    assert predicted < 0.5 and max(draws) < 0.5, f"{name} at width {d}: expected to leave [0.5, 2], got {draws}"


def _spectral_norm(op: sm.LinearOperator, d: int, iters: int = 15) -> float:
    v = torch.randn(d, generator=torch.Generator().manual_seed(1))
    t = op.T
    with torch.no_grad():
        for _ in range(iters):
            v = t(op(v))
            v = v / v.norm()
        return op(v).norm().item()


@pytest.mark.parametrize("name", list(IN_BAND) + list(OUT_OF_BAND))
def test_spectral_norm_is_order_one(name: str) -> None:
    """What the spectral rule controls: ``||A||_2`` is Θ(1) at every width, even where the RMS of a random input
    shrinks (a random input lies mostly in the null space of a narrowing factor)."""
    make, _ = {**IN_BAND, **OUT_OF_BAND}[name]
    norms = {d: _spectral_norm(_fresh(name, make, d), d) for d in (64, 4096)}
    for d, norm in norms.items():
        assert 0.5 <= norm <= 6.0, f"{name} at width {d}: spectral norm {norm:.2f}"
    assert 1 / 3 <= norms[4096] / norms[64] <= 3, f"{name}: spectral norm drifts with width: {norms}"


# -- the std formula per factor ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, fans",
    [
        (lambda: sm.LowRank(2048, 1024, rank=64), {"U": (64, 2048), "V": (1024, 64)}),
        # input (32, 32), output (32, 64): core0 reads 32, writes 32*2; core1 reads 32*2, writes 64
        (lambda: sm.BTT(2048, 1024, ranks=2), {"core0": (32, 64), "core1": (64, 64)}),
        # 8 blocks (64, 128) then 8 blocks (64, 64): the first factor reads 128 and writes 64, the second 64 and 64
        (lambda: sm.Monarch(512, 1024, nblocks=8), {"blkdiag1": (128, 64), "blkdiag2": (64, 64)}),
        # input (32, 32), output (32, 32): core0 reads 32, writes 32*3; core1 reads 32*3, writes 32
        (lambda: sm.TT(1024, 1024, ranks=3), {"core0": (32, 96), "core1": (96, 32)}),
        (lambda: sm.BlockDiagonal.from_sizes(1024, 2048, nblocks=4), {"blocks.0.weight": (512, 256)}),
        (lambda: sm.LowRank(64, 48, rank=8, heads=32), {"U": (8, 64), "V": (48, 8)}),  # the head label is no fan
    ],
)
def test_spectral_init_reproduces_std_formula(make: Callable[[], sm.LinearOperator], fans: dict) -> None:
    torch.manual_seed(0)
    op = make()
    assert sm.init.parameter_fans(op) == fans
    with torch.no_grad():
        for p in op.parameters():
            p.zero_()
    stds = sm.init.spectral_(op)
    assert stds == {name: spectral_std(*f) for name, f in fans.items()}
    params = dict(op.named_parameters())
    for name, std in stds.items():
        assert params[name].std().item() == pytest.approx(std, rel=0.05), name
        assert params[name].mean().item() == pytest.approx(0.0, abs=0.05 * std), name


def test_fans_follow_the_use_transposed() -> None:
    A = sm.BTT(64, 64, ranks=2)
    assert sm.init.parameter_fans(A) == {"core0": (8, 16), "core1": (16, 8)}
    assert sm.init.parameter_fans(A.T) == {"op.core0": (16, 8), "op.core1": (8, 16)}  # applied last core first
    assert sm.init.parameter_fans(sm.Dense(5, 3).T) == {"op.weight": (5, 3)}


def test_fans_of_a_label_summed_by_one_factor_alone() -> None:
    # z is held by U only: summed there, so it is fan-in; V still goes first (it reads the input)
    A = sm.TensorNetwork("y[o] = U[o,r,z] V[r,i] x[i]", sizes=dict(o=5, r=2, z=3, i=7))
    assert sm.init.parameter_fans(A) == {"U": (6, 5), "V": (7, 2)}


def test_fans_of_a_reshaped_view() -> None:
    # a product fuses into one network where the dense factor is a (6, 3, 4) view of its (6, 12) parameter
    P = sm.Dense(6, 12) @ sm.BlockDiagonal.from_sizes(12, 15, nblocks=3)  # blocks (4, 5)
    (network,) = P._node.networks()
    dense = P.factors[0].weight
    assert any(f.shape != tuple(dense.shape) and getattr(f.owner, f.name) is dense for f in network.factors)
    assert sm.init.parameter_fans(P) == {"factors.0.weight": (12, 6), "factors.1.blocks.0.weight": (5, 4)}
    stds = sm.init.spectral_(P)
    assert tuple(dense.shape) == (6, 12) and stds["factors.0.weight"] == spectral_std(12, 6)


# -- what is left alone, sharing, devices ------------------------------------------------------------------------------
class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.low = sm.LowRank(12, 5, rank=2)
        self.pair = sm.Sum(sm.Dense(12, 12), sm.Diagonal(12))
        self.norm = torch.nn.LayerNorm(12)
        self.head = torch.nn.Linear(12, 3)


def test_spectral_leaves_non_factors_alone() -> None:
    torch.manual_seed(0)
    model = _Model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    stds = sm.init.spectral_(model)
    assert set(stds) == {"low.U", "low.V", "pair.terms.0.weight"}
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (name in stds), name
    assert bool((model.pair.terms[1].diag == 1).all())  # an elementwise factor keeps its gains
    assert sm.init.parameter_fans(model)["pair.terms.1.diag"] == (1, 1)


def test_elementwise_factor_fused_into_a_product_is_left_alone() -> None:
    P = sm.Diagonal(5) @ sm.Dense(5, 3)
    assert sm.init.parameter_fans(P) == {"factors.0.diag": (1, 1), "factors.1.weight": (3, 5)}
    assert set(sm.init.spectral_(P)) == {"factors.1.weight"}
    assert bool((P.factors[0].diag == 1).all())


def test_shared_parameter_is_drawn_once() -> None:
    class Shared(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = sm.Dense(5, 3)
            self.b = self.a.T  # the same weight, used transposed
            self.c = sm.kron(self.a, self.a) + sm.kron(self.a, self.a)  # ... and four times more in one sum

    model = Shared()
    assert len(list(model.parameters())) == 1
    # uses: (3 -> 5) and (5 -> 3); the larger fan-in wins (smaller std and lr, safe for both)
    assert sm.init.parameter_fans(model) == {"a.weight": (5, 3)}
    stds = sm.init.spectral_(model, generator=torch.Generator().manual_seed(7))
    assert stds == {"a.weight": spectral_std(5, 3)}
    once = torch.empty(5, 3).normal_(0.0, spectral_std(5, 3), generator=torch.Generator().manual_seed(7))
    assert torch.equal(model.a.weight.detach(), once)


def test_same_parameter_object_in_two_operators_is_drawn_once() -> None:
    w = torch.nn.Parameter(torch.zeros(4, 6))
    model = torch.nn.ModuleList([sm.Dense.from_tensor(w), 2.0 * sm.Dense.from_tensor(w)])
    assert len(list(model.parameters())) == 1  # from_tensor keeps a Parameter as it is: both operators hold w
    assert model[0].weight is w and model[1].op.weight is w
    assert sm.init.parameter_fans(model) == {"0.weight": (6, 4)}
    stds = sm.init.spectral_(model, generator=torch.Generator().manual_seed(3))
    assert stds == {"0.weight": spectral_std(6, 4)}
    once = torch.empty(4, 6).normal_(0.0, spectral_std(6, 4), generator=torch.Generator().manual_seed(3))
    assert torch.equal(w.detach(), once)


def test_nested_operator_counts_through_the_outer_one() -> None:
    inner = sm.LowRank(6, 4, rank=2)
    outer = sm.Sum(inner, sm.Dense(6, 4))
    holder = torch.nn.ModuleDict({"outer": outer})
    assert sm.init.parameter_fans(holder) == {
        "outer.terms.0.U": (2, 6),
        "outer.terms.0.V": (4, 2),
        "outer.terms.1.weight": (4, 6),
    }


def test_spectral_under_no_grad_and_inference_mode_and_meta() -> None:
    op = sm.LowRank(30, 20, rank=4)
    with torch.no_grad():
        assert len(sm.init.spectral_(op)) == 2
    with torch.inference_mode():
        assert len(sm.init.spectral_(op)) == 2
    assert op.U.requires_grad
    meta = sm.BTT(256, 256, ranks=2, device="meta")
    assert sm.init.spectral_(meta) == {}
    assert sm.init.parameter_fans(meta) == {"core0": (16, 32), "core1": (32, 16)}


def test_spectral_on_a_module_without_operators_is_a_no_op() -> None:
    lin = torch.nn.Linear(3, 2)
    before = lin.weight.detach().clone()
    assert sm.init.spectral_(lin) == {}
    assert torch.equal(lin.weight, before)


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_spectral_runs_on_every_zoo_operator(name: str) -> None:
    op = zoo.build(name)
    fans = sm.init.parameter_fans(op)
    params = dict(op.named_parameters())
    assert set(fans) <= set(params)
    stds = sm.init.spectral_(op)
    assert set(stds) == {k for k, f in fans.items() if f != (1, 1)}
    for k, std in stds.items():
        assert std == spectral_std(*fans[k])
    x = torch.randn(3, op.shape[1], dtype=torch.float64)
    assert torch.allclose(op(x), x @ op.dense(dtype=torch.float64).T, atol=1e-8)


@pytest.mark.parametrize("fn", [sm.init.spectral_, sm.init.parameter_fans])
def test_init_rejects_non_modules(fn: Callable) -> None:
    with pytest.raises(TypeError, match=r"module must be a torch.nn.Module, got Tensor"):
        fn(torch.zeros(3))


# -- construction-time init agrees with spectral_ ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: sm.Dense(512, 1024), id="Dense"),
        pytest.param(lambda: sm.LowRank(1024, 512, rank=32), id="LowRank"),
        pytest.param(lambda: sm.BlockDiagonal.from_sizes(1024, 512, nblocks=4), id="BlockDiagonal"),
        pytest.param(lambda: sm.Kronecker.from_sizes((32, 16), (32, 64)), id="Kronecker"),
        pytest.param(lambda: sm.BTT(1024, 1024, ranks=2), id="BTT"),
        pytest.param(lambda: sm.Monarch(1024, 1024, nblocks=32), id="Monarch"),
        pytest.param(lambda: sm.TT(1024, 1024, ranks=4), id="TT"),
    ],
)
def test_construction_init_matches_spectral_rule(make: Callable[[], sm.LinearOperator]) -> None:
    torch.manual_seed(0)
    op = make()
    params = dict(op.named_parameters())
    for name, fans in sm.init.parameter_fans(op).items():
        assert params[name].std().item() == pytest.approx(spectral_std(*fans), rel=0.1), (name, fans)


# -- µP learning rates ------------------------------------------------------------------------------------------------
class _Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = sm.Dense(6, 4)
        self.low = sm.LowRank(12, 5, rank=2)
        self.norm = torch.nn.LayerNorm(12)

    def forward(self, x4: torch.Tensor, x5: torch.Tensor) -> torch.Tensor:
        return self.dense(x4).pow(2).sum() + self.norm(self.low(x5)).pow(3).sum()


def test_mup_param_groups_exact_lrs() -> None:
    model = _Small()
    groups = sm.mup_param_groups(model, lr=1.0, base_width=20)
    got = [(g["names"], g["fan_in"], g["lr"]) for g in groups]
    assert got == [
        (["dense.weight"], 4, 5.0),  # 20 / 4
        (["low.U"], 2, 10.0),  # U reads the rank, 2
        (["low.V"], 5, 4.0),  # V reads the input, 5
        (["norm.weight", "norm.bias"], 20, 1.0),  # vector-like: keeps lr
    ]
    lr = 3e-3
    groups = sm.mup_param_groups(model, lr=lr, base_width=20)
    assert [g["lr"] for g in groups] == [lr * (20 / 4), lr * (20 / 2), lr * (20 / 5), lr]
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len(list(model.parameters())) == len({id(p) for p in params})


def test_mup_param_groups_merge_equal_lrs_and_torch_layers() -> None:
    model = torch.nn.ModuleDict(
        {
            "emb": torch.nn.Embedding(100, 16),
            "proj": torch.nn.Linear(16, 32),
            "conv": torch.nn.Conv2d(4, 8, kernel_size=3, groups=2),
            "btt": sm.BTT(16, 16, ranks=2),  # cores read 4 and 8
            "same": sm.Dense(16, 16),  # fan-in 16 = base width: merged with the vector-like group
        }
    )
    groups = sm.mup_param_groups(model, lr=0.5, base_width=16)
    got = {g["fan_in"]: (g["lr"], g["names"]) for g in groups}
    assert got == {
        16: (0.5, ["emb.weight", "proj.weight", "proj.bias", "conv.bias", "same.weight"]),
        18: (0.5 * 16 / 18, ["conv.weight"]),  # 4 / 2 channels * 3 * 3
        4: (2.0, ["btt.core0"]),
        8: (1.0, ["btt.core1"]),
    }
    assert len({g["lr"] for g in groups}) == len(groups)


def test_mup_param_groups_shared_parameter_appears_once() -> None:
    a = sm.Dense(5, 3)
    model = torch.nn.ModuleList([a, a.T, sm.kron(a, a)])
    (group,) = sm.mup_param_groups(model, lr=1.0, base_width=10)
    assert group["names"] == ["0.weight"] and group["fan_in"] == 5 and group["lr"] == 2.0


def test_mup_param_groups_adamw_step_moves_each_tensor_by_its_lr() -> None:
    torch.manual_seed(0)
    model = _Small()
    groups = sm.mup_param_groups(model, lr=1e-3, base_width=20)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    loss = model(torch.randn(7, 4), torch.randn(7, 5))
    loss.backward()
    opt.step()
    for group in opt.param_groups:
        for p in group["params"]:
            step = (p.detach() - before[id(p)]).abs()
            # Adam's first step moves every entry with a gradient by lr * |g| / (|g| + eps) ≈ lr
            assert step.max().item() == pytest.approx(group["lr"], rel=1e-3)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(lr=0.0, base_width=64), ValueError, r"lr must be finite and > 0, got 0\.0"),
        (dict(lr=-1e-3, base_width=64), ValueError, r"lr must be finite and > 0, got -0\.001"),
        (dict(lr=float("nan"), base_width=64), ValueError, r"lr must be finite and > 0, got nan"),
        (dict(lr="1e-3", base_width=64), TypeError, r"lr must be a real number, got str '1e-3'"),
        (dict(lr=1e-3, base_width=0.5), ValueError, r"base_width must be finite and >= 1, got 0\.5"),
        (dict(lr=1e-3, base_width=0), ValueError, r"base_width must be finite and >= 1, got 0"),
        (dict(lr=1e-3, base_width=True), TypeError, r"base_width must be a real number, got bool True"),
        (dict(lr=1e-3, base_width=None), TypeError, r"base_width must be a real number, got NoneType None"),
    ],
)
def test_mup_param_groups_validates(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=r"mup_param_groups\(lr=.*, base_width=.*\): " + match):
        sm.mup_param_groups(sm.Dense(3, 2), **kwargs)


def test_mup_param_groups_rejects_non_modules_and_lazy_modules() -> None:
    with pytest.raises(TypeError, match=r"module must be a torch.nn.Module, got list"):
        sm.mup_param_groups([sm.Dense(3, 2)], lr=1e-3, base_width=8)
    with pytest.raises(ValueError, match=r"parameter 'weight' is uninitialized \(a lazy module\)"):
        sm.mup_param_groups(torch.nn.LazyLinear(4), lr=1e-3, base_width=8)
