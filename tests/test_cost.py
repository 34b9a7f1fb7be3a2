"""Exact-integer costs, derived by hand in each test (FLOPs in opt_einsum's convention: a multiply-add counts 2).

Notation: ``b`` is the batch (number of input vectors); ``Dense(m, n)`` maps ``(b, n) -> (b, m)``.
"""

from __future__ import annotations

import opt_einsum as oe
import pytest
import torch

import structmat as sm


def optimal(eq: str, *shapes: tuple[int, ...]) -> int:
    return int(oe.contract_path(eq, *shapes, shapes=True, optimize="optimal")[1].opt_cost)


@pytest.mark.parametrize("m, r, n, b", [(5, 3, 7, 2), (12, 2, 7, 3), (7, 1, 12, 5), (64, 8, 64, 1), (3, 2, 5, 7)])
def test_low_rank_product(m, r, n, b):
    # y = U (V x): V x is b*r*n multiply-adds, U (.) is b*m*r: b*r*(m+n) MACs, 2*b*r*(m+n) FLOPs.
    # Forming U V first would cost 2*m*r*n + 2*b*m*n; every case here has br(m+n) < mrn + bmn, so x goes first.
    assert b * r * (m + n) < m * r * n + b * m * n
    cost = (sm.Dense(m, r) @ sm.Dense(r, n)).cost(batch=b)
    assert cost.flops == 2 * b * r * (m + n)
    assert cost.macs == b * r * (m + n)
    assert cost.dense_flops == 2 * m * n * b
    assert cost.batch == b and cost.shape == (m, n)
    assert len(cost.contractions) == 1  # fused into one einsum


@pytest.mark.parametrize("m, n, b", [(5, 7, 1), (7, 5, 3), (12, 3, 2)])
def test_dense(m, n, b):
    # y[z,o] = sum_i W[o,i] x[z,i]: b*m*n multiply-adds.
    cost = sm.Dense(m, n).cost(batch=b)
    assert cost.flops == 2 * b * m * n
    assert cost.macs == b * m * n
    assert cost.speedup == 1.0


@pytest.mark.parametrize("n, b", [(5, 1), (7, 3)])
def test_identity_is_free(n, b):
    cost = sm.Identity(n).cost(batch=b)
    assert cost.flops == 0 and cost.macs == 0
    assert cost.speedup == float("inf")


@pytest.mark.parametrize("n, b", [(5, 1), (7, 3), (12, 4)])
def test_diagonal(n, b):
    # y[z,i] = d[i] x[z,i]: one multiply per output element, no additions: b*n.
    cost = sm.Diagonal(n).cost(batch=b)
    assert cost.flops == b * n
    assert cost.macs == b * n


def test_sum_adds_the_additions():
    # Two Dense(5, 7) at b=3: 2 * (2*3*5*7) = 420, plus one addition per output element: 3*5 = 15.
    m, n, b = 5, 7, 3
    cost = (sm.Dense(m, n) + sm.Dense(m, n)).cost(batch=b)
    assert cost.flops == 2 * (2 * b * m * n) + b * m == 435
    assert cost.macs == 2 * b * m * n  # additions are not MACs


def test_sum_of_three_adds_two_additions_per_output():
    m, n, b = 5, 7, 3
    cost = sm.Sum(sm.Dense(m, n), sm.Dense(m, n), sm.Dense(m, n)).cost(batch=b)
    assert cost.flops == 3 * (2 * b * m * n) + 2 * b * m == 660


def test_sum_with_identity():
    # Dense(7,7) + Identity(7) at b=2: 2*2*7*7 = 196 for the dense term, 0 for the identity, 2*7 = 14 additions.
    assert (sm.Dense(7, 7) + sm.Identity(7)).cost(batch=2).flops == 196 + 14


@pytest.mark.parametrize(
    "m, n, b, flops, macs",
    [
        # The scale multiplies whichever is smaller at this batch: the smallest factor or the output (b*m).
        # 0.5 * Dense(6, 10), b=1: output 6 < W's 60: 2*6*10 + 6 = 126 flops, 60 + 6 = 66 MACs.
        (6, 10, 1, 126, 66),
        # b=10: output 60 is not smaller than W's 60 (a tie keeps the output): 1200 + 60, 600 + 60.
        (6, 10, 10, 1260, 660),
        # b=100: W's 60 < output 600: 12000 + 60, 6000 + 60.
        (6, 10, 100, 12060, 6060),
        # 5 x 7 at b=3: output 15 < W's 35: 210 + 15, 105 + 15.
        (5, 7, 3, 225, 120),
    ],
)
def test_scaled_dense_scales_the_smaller_of_weight_and_output(m, n, b, flops, macs):
    op = 0.5 * sm.Dense(m, n, dtype=torch.float64)
    cost = op.cost(batch=b)
    assert (cost.flops, cost.macs) == (flops, macs)
    # the apply computes the same map wherever the scale goes
    x = torch.randn(b, n, dtype=torch.float64)
    torch.testing.assert_close(op(x), 0.5 * x @ op.op.weight.T)


def test_scaled_low_rank_moves_the_scale_with_the_batch():
    # 2 * LowRank(20, 30, rank=2): factors U (20x2 = 40) and V (2x30 = 60); the plain cost is 2*b*(30*2 + 2*20) = 200b.
    # b=1: output 20 < 40, so the output is scaled: 200 + 20. b=4: output 80 > 40, U is scaled: 800 + 40.
    op = 2.0 * sm.LowRank(20, 30, rank=2, dtype=torch.float64)
    assert [op.cost(b).flops for b in (1, 4)] == [220, 840]
    assert [op.cost(b).macs for b in (1, 4)] == [100 + 20, 400 + 40]
    for b in (1, 4):
        x = torch.randn(b, 30, dtype=torch.float64)
        torch.testing.assert_close(op(x), 2.0 * op.op(x))


def test_scaled_identity():
    # No factor to carry the scale: it multiplies the output, b*n = 3*5 = 15; each is one multiplication (a MAC).
    cost = (-0.5 * sm.Identity(5)).cost(batch=3)
    assert (cost.flops, cost.macs) == (15, 15)


def test_scaled_gradients_reach_the_weight_wherever_the_scale_goes():
    # d/dW sum(c * W x) = c * sum_b x_b: the same at b=1 (scale on the output) and b=100 (scale on W).
    for b in (1, 100):
        op = 0.5 * sm.Dense(6, 10, dtype=torch.float64)
        x = torch.randn(b, 10, dtype=torch.float64)
        op(x).sum().backward()
        torch.testing.assert_close(op.op.weight.grad, 0.5 * x.sum(0).expand(6, 10))


def test_block_diag_adds_nothing():
    # Blocks write disjoint slices: Dense(5,7) costs 2*3*35 = 210 and Dense(3,2) 2*3*6 = 36 at b=3; no additions.
    cost = sm.block_diag(sm.Dense(5, 7), sm.Dense(3, 2)).cost(batch=3)
    assert cost.flops == 210 + 36 == 246
    assert cost.macs == 105 + 18


# thin-thin-wide-thin: W1 (64,2) @ W2 (2,64) @ W3 (64,2) @ W4 (2,64)
CHAIN_EQ = "zi,pi,qp,rq,or->zo"  # x[z,i], W4[p,i], W3[q,p], W2[r,q], W1[o,r]
CHAIN_SHAPES = ((64, 2), (2, 64), (64, 2), (2, 64))  # W1, W2, W3, W4


def _chain_factors() -> list[sm.Dense]:
    return [sm.Dense(m, n) for m, n in CHAIN_SHAPES]


@pytest.mark.parametrize("b", [2, 8, 33])
def test_reassociation_pays(b):
    # One by one, each factor costs 2*b*64*2 = 256b: 1024b in all. Reassociated: x -> W4 (256b), the 2x2 core
    # W2 W3 formed once (2*2*64*2 = 512), then (.)(2x2) (8b), then W1 (256b): 520b + 512 < 1024b for b >= 2.
    ops = _chain_factors()
    chain = sm.Product(*ops)
    cost = chain.cost(batch=b)
    one_by_one = sum(op.cost(batch=b).flops for op in ops)
    assert one_by_one == 1024 * b
    assert cost.flops < one_by_one
    assert len(cost.contractions) == 1
    expected = optimal(CHAIN_EQ, (b, 64), *reversed(CHAIN_SHAPES))
    assert cost.flops == expected
    assert cost.flops == min(1024 * b, 520 * b + 512)


def test_reassociation_does_not_pay_for_one_vector():
    # At b=1 the two orders cost the same (1024 vs 520 + 512 = 1032): the plan keeps the cheaper, 1024.
    chain = sm.Product(*_chain_factors())
    assert chain.cost(batch=1).flops == 1024 == optimal(CHAIN_EQ, (1, 64), *reversed(CHAIN_SHAPES))


def test_chained_product_costs_its_parts():
    # kron(Dense(6,2), Dense(5,6)) reads its input as modes (2, 6); the block-diagonal network writes (3, 4):
    # 2*6 and 3*4 have no common row-major refinement (3 does not divide 2), so the product is a chain of two einsums.
    # Kronecker at batch b: x (b,2,6) -> Dense(5,6) on the 6 (2*b*2*6*5 = 120b) -> Dense(6,2) on the 2 (120b): 240b.
    # Block-diagonal "y[b,o] = W[b,o,i] x[b,i]" with b=3, o=4, i=2: 2*b*3*4*2 = 48b. Chain: 288b.
    kron = sm.kron(sm.Dense(6, 2), sm.Dense(5, 6))
    blocks = sm.TensorNetwork("y[b,o] = W[b,o,i] x[b,i]", sizes=dict(b=3, o=4, i=2))
    product = kron @ blocks
    for batch in (1, 3, 7):
        cost = product.cost(batch=batch)
        assert kron.cost(batch=batch).flops == 240 * batch
        assert blocks.cost(batch=batch).flops == 48 * batch
        assert cost.flops == kron.cost(batch=batch).flops + blocks.cost(batch=batch).flops == 288 * batch
        assert cost.macs == kron.cost(batch=batch).macs + blocks.cost(batch=batch).macs
        assert len(cost.contractions) == 2


def test_kronecker_of_two_dense():
    # A (3,5) ⊗ B (7,2) on x viewed as (b,5,2): A on the 5 costs 2*b*5*2*3 = 60b, giving (b,3,2); B on the 2 costs
    # 2*b*3*2*7 = 84b: 144b. The other order: B first 2*b*5*2*7 = 140b, then A 2*b*5*7*3 = 210b. At b=4: 576.
    cost = sm.kron(sm.Dense(3, 5), sm.Dense(7, 2)).cost(batch=4)
    assert cost.flops == 144 * 4 == 576
    assert cost.flops == optimal("zab,ca,db->zcd", (4, 5, 2), (3, 5), (7, 2))
    assert len(cost.contractions) == 1
    assert cost.dense_flops == 2 * 21 * 10 * 4


def test_speedup_is_dense_over_flops():
    op = sm.Dense(64, 8) @ sm.Dense(8, 64)
    cost = op.cost(batch=3)
    # dense 2*64*64*3 = 24576; low rank 2*3*8*128 = 6144: speedup 4.
    assert cost.dense_flops == 24576 and cost.flops == 6144
    assert cost.speedup == cost.dense_flops / cost.flops == 4.0


def test_largest_intermediate_of_low_rank():
    # U (5,3) V (3,7), b=2: V x is (2,3) = 6 elements, the output (2,5) = 10: the largest is the output.
    assert (sm.Dense(5, 3) @ sm.Dense(3, 7)).cost(batch=2).largest_intermediate == 10
    # U (3,5) V (5,12), b=4: V x is (4,5) = 20 elements, the output (4,3) = 12: the largest is V x.
    # (x first: 2*4*5*(3+12) = 600 < forming U V, 2*3*5*12 + 2*4*3*12 = 648.)
    cost = (sm.Dense(3, 5) @ sm.Dense(5, 12)).cost(batch=4)
    assert cost.flops == 600
    assert cost.largest_intermediate == 20


def test_str_shows_the_counts():
    cost = (sm.Dense(64, 8) @ sm.Dense(8, 64)).cost(batch=3)
    text = str(cost)
    assert f"{cost.flops:,}" in text and "6,144" in text
    assert f"{cost.dense_flops:,}" in text
    assert cost.contractions[0].equation in text


def test_path_names_each_einsum():
    cost = (sm.Dense(5, 3) @ sm.Dense(3, 7)).cost(batch=2)
    ((eq, path),) = cost.path
    assert eq == cost.contractions[0].equation and eq.startswith("z")
    assert len(path) == 2  # three operands, two pairwise contractions


def test_cost_on_meta_device():
    # Two 10^6 x 10^6 dense matrices: 8 TB in float32 if allocated. The queries read shapes only.
    # Product at b=1 (x first): 2 * 10^6 * 10^6 + 2 * 10^6 * 10^6 = 4 * 10^12.
    a = sm.Dense(10**6, 10**6, device="meta")
    b = sm.Dense(10**6, 10**6, device="meta")
    op = a @ b
    cost = op.cost(batch=1)
    assert cost.flops == 4 * 10**12
    assert cost.dense_flops == 2 * 10**12
    assert op.rank().bound == 10**6
    assert op.num_params == 2 * 10**12
    assert a.weight.is_meta and b.weight.is_meta
    assert op.device == torch.device("meta")


def test_cost_on_meta_device_low_rank():
    op = sm.Dense(10**6, 4, device="meta") @ sm.Dense(4, 10**6, device="meta")
    assert op.cost(batch=5).flops == 2 * 5 * 4 * 2 * 10**6
    assert op.rank().bound == 4 and op.rank().exact


def test_many_part_kronecker_plans_quickly_and_exactly():
    # 16 parts: the exact path searches would take minutes; the greedy one contracts x with one part at a time.
    # Each step sums over one input index of size 2 for each of the 2^16 output entries (15 untouched modes, the
    # part's output index, batch 1): 2^17 index combinations, a multiply-add each = 2 * 2^17 flops; 16 steps.
    op = sm.kron(*[sm.Dense(2, 2) for _ in range(16)])
    c = op.cost(1)
    assert c.flops == 16 * 2 * 2**17
    assert len(c.contractions) == 1 and len(c.contractions[0].path) == 16
