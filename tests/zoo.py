"""The test registry: one entry per public operator class, with everything the family-level tests need.

Every public ``LinearOperator`` subclass in ``structmat.__all__`` has one :class:`Family` entry in :data:`FAMILIES`
(tests/test_registry.py fails otherwise). An entry holds:

- ``members``: small float64 operators of the class (distinct sizes 2, 3, 4, 5, 6, 7, 12 ... so that a swapped axis
  fails; non-default factor splits where the family has them), each a factory so that a test can build two instances
  with different parameters (a seed before each call). Together they make the operator zoo :data:`ZOO`, over which
  the contract, queries, expression, freeze, execution, CLI and torch-integration tests run.
- ``stacks``: builders taking ``heads`` (None for one operator, an int for a stack of that many): :data:`STACKS`.
- ``exprs``: expressions that parse to the class and print back to the same text.
- ``projection``: the class's projection rule (it must equal the class's ``projection`` attribute): ``"closed form"``
  (then ``exact`` must hold members whose projection recovers them exactly: :data:`CLOSED_FORMS`), ``"parts"``,
  ``"levels"``, ``"fixed"`` or ``"gradient"`` (the explicit gradient fallback mark).
- ``reference``: the dense matrix from the math, ``(op) -> (m, n)`` or ``(H, m, n)`` for a stack, written without
  structmat's networks; None when tests/reference.py has it.

Adding a family adds one entry here (see CONTRIBUTING.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import structmat as sm

F64 = torch.float64

Make = Callable[[], sm.LinearOperator]
MakeStack = Callable[[int | None], sm.LinearOperator]


@dataclass(frozen=True)
class Family:
    """The test registry's entry for one public operator class (see the module documentation)."""

    cls: type[sm.LinearOperator]
    members: dict[str, Make]
    projection: str
    exprs: tuple[str, ...] = ()
    stacks: dict[str, MakeStack] = field(default_factory=dict)
    exact: dict[str, Make] = field(default_factory=dict)
    reference: Callable[[sm.LinearOperator], torch.Tensor] | None = None


def dense(m: int, n: int, heads: int | None = None) -> sm.Dense:
    if heads is not None:
        return sm.Dense(m, n, heads=heads, dtype=F64)
    return sm.Dense.from_tensor(torch.randn(m, n, dtype=F64))


def diag(n: int) -> sm.Diagonal:
    return sm.Diagonal.from_tensor(torch.randn(n, dtype=F64))


def perm(n: int) -> sm.Permutation:
    """A fixed permutation per size: structure, unlike parameters, does not change with the seed."""
    return sm.Permutation(torch.randperm(n, generator=torch.Generator().manual_seed(n)).tolist())


def tn(spec: str, **sizes: int) -> sm.TensorNetwork:
    return sm.TensorNetwork(spec, sizes=sizes, dtype=F64)


def lowrank_tn(m: int, r: int, n: int) -> sm.TensorNetwork:
    return tn("y[o] = U[o,r] V[r,i] x[i]", o=m, r=r, i=n)


def btt(m: int, n: int, s: int, fin: tuple[int, ...], fout: tuple[int, ...], heads: int | None = None) -> Make:
    return lambda: sm.BTT(m, n, ranks=s, in_factors=fin, out_factors=fout, heads=heads, dtype=F64)


def chain(heads: int | None = None) -> sm.LinearOperator:
    """``A (12x3) @ B (3x5) @ C (5x12)``."""
    return dense(12, 3, heads) @ dense(3, 5, heads) @ dense(5, 12, heads)


def _shared() -> sm.LinearOperator:
    a = dense(5, 5)
    return a + a.T


def block_lowrank_reference(op: sm.LinearOperator) -> torch.Tensor:
    """``BlockLowRank`` from its definition: block ``(P, Q)``, rows ``P s ..`` and columns ``Q t ..``, is
    ``U[P, Q] @ V[P, Q]``; written block by block with slicing and matmul."""
    U, V = op.U.detach(), op.V.detach()
    p, q, s, _ = U.shape[-4:]
    t = V.shape[-1]
    W = U.new_zeros(*U.shape[:-4], p * s, q * t)
    for P in range(p):
        for Q in range(q):
            W[..., P * s : (P + 1) * s, Q * t : (Q + 1) * t] = U[..., P, Q, :, :] @ V[..., P, Q, :, :]
    return W


_FAMILIES = [
    # -- leaves ------------------------------------------------------------------------------------------------------
    Family(
        sm.Dense,
        members={"dense": lambda: dense(5, 7), "dense_column": lambda: dense(4, 1)},
        projection="closed form",
        exprs=("dense(5, 7)", "dense(3, 4, heads=2)"),
        stacks={"dense": lambda heads: sm.Dense(5, 4, heads=heads, dtype=F64)},
        exact={"dense": lambda: sm.Dense(5, 7, dtype=F64), "dense_heads": lambda: sm.Dense(5, 7, heads=3, dtype=F64)},
    ),
    Family(sm.Identity, members={"identity": lambda: sm.Identity(6)}, projection="fixed", exprs=("identity(6)",)),
    Family(
        sm.Diagonal,
        members={"diagonal": lambda: diag(5)},
        projection="closed form",
        exprs=("diag(5)",),
        exact={"diagonal": lambda: diag(6)},
    ),
    Family(
        sm.Permutation,
        members={
            "permutation": lambda: perm(7),
            "axis_permutation": lambda: sm.Permutation.from_axes((3, 4, 2), (2, 0, 1)),
        },
        projection="fixed",
        exprs=("permutation([2, 0, 1])", "permute_axes([3, 4, 2], [2, 0, 1])"),
    ),
    Family(
        sm.TensorNetwork,
        members={
            "tn_lowrank": lambda: lowrank_tn(5, 2, 7),
            "tn_blockdiag": lambda: tn("y[b,o] = W[b,o,i] x[b,i]", b=3, o=2, i=5),
            "tn_monarch": lambda: tn("y[c,d] = L[c,d,a] R[a,c,b] x[a,b]", a=2, b=3, c=4, d=5),
            "tn_tt3": lambda: tn(
                "y[o1,o2,o3] = A[o1,i1,p] B[p,o2,i2,q] C[q,o3,i3] x[i1,i2,i3]",
                o1=2,
                i1=3,
                p=2,
                o2=3,
                i2=2,
                q=3,
                o3=2,
                i3=2,
            ),
            "tn_ones_input": lambda: tn("y[o] = W[o,i] s[a] x[a,i]", o=4, i=3, a=2),
        },
        projection="gradient",
        exprs=('tensor_network("y[o] = U[o,r] V[r,i] x[i]", sizes=dict(o=5, r=2, i=7))',),
        stacks={
            "tensor_network": lambda heads: sm.TensorNetwork(
                "y[c,d] = L[c,d,a] R[a,c,b] x[a,b]", sizes=dict(a=2, b=3, c=4, d=5), heads=heads, dtype=F64
            )
        },
    ),
    # -- families ----------------------------------------------------------------------------------------------------
    Family(
        sm.LowRank,
        members={"lowrank": lambda: sm.LowRank(7, 5, rank=2, dtype=F64)},
        projection="closed form",
        exprs=("lowrank(12, 7, rank=3)", "lowrank(12, 7, rank=1, heads=2)"),
        stacks={"lowrank": lambda heads: sm.LowRank(7, 5, rank=2, heads=heads, dtype=F64)},
        exact={
            "lowrank": lambda: sm.LowRank(13, 17, 3, dtype=F64),
            "lowrank_full": lambda: sm.LowRank(5, 7, 5, dtype=F64),
            "lowrank_heads": lambda: sm.LowRank(13, 17, 2, heads=3, dtype=F64),
        },
    ),
    Family(
        sm.BlockLowRank,
        members={"block_lowrank": lambda: sm.BlockLowRank(12, 15, p=3, q=5, rank=2, dtype=F64)},
        projection="closed form",
        exprs=("block_lowrank(12, 15, p=3, q=5, rank=2)", "block_lowrank(12, 10, p=4, q=2, rank=1, heads=2)"),
        stacks={"block_lowrank": lambda heads: sm.BlockLowRank(12, 15, p=3, q=5, rank=2, heads=heads, dtype=F64)},
        exact={
            "block_lowrank_r1": lambda: sm.BlockLowRank(12, 15, p=3, q=5, rank=1, dtype=F64),
            "block_lowrank_r2": lambda: sm.BlockLowRank(12, 15, p=3, q=5, rank=2, dtype=F64),
            "block_lowrank_full_blocks": lambda: sm.BlockLowRank(12, 15, p=3, q=5, rank=3, dtype=F64),
            "block_lowrank_heads": lambda: sm.BlockLowRank(12, 10, p=2, q=5, rank=1, heads=3, dtype=F64),
        },
        reference=block_lowrank_reference,
    ),
    Family(
        sm.BlockTensorTrain,
        members={
            "btt2": lambda: sm.BTT(12, 10, ranks=2, dtype=F64),  # balanced splits (3, 4) x (2, 5)
            "btt3": lambda: sm.BTT(12, 8, ranks=[2, 3], in_factors=(2, 2, 2), out_factors=(3, 2, 2), dtype=F64),
        },
        projection="closed form",
        exprs=(
            "btt(64, 64, ranks=2)",
            "btt(64, 48, ranks=[2, 3], in_factors=[4, 4, 3], out_factors=[4, 4, 4])",
            "btt(64, 64, ranks=2, in_factors=[4, 16], out_factors=[8, 8], heads=3)",
        ),
        stacks={
            "btt2": lambda heads: sm.BTT(12, 10, ranks=2, heads=heads, dtype=F64),
            "btt3": lambda heads: sm.BTT(
                12, 8, ranks=[2, 3], in_factors=(2, 2, 2), out_factors=(3, 2, 2), heads=heads, dtype=F64
            ),
        },
        exact={
            "btt_s1": btt(28, 15, 1, (3, 5), (4, 7)),
            "btt_s2": btt(28, 15, 2, (3, 5), (4, 7)),
            "btt_s3": btt(28, 15, 3, (3, 5), (4, 7)),
            "btt_s5_full_blocks": btt(28, 15, 5, (3, 5), (4, 7)),
            "btt_s6_past_block_rank": btt(28, 15, 6, (3, 5), (4, 7)),
            "btt_wide": btt(10, 42, 2, (7, 6), (2, 5)),
            "btt_heads": btt(28, 15, 2, (3, 5), (4, 7), heads=2),
        },
    ),
    Family(
        sm.Monarch,
        members={
            "monarch": lambda: sm.Monarch(6, 9, nblocks=3, dtype=F64),
            "monarch_rect": lambda: sm.Monarch(8, 12, nblocks=2, dtype=F64),
            "monarch_chained": lambda: sm.Monarch(12, 20, nblocks=4, dtype=F64),  # q = 3, k = 4: R and L do not fuse
        },
        projection="closed form",
        exprs=("monarch(12, 20, nblocks=4)", "monarch(16, 16, nblocks=2, heads=2)"),
        stacks={"monarch": lambda heads: sm.Monarch(8, 12, nblocks=2, heads=heads, dtype=F64)},
        exact={
            "monarch_1": lambda: sm.Monarch(18, 30, nblocks=1, dtype=F64),
            "monarch_2": lambda: sm.Monarch(18, 30, nblocks=2, dtype=F64),
            "monarch_3": lambda: sm.Monarch(18, 30, nblocks=3, dtype=F64),
            "monarch_6": lambda: sm.Monarch(18, 30, nblocks=6, dtype=F64),
            "monarch_tall": lambda: sm.Monarch(35, 10, nblocks=5, dtype=F64),
            "monarch_heads": lambda: sm.Monarch(18, 30, nblocks=3, heads=2, dtype=F64),
        },
    ),
    Family(
        sm.TensorTrain,
        members={
            "tt": lambda: sm.TT(12, 8, ranks=[2, 3], in_factors=(2, 2, 2), out_factors=(3, 2, 2), dtype=F64),
        },
        projection="gradient",
        exprs=("tt(64, 64, ranks=3)", "tt(27, 8, ranks=[2, 1], in_factors=[2, 2, 2], out_factors=[3, 3, 3])"),
        stacks={
            "tt": lambda heads: sm.TT(
                12, 8, ranks=[2, 3], in_factors=(2, 2, 2), out_factors=(3, 2, 2), heads=heads, dtype=F64
            )
        },
    ),
    Family(
        sm.MultiLevelLowRank,
        members={
            "mlr": lambda: sm.MLR(12, 8, ranks=[2, 1], blocks=[1, 4], dtype=F64),
            "mlr_unequal": lambda: sm.MLR(9, 7, ranks=[2, 1], blocks=[1, [(4, 3), (5, 4)]], dtype=F64),
        },
        projection="levels",
        exprs=(
            "mlr(16, 16, ranks=[2, 1, 1], blocks=[1, 2, 4])",
            "mlr(10, 10, ranks=[2, 1], blocks=[1, [[4, 4], [6, 6]]])",
            "mlr(12, 8, ranks=[1, 1], blocks=[2, 4], heads=3)",
        ),
        stacks={"mlr": lambda heads: sm.MLR(12, 8, ranks=[2, 1, 1], blocks=[1, 2, 4], heads=heads, dtype=F64)},
        exact={"mlr_one_level": lambda: sm.MLR(24, 36, ranks=[3], blocks=[1], dtype=F64)},
    ),
    Family(
        sm.MultiLevel,
        members={
            "multilevel": lambda: sm.MultiLevel(
                12,
                8,
                [
                    sm.LevelRecipe(sm.LowRank, rank=2),
                    sm.LevelRecipe(sm.BTT, blocks=2, ranks=1),
                    sm.LevelRecipe(sm.Dense, blocks=[(2, 1), (4, 3), (3, 2), (3, 2)]),
                ],
                dtype=F64,
            ),
            "multilevel_built": lambda: sm.MultiLevel(
                12,
                12,
                [
                    sm.Kronecker.from_sizes((3, 3), (4, 4), dtype=F64),
                    sm.BlockDiagonal(sm.Monarch(4, 4, 2, heads=3, dtype=F64)),
                ],
            ),
        },
        projection="levels",
        exprs=("multilevel(12, 8, [lowrank(12, 8, rank=2), block_diag(dense(6, 4, heads=2))])",),
        stacks={
            "multilevel": lambda heads: sm.MultiLevel(
                12,
                8,
                [sm.LevelRecipe(sm.LowRank, rank=2), sm.LevelRecipe(sm.Monarch, blocks=2, nblocks=2)],
                heads=heads,
                dtype=F64,
            )
        },
    ),
    # -- combinators -------------------------------------------------------------------------------------------------
    Family(
        sm.Kronecker,
        members={
            "kron_from_sizes": lambda: sm.Kronecker.from_sizes((3, 2), (2, 5), dtype=F64),
            "kron_networks": lambda: sm.kron(dense(2, 3), dense(5, 4)),
            "kron_three": lambda: sm.kron(dense(2, 3), sm.Identity(2), lowrank_tn(3, 1, 2)),
            "kron_mixed": lambda: sm.kron(dense(2, 3) + dense(2, 3), diag(4), perm(3)),
        },
        projection="parts",
        exprs=("kron(dense(2, 3), identity(2), diag(4))",),
        stacks={"kron_from_sizes": lambda heads: sm.Kronecker.from_sizes((3, 2), (2, 5), heads=heads, dtype=F64)},
        exact={
            "kron_2": lambda: sm.Kronecker.from_sizes((3, 4), (5, 2), dtype=F64),
            "kron_3": lambda: sm.Kronecker.from_sizes((3, 4), (5, 2), (2, 3), dtype=F64),
            "kron_heads": lambda: sm.Kronecker.from_sizes((3, 4), (5, 2), heads=2, dtype=F64),
            "kron_lowrank_part": lambda: sm.kron(sm.LowRank(6, 5, 2, dtype=F64), sm.Dense(3, 4, dtype=F64)),
            "kron_btt_part": lambda: sm.kron(
                sm.Dense(2, 3, dtype=F64), sm.BTT(12, 6, ranks=1, in_factors=(2, 3), out_factors=(3, 4), dtype=F64)
            ),
            "kron_identity_part": lambda: sm.kron(sm.Dense(3, 4, dtype=F64), sm.Identity(2)),
        },
    ),
    Family(
        sm.BlockDiagonal,
        members={
            "block_diag_from_sizes": lambda: sm.BlockDiagonal.from_sizes(6, 9, nblocks=3, dtype=F64),
            "block_diag_of_stack": lambda: sm.BlockDiagonal(sm.LowRank(4, 3, rank=1, heads=3, dtype=F64)),
            "block_diag": lambda: sm.block_diag(dense(2, 3), dense(5, 4)),
            "block_diag_mixed": lambda: sm.block_diag(lowrank_tn(4, 1, 3) + dense(4, 3), perm(3), sm.Identity(2)),
            "nested_kron_product": lambda: sm.block_diag(
                sm.kron(dense(2, 3), dense(3, 2)) @ (dense(6, 6) + sm.Identity(6)).T, 0.5 * perm(4)
            ),
        },
        projection="parts",
        exprs=("block_diag(dense(2, 3), identity(4))", "block_diag(dense(3, 5, heads=6), heads=2)"),
        stacks={
            "block_diag_stack": lambda heads: sm.BlockDiagonal(
                sm.Dense(2, 3, heads=(heads or 1) * 4, dtype=F64), heads=heads
            )
        },
        exact={
            "block_diagonal": lambda: sm.block_diag(
                sm.LowRank(6, 5, 2, dtype=F64),
                sm.BTT(12, 6, ranks=2, in_factors=(2, 3), out_factors=(3, 4), dtype=F64),
                sm.Dense(2, 3, dtype=F64),
            ),
            "block_diagonal_from_sizes": lambda: sm.BlockDiagonal.from_sizes(12, 20, nblocks=4, dtype=F64),
            "block_diagonal_stack": lambda: sm.BlockDiagonal(sm.LowRank(3, 4, 2, heads=5, dtype=F64)),
            "block_diagonal_stack_heads": lambda: sm.BlockDiagonal(sm.LowRank(3, 4, 2, heads=6, dtype=F64), heads=2),
            "nested": lambda: sm.block_diag(
                0.5 * sm.kron(sm.Dense(2, 3, dtype=F64), sm.LowRank(4, 5, 2, dtype=F64)).T, sm.Dense(3, 2, dtype=F64)
            ),
        },
    ),
    Family(
        sm.Sum,
        members={
            "sum": lambda: dense(5, 7) + lowrank_tn(5, 2, 7),
            "difference": lambda: lowrank_tn(6, 1, 4) - dense(6, 4),
            "sum_of_sums": lambda: (dense(3, 4) + dense(3, 4)) + (sm.Identity(3) @ dense(3, 4)),
            "shared_parameters": _shared,
            "nested_sum_kron": lambda: (
                sm.kron(lowrank_tn(3, 1, 2), sm.block_diag(diag(2), dense(3, 2))) + 2.0 * dense(15, 8)
            ),
        },
        projection="gradient",
        exprs=("dense(3, 4) + dense(3, 4) - identity(3) @ dense(3, 4)", "v1 = dense(5, 5); v1 + v1.T"),
    ),
    Family(
        sm.Product,
        members={
            "product_fused": lambda: dense(5, 3) @ dense(3, 7),
            "product_refined": lambda: (
                sm.kron(dense(6, 2), dense(5, 6)) @ tn("y[b,o] = W[b,o,i] x[b,i]", b=4, o=3, i=2)
            ),
            "product_chained": lambda: (
                sm.kron(dense(6, 2), dense(5, 6)) @ tn("y[b,o] = W[b,o,i] x[b,i]", b=3, o=4, i=2)
            ),
            "product_of_sum": lambda: (dense(4, 6) + dense(4, 6)) @ dense(6, 5),
            "product_with_gather": lambda: dense(5, 6) @ perm(6) @ diag(6),
            "diag_product": lambda: diag(5) @ dense(5, 7),
        },
        projection="gradient",
        exprs=("dense(5, 3) @ dense(3, 7)",),
        stacks={"chain": chain},
    ),
    Family(
        sm.Transpose,
        members={
            "transpose": lambda: dense(5, 7).T,
            "transpose_monarch": lambda: tn("y[c,d] = L[c,d,a] R[a,c,b] x[a,b]", a=3, b=2, c=2, d=3).T,
            "nested_transpose_chain": lambda: (
                ((dense(7, 4) @ sm.block_diag(dense(2, 3), dense(2, 2))) - sm.kron(dense(7, 1), dense(1, 5)).T.T).T
            ),
        },
        projection="parts",
        exprs=("dense(5, 7).T", "transpose(dense(5, 7).T)"),
        exact={"transpose": lambda: sm.Monarch(18, 30, nblocks=3, dtype=F64).T},
    ),
    Family(
        sm.Scaled,
        members={
            "scaled": lambda: 2.5 * dense(5, 7),
            "scaled_identity": lambda: -0.5 * sm.Identity(4),
            "scaled_permutation": lambda: 3.0 * perm(5),
        },
        projection="parts",
        exprs=("2.5 * dense(5, 7)", "-dense(5, 7)"),
        stacks={"scaled_chain": lambda heads: 2.5 * chain(heads)},
        exact={"scaled": lambda: -2.5 * sm.LowRank(13, 17, 3, dtype=F64)},
    ),
]

#: The test registry: the entry of every public operator class, by class name.
FAMILIES: dict[str, Family] = {f.cls.__name__: f for f in _FAMILIES}


def _union(tables: list[dict[str, Make]] | list[dict[str, MakeStack]], what: str) -> dict:
    out: dict = {}
    for table in tables:
        for name, make in table.items():
            if name in out:
                raise ValueError(f"tests/zoo.py: the {what} name {name!r} is used twice")
            out[name] = make
    return out


#: The operator zoo: every member of every entry, nested up to three deep.
ZOO: dict[str, Make] = _union([f.members for f in _FAMILIES], "member")
#: Builders of stacks of heads (``make(None)`` is the single operator, ``make(H)`` a stack of H).
STACKS: dict[str, MakeStack] = _union([f.stacks for f in _FAMILIES], "stack")
#: Members whose projection recovers them exactly (closed forms and the composites built from them).
CLOSED_FORMS: dict[str, Make] = _union([f.exact for f in _FAMILIES], "exact-projection")


def entry(cls: type) -> Family | None:
    """The registry entry of ``cls`` (the class itself, not a subclass), or None."""
    found = FAMILIES.get(cls.__name__)
    return found if found is not None and found.cls is cls else None


def build(name: str, seed: int = 0) -> sm.LinearOperator:
    torch.manual_seed(seed)
    return ZOO[name]()
