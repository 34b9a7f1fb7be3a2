"""``structmat.nn.replace_linear``: swapping the ``nn.Linear`` layers of a model for structmat operators.

What is asserted:
- a dense-exact structure (full-rank ``LowRank``, ``Dense``) projected from the trained weights gives the same outputs
  (float64, a 12 -> 20 -> 7 MLP so that a swapped axis fails);
- a low-rank budget: each row's stated error equals the optimal truncated-SVD (Eckart–Young) error computed here from
  ``torch.linalg.svdvals``, the total error is their weight-norm-weighted combination, FLOPs and parameters drop and
  equal the counts written out by hand;
- the project's GPT with its MLP linears swapped: a near-exact rank keeps the loss close, the report's totals match
  the layers, a BTT template runs;
- include/exclude by pattern, type and predicate; tied layers; ``nn.MultiheadAttention`` left alone;
- the state dict loads into a model built the same way (``init="mup"``), and ``mup_param_groups`` works on it;
- dtype follows the layer; every user error, with its message, leaves the model untouched.
"""

from __future__ import annotations

import functools

import pytest
import torch

import structmat as sm
from structmat.nn import LayerReport, ReplaceReport, StructuredLinear, replace_linear
from structmat_attention import GPT, TransformerBlock, standard_attention

F64 = torch.float64


def mlp(seed: int = 0, dtype: torch.dtype = F64) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.GELU(), torch.nn.Linear(20, 7)).to(dtype)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize(
    "like",
    [
        ["lowrank({m}, {n}, rank=12)", "lowrank({m}, {n}, rank=7)"],
        "dense({m}, {n})",
        lambda m, n: sm.LowRank(m, n, rank=min(m, n)),
        lambda m, n: sm.Dense(m, n),
    ],
    ids=["lowrank-template", "dense-template", "lowrank-factory", "dense-factory"],
)
def test_exact_structure_keeps_outputs(like: object) -> None:
    model = mlp()
    x = torch.randn(5, 12, dtype=F64)
    before = model(x)
    if isinstance(like, list):  # full rank differs per layer: one template each
        first = replace_linear(model, like[0], include="0")
        second = replace_linear(model, like[1], include="2")
        report = ReplaceReport(
            first.rows + second.rows, 1, "project", 0.0, first.model_params_before, second.model_params_after
        )
    else:
        report = replace_linear(model, like)  # type: ignore[arg-type]
    assert isinstance(model[0], StructuredLinear) and isinstance(model[2], StructuredLinear)
    assert (model[0].in_features, model[0].out_features, model[2].in_features, model[2].out_features) == (12, 20, 20, 7)
    assert model[0].op.dtype == F64
    torch.testing.assert_close(model(x), before, rtol=1e-10, atol=1e-10)
    assert [r.name for r in report] == ["0", "2"] and len(report) == 2
    assert all(r.error is not None and r.error < 1e-12 for r in report)
    assert report.error is not None and report.error < 1e-12


def test_low_rank_budget_error_is_optimal_and_saves_flops() -> None:
    model = mlp()
    W = weights(model)
    report = replace_linear(model, "lowrank({m}, {n}, rank=3)", batch=10)
    sq_err = sq_norm = 0.0
    for row in report:
        w = W[row.name]
        s = torch.linalg.svdvals(w)
        best = float(s[3:].norm() / w.norm())
        assert row.error == pytest.approx(best, rel=1e-9)
        sq_err += float(s[3:].norm()) ** 2
        sq_norm += float(w.norm()) ** 2
        m, n = row.shape
        assert row.old_params == m * n + m and row.new_params == 3 * (m + n) + m
        assert row.old_flops == 2 * m * n * 10 and row.new_flops == 2 * 3 * (m + n) * 10
        assert row.new_flops < row.old_flops
    assert report.error == pytest.approx((sq_err / sq_norm) ** 0.5, rel=1e-9)
    assert report.old_flops == 2 * (12 * 20 + 20 * 7) * 10 and report.new_flops == 2 * 3 * (32 + 27) * 10
    assert report.model_params_before == 407 and report.model_params_after == 3 * 32 + 20 + 3 * 27 + 7
    text = str(report)
    assert "LowRank(20, 12, rank=3)" in text and "total (2)" in text and f"{report.old_flops:,}" in text


def test_mup_init_keeps_the_operators_own_init() -> None:
    model = mlp()
    torch.manual_seed(5)
    expected = sm.LowRank(20, 12, rank=2, dtype=F64)
    torch.manual_seed(5)
    report = replace_linear(model, lambda m, n: sm.LowRank(m, n, rank=2, dtype=F64), init="mup", include="0")
    torch.testing.assert_close(model[0].op.dense(), expected.dense())
    assert report.error is None and report.rows[0].error is None and "-" in str(report)


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(13, 16, 2, 2, max_seq_len=8, attention=standard_attention, dtype=F64)


def lm_loss(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(tokens[:, :-1])
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, 13), tokens[:, 1:].reshape(-1)))


def test_gpt_mlp_swap_near_exact_rank_keeps_loss() -> None:
    model = tiny_gpt()
    tokens = torch.randint(0, 13, (4, 8))
    before = lm_loss(model, tokens)
    mlps = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".mlp." in n}
    report = replace_linear(model, "lowrank({m}, {n}, rank=15)", include="blocks.*.mlp.*", batch=7 * 4)
    assert (
        [r.name for r in report]
        == sorted(mlps)
        == ["blocks.0.mlp.0", "blocks.0.mlp.2", "blocks.1.mlp.0", "blocks.1.mlp.2"]
    )
    assert isinstance(model.head, torch.nn.Linear)  # not matched
    assert report.old_params == sum(p.numel() for m in mlps.values() for p in m.parameters()) == 2 * (2 * 16 * 64 + 80)
    assert report.new_params == 2 * (2 * 15 * 80 + 80)
    assert report.old_flops == 4 * 2 * 16 * 64 * 28 and report.new_flops == 4 * 2 * 15 * 80 * 28
    assert report.error is not None and report.error < 0.2
    after = lm_loss(model, tokens)
    assert abs(after - before) < 0.02 * before
    assert report.model_params_after == sum(p.numel() for p in model.parameters())


def test_gpt_btt_template_saves_flops() -> None:
    model = tiny_gpt()
    report = replace_linear(model, "btt({m}, {n}, ranks=1)", include=TransformerBlock)
    assert len(report) == 4 and report.new_flops < report.old_flops
    assert all(r.error is not None and 0 < r.error < 1 for r in report)
    assert model(torch.randint(0, 13, (2, 5))).shape == (2, 5, 13)


def test_include_exclude() -> None:
    def names(**kw: object) -> list[str]:
        return [r.name for r in replace_linear(tiny_gpt(), "dense({m}, {n})", init="mup", **kw)]  # type: ignore[arg-type]

    assert names() == ["blocks.0.mlp.0", "blocks.0.mlp.2", "blocks.1.mlp.0", "blocks.1.mlp.2", "head"]
    assert names(include=["head", "blocks.1.*"]) == ["blocks.1.mlp.0", "blocks.1.mlp.2", "head"]
    assert names(exclude="*.mlp.2") == ["blocks.0.mlp.0", "blocks.1.mlp.0", "head"]
    assert names(include=TransformerBlock, exclude=["blocks.0.*"]) == ["blocks.1.mlp.0", "blocks.1.mlp.2"]
    assert names(include=lambda name, m: m.out_features == 16) == ["blocks.0.mlp.2", "blocks.1.mlp.2"]
    assert names(exclude=(TransformerBlock,)) == ["head"]


def test_tied_layer_and_multihead_attention() -> None:
    torch.manual_seed(0)
    shared = torch.nn.Linear(6, 6, dtype=F64)
    model = torch.nn.Sequential(shared, torch.nn.Tanh(), shared)
    x = torch.randn(3, 6, dtype=F64)
    before = model(x)
    report = replace_linear(model, "dense({m}, {n})")
    assert [r.name for r in report] == ["0"] and model[0] is model[2]
    torch.testing.assert_close(model(x), before)

    class WithMHA(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
            self.out = torch.nn.Linear(8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.attn(x, x, x)[0])

    net = WithMHA()
    report = replace_linear(net, "lowrank({m}, {n}, rank=2)")
    assert [r.name for r in report] == ["out"] and isinstance(net.attn.out_proj, torch.nn.Linear)
    assert net(torch.randn(2, 3, 8)).shape == (2, 3, 5)


def test_state_dict_round_trip() -> None:
    model = tiny_gpt(0)
    replace_linear(model, "lowrank({m}, {n}, rank=4)", include="blocks.*.mlp.*")
    state = model.state_dict()
    assert "blocks.0.mlp.0.op.U" in state and "blocks.0.mlp.0.bias" in state and "blocks.0.mlp.0.weight" not in state
    other = tiny_gpt(1)
    replace_linear(other, "lowrank({m}, {n}, rank=4)", include="blocks.*.mlp.*", init="mup")
    other.load_state_dict(state)
    tokens = torch.randint(0, 13, (2, 6))
    torch.testing.assert_close(other(tokens), model(tokens))


def test_mup_param_groups_on_the_result() -> None:
    model = mlp()
    replace_linear(model, "lowrank({m}, {n}, rank=3)", include="0")
    groups = sm.mup_param_groups(model, lr=1.0, base_width=12)
    by_name = {name: g["lr"] for g in groups for name in g["names"]}
    assert sorted(by_name) == sorted(n for n, _ in model.named_parameters())
    fans = sm.init.parameter_fans(model[0].op)
    assert by_name["0.op.U"] == pytest.approx(12 / fans["U"][0]) and by_name["0.op.V"] == pytest.approx(
        12 / fans["V"][0]
    )
    assert by_name["0.bias"] == 1.0 and by_name["2.weight"] == pytest.approx(12 / 20)
    opt = torch.optim.AdamW(groups)
    model(torch.randn(4, 12, dtype=F64)).sum().backward()
    opt.step()


def test_dtype_follows_the_layer() -> None:
    model = mlp(dtype=torch.float32)
    replace_linear(model, lambda m, n: sm.LowRank(m, n, rank=2, dtype=F64), include="0")
    replace_linear(model, "lowrank({m}, {n}, rank=2)", include="2")
    assert model[0].op.dtype == torch.float32 and model[2].op.dtype == torch.float32
    assert model(torch.randn(2, 12)).dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"like": "lowrank({m}, {x}, rank=2)"}, ValueError, r"names the field \{x\}"),
        ({"like": "lowrank({m}, {n}, rank=12)"}, ValueError, r"layer '2' \(7x20\) reads .* rank must be <= min"),
        (
            {"like": "lowrank({m}, {n}, rank=2"},
            ValueError,
            r"template .* reads 'lowrank\(20, 12, rank=2', which does not build",
        ),
        ({"like": "lowrank({m}, {n}, rank={)"}, ValueError, "not a valid format string"),
        ({"like": lambda m, n: sm.LowRank(n, m, rank=2)}, ValueError, r"shape \(12, 20\) for layer '0'.*\(20, 12\)"),
        ({"like": lambda m, n: torch.zeros(m, n)}, TypeError, "must return a structmat LinearOperator.*Tensor"),
        ({"like": lambda m, n: sm.Dense(m, n, heads=2)}, ValueError, "heads=2"),
        ({"like": sm.Dense(20, 12)}, TypeError, "every layer needs its own operator"),
        ({"like": 3}, TypeError, "like must be a factory"),
        ({"like": "dense({m}, {n})", "init": "svd"}, ValueError, "init must be 'project' or 'mup', got 'svd'"),
        ({"like": "dense({m}, {n})", "batch": 0}, ValueError, "batch"),
        ({"like": "dense({m}, {n})", "include": "mlp.*"}, ValueError, r"no layer matched.*layers are: 0, 2"),
        ({"like": "dense({m}, {n})", "include": 3}, TypeError, "include must be None"),
        ({"like": "dense({m}, {n})", "exclude": [1]}, TypeError, "exclude must be None"),
        ({"like": "dense({m}, {n})", "include": lambda n, m: 1}, TypeError, "include predicate must return a bool"),
    ],
)
def test_errors_leave_the_model_untouched(kwargs: dict[str, object], error: type, match: str) -> None:
    model = mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        replace_linear(model, **kwargs)  # type: ignore[arg-type]
    assert isinstance(model[0], torch.nn.Linear) and isinstance(model[2], torch.nn.Linear)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_error_on_second_layer_replaces_nothing() -> None:
    model = mlp()
    with pytest.raises(ValueError, match="layer '2'"):
        replace_linear(model, lambda m, n: sm.Dense(m, 12))
    assert isinstance(model[0], torch.nn.Linear)


def test_model_errors() -> None:
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        replace_linear("model", "dense({m}, {n})")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"model is itself an nn.Linear \(7x5\)"):
        replace_linear(torch.nn.Linear(5, 7), "dense({m}, {n})")
    with pytest.raises(ValueError, match="it has no nn.Linear layer"):
        replace_linear(torch.nn.Sequential(torch.nn.ReLU()), "dense({m}, {n})")
    lazy = torch.nn.Sequential(torch.nn.LazyLinear(4))
    with pytest.raises(ValueError, match="LazyLinear that is not initialized"):
        replace_linear(lazy, "dense({m}, {n})")
    with pytest.raises(ValueError, match=r"bias must have shape \(out_features,\)=\(6,\)"):
        StructuredLinear(sm.Dense(6, 4), torch.zeros(4))
    with pytest.raises(TypeError, match="op must be a structmat LinearOperator"):
        StructuredLinear(torch.nn.Linear(4, 6))  # type: ignore[arg-type]


def test_report_types() -> None:
    report = replace_linear(mlp(), functools.partial(sm.LowRank, rank=2))
    assert isinstance(report, ReplaceReport) and all(isinstance(r, LayerReport) for r in report)
    assert report.batch == 1 and report.init == "project"


def test_rank_budget_fills_templates_and_factories():
    """``rank_budget`` is ``{r}`` in a template and the third argument of a factory, capped at ``min(m, n)``; a
    budget with no ``{r}`` to put it in, or ``{r}`` without a budget, is an error (never silently ignored)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.GELU(), torch.nn.Linear(20, 7)).double()
    report = replace_linear(model, "lowrank({m}, {n}, rank={r})", rank_budget=9)
    assert [r.structure for r in report] == [sm.LowRank(20, 12, rank=9).name, sm.LowRank(7, 20, rank=7).name]
    assert report.rows[1].error == pytest.approx(0.0, abs=1e-12)  # capped at min(m, n) = 7: exact
    seen = []
    model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.GELU(), torch.nn.Linear(20, 7))
    replace_linear(model, lambda m, n, r: seen.append((m, n, r)) or sm.LowRank(m, n, rank=r), rank_budget=9)
    assert seen == [(20, 12, 9), (7, 20, 7)]
    model = torch.nn.Sequential(torch.nn.Linear(12, 20))
    with pytest.raises(ValueError, match=r"rank_budget=3 is given but the template 'btt\(\{m\}, \{n\}, ranks=2\)'"):
        replace_linear(model, "btt({m}, {n}, ranks=2)", rank_budget=3)
    with pytest.raises(ValueError, match=r"uses \{r\}: give rank_budget="):
        replace_linear(model, "lowrank({m}, {n}, rank={r})")
    with pytest.raises(ValueError, match=r"rank_budget must be None or an int >= 1, got 0"):
        replace_linear(model, "lowrank({m}, {n}, rank={r})", rank_budget=0)
    assert isinstance(model[0], torch.nn.Linear)  # every error left the model untouched
