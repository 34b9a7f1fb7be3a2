"""Operator leaves and families, one file each."""

from .blocklowrank import BlockLowRank
from .btt import BTT, BlockTensorTrain
from .dense import Dense
from .diagonal import Diagonal
from .identity import Identity
from .lowrank import LowRank
from .mlr import MLR, MultiLevelLowRank
from .monarch import Monarch
from .multilevel import BlockLevel, LevelRecipe, MultiLevel
from .permutation import Permutation
from .tensor_network import TensorNetwork
from .tt import TT, TensorTrain

__all__ = [
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
]
