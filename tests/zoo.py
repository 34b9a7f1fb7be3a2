"""A named zoo of small operators of every leaf and combinator, nested up to three deep, in float64.

Sizes are distinct (2, 3, 4, 5, 6, 7, 12 ...) so that a swapped axis fails. Each entry is a factory taking a seed,
so the contract test can build two instances with different parameters (state_dict round trip).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import structmat as sm

F64 = torch.float64


def dense(m: int, n: int) -> sm.Dense:
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


def _shared() -> sm.LinearOperator:
    a = dense(5, 5)
    return a + a.T


ZOO: dict[str, Callable[[], sm.LinearOperator]] = {
    # leaves
    "dense": lambda: dense(5, 7),
    "dense_column": lambda: dense(4, 1),
    "identity": lambda: sm.Identity(6),
    "diagonal": lambda: diag(5),
    "permutation": lambda: perm(7),
    "axis_permutation": lambda: sm.Permutation.from_axes((3, 4, 2), (2, 0, 1)),
    "tn_lowrank": lambda: lowrank_tn(5, 2, 7),
    "tn_blockdiag": lambda: tn("y[b,o] = W[b,o,i] x[b,i]", b=3, o=2, i=5),
    "tn_monarch": lambda: tn("y[c,d] = L[c,d,a] R[a,c,b] x[a,b]", a=2, b=3, c=4, d=5),
    "tn_tt3": lambda: tn(
        "y[o1,o2,o3] = A[o1,i1,p] B[p,o2,i2,q] C[q,o3,i3] x[i1,i2,i3]", o1=2, i1=3, p=2, o2=3, i2=2, q=3, o3=2, i3=2
    ),
    "tn_ones_input": lambda: tn("y[o] = W[o,i] s[a] x[a,i]", o=4, i=3, a=2),
    # families (rectangular, distinct sizes; non-default factor splits where the family has them)
    "lowrank": lambda: sm.LowRank(7, 5, rank=2, dtype=F64),
    "btt2": lambda: sm.BTT(12, 10, ranks=2, dtype=F64),  # balanced splits (3, 4) x (2, 5)
    "btt3": lambda: sm.BTT(12, 8, ranks=[2, 3], in_factors=(2, 2, 2), out_factors=(3, 2, 2), dtype=F64),
    "monarch": lambda: sm.Monarch(6, 9, nblocks=3, dtype=F64),
    "monarch_rect": lambda: sm.Monarch(8, 12, nblocks=2, dtype=F64),
    "monarch_chained": lambda: sm.Monarch(12, 20, nblocks=4, dtype=F64),  # q = 3, k = 4: R and L do not fuse
    "tt": lambda: sm.TT(12, 8, ranks=[2, 3], in_factors=(2, 2, 2), out_factors=(3, 2, 2), dtype=F64),
    "mlr": lambda: sm.MLR(12, 8, ranks=[2, 1], blocks=[1, 4], dtype=F64),
    "mlr_unequal": lambda: sm.MLR(9, 7, ranks=[2, 1], blocks=[1, [(4, 3), (5, 4)]], dtype=F64),
    "multilevel": lambda: sm.MultiLevel(
        12,
        8,
        [
            sm.BlockLevel(sm.LowRank, rank=2),
            sm.BlockLevel(sm.BTT, blocks=2, ranks=1),
            sm.BlockLevel(sm.Dense, blocks=[(2, 1), (4, 3), (3, 2), (3, 2)]),
        ],
        dtype=F64,
    ),
    "multilevel_built": lambda: sm.MultiLevel(
        12,
        12,
        [sm.Kronecker.from_sizes((3, 3), (4, 4), dtype=F64), sm.BlockDiagonal(sm.Monarch(4, 4, 2, heads=3, dtype=F64))],
    ),
    "kron_from_sizes": lambda: sm.Kronecker.from_sizes((3, 2), (2, 5), dtype=F64),
    "block_diag_from_sizes": lambda: sm.BlockDiagonal.from_sizes(6, 9, nblocks=3, dtype=F64),
    "block_diag_of_stack": lambda: sm.BlockDiagonal(sm.LowRank(4, 3, rank=1, heads=3, dtype=F64)),
    # combinators
    "sum": lambda: dense(5, 7) + lowrank_tn(5, 2, 7),
    "difference": lambda: lowrank_tn(6, 1, 4) - dense(6, 4),
    "sum_of_sums": lambda: (dense(3, 4) + dense(3, 4)) + (sm.Identity(3) @ dense(3, 4)),
    "product_fused": lambda: dense(5, 3) @ dense(3, 7),
    "product_refined": lambda: sm.kron(dense(6, 2), dense(5, 6)) @ tn("y[b,o] = W[b,o,i] x[b,i]", b=4, o=3, i=2),
    "product_chained": lambda: sm.kron(dense(6, 2), dense(5, 6)) @ tn("y[b,o] = W[b,o,i] x[b,i]", b=3, o=4, i=2),
    "product_of_sum": lambda: (dense(4, 6) + dense(4, 6)) @ dense(6, 5),
    "product_with_gather": lambda: dense(5, 6) @ perm(6) @ diag(6),
    "diag_product": lambda: diag(5) @ dense(5, 7),
    "transpose": lambda: dense(5, 7).T,
    "transpose_monarch": lambda: tn("y[c,d] = L[c,d,a] R[a,c,b] x[a,b]", a=3, b=2, c=2, d=3).T,
    "kron_networks": lambda: sm.kron(dense(2, 3), dense(5, 4)),
    "kron_three": lambda: sm.kron(dense(2, 3), sm.Identity(2), lowrank_tn(3, 1, 2)),
    "kron_mixed": lambda: sm.kron(dense(2, 3) + dense(2, 3), diag(4), perm(3)),
    "block_diag": lambda: sm.block_diag(dense(2, 3), dense(5, 4)),
    "block_diag_mixed": lambda: sm.block_diag(lowrank_tn(4, 1, 3) + dense(4, 3), perm(3), sm.Identity(2)),
    "scaled": lambda: 2.5 * dense(5, 7),
    "scaled_identity": lambda: -0.5 * sm.Identity(4),
    "scaled_permutation": lambda: 3.0 * perm(5),
    "shared_parameters": _shared,
    # three deep
    "nested_kron_product": lambda: sm.block_diag(
        sm.kron(dense(2, 3), dense(3, 2)) @ (dense(6, 6) + sm.Identity(6)).T, 0.5 * perm(4)
    ),
    "nested_sum_kron": lambda: sm.kron(lowrank_tn(3, 1, 2), sm.block_diag(diag(2), dense(3, 2))) + 2.0 * dense(15, 8),
    "nested_transpose_chain": lambda: (
        ((dense(7, 4) @ sm.block_diag(dense(2, 3), dense(2, 2))) - sm.kron(dense(7, 1), dense(1, 5)).T.T).T
    ),
}


def build(name: str, seed: int = 0) -> sm.LinearOperator:
    torch.manual_seed(seed)
    return ZOO[name]()
