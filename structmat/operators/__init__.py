"""Operator leaves and families, one file each."""

from .dense import Dense
from .diagonal import Diagonal
from .identity import Identity
from .permutation import Permutation
from .tensor_network import TensorNetwork

__all__ = ["Dense", "Diagonal", "Identity", "Permutation", "TensorNetwork"]
