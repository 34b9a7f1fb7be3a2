"""structmat_attention: attention whose scores are bilinear forms ``x_i^T A_ij x_j`` through structmat operators.

Standard multi-head attention, Bilinear BTT attention and MLR attention (Kuang et al., ICML 2025) are instances of
one mechanism, :func:`structured_attention` over a list of :class:`Level` s. :class:`StructuredAttention` is the
layer around it (with a :class:`KVCache` for decoding and a :meth:`~StructuredAttention.cost` in FLOPs and MACs);
the paper's variants are its constructors; :class:`GPT` is a small language model around any of them.
"""

from .cost import AttentionCost, CostPart, pairs_joined
from .functional import (
    Level,
    LevelFeatures,
    attend,
    attention_features,
    attention_path,
    bilinear_scores,
    level_features,
    resolve_scale,
    structured_attention,
)
from .layers import (
    KVCache,
    LevelSpec,
    StructuredAttention,
    bilinear_btt_attention,
    bilinear_mlr_attention,
    gswa_attention,
    mlr_attention,
    sliding_window_attention,
    standard_attention,
)
from .model import GPT, TransformerBlock

__all__ = [
    "Level",
    "bilinear_scores",
    "structured_attention",
    "attention_features",
    "attend",
    "attention_path",
    "LevelFeatures",
    "level_features",
    "resolve_scale",
    "LevelSpec",
    "KVCache",
    "StructuredAttention",
    "standard_attention",
    "bilinear_btt_attention",
    "bilinear_mlr_attention",
    "mlr_attention",
    "sliding_window_attention",
    "gswa_attention",
    "AttentionCost",
    "CostPart",
    "pairs_joined",
    "TransformerBlock",
    "GPT",
]
