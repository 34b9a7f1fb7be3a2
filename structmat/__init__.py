"""structmat: structured linear operators as tensor networks, with rank, cost and path queries from shapes alone.

Example:
    >>> import torch, structmat as sm
    >>> A = sm.Dense(64, 8) @ sm.Dense(8, 64) + 0.5 * sm.Identity(64)
    >>> A(torch.randn(3, 64)).shape
    torch.Size([3, 64])
    >>> A.rank().bound, A.cost(batch=1).flops
    (64, 2176)
"""

from . import init, linalg, nn
from .benchmark import BenchResult, bench
from .bilinear import bilinear_split
from .combinators import BlockDiagonal, Kronecker, Product, Scaled, Sum, Transpose, block_diag, kron
from .core.base import LinearOperator
from .core.cost import Contraction, Cost, Rank, Timing
from .expr import parse, to_expr
from .init import mup_param_groups
from .operators import (
    BTT,
    MLR,
    TT,
    BlockLevel,
    BlockLowRank,
    BlockTensorTrain,
    Dense,
    Diagonal,
    Identity,
    LevelRecipe,
    LowRank,
    Monarch,
    MultiLevel,
    MultiLevelLowRank,
    Permutation,
    TensorNetwork,
    TensorTrain,
)
from .project import project
from .rank import numerical_rank

__version__ = "0.1.0"

__all__ = [
    "LinearOperator",
    "Cost",
    "Rank",
    "Contraction",
    "Timing",
    "bench",
    "BenchResult",
    "Dense",
    "Diagonal",
    "Identity",
    "Permutation",
    "TensorNetwork",
    "LowRank",
    "BlockLowRank",
    "BlockTensorTrain",
    "BTT",
    "Monarch",
    "TensorTrain",
    "TT",
    "MultiLevelLowRank",
    "MLR",
    "MultiLevel",
    "BlockLevel",
    "LevelRecipe",
    "Sum",
    "Product",
    "Transpose",
    "Kronecker",
    "BlockDiagonal",
    "Scaled",
    "kron",
    "block_diag",
    "numerical_rank",
    "parse",
    "to_expr",
    "project",
    "init",
    "linalg",
    "nn",
    "mup_param_groups",
    "bilinear_split",
]
