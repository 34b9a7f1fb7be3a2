"""structmat_attention: attention whose scores are bilinear forms ``x_i^T A_ij x_j`` through structmat operators.

Standard multi-head attention, Bilinear BTT attention and MLR attention (Kuang et al., ICML 2025) are instances of
one mechanism, :func:`structured_attention` over a list of :class:`Level` s. :class:`StructuredAttention` is the
layer around it (with a :class:`KVCache` for decoding and a :meth:`~StructuredAttention.cost` in FLOPs and MACs);
the paper's variants are its constructors; :class:`GPT` is a small language model around any of them.

Modules, bottom to top (each imports only the ones above it):

- ``cost``: :class:`AttentionCost`, the FLOP and MAC count of a layer, part by part.
- ``levels``: :class:`Level` (one term of the scores), :class:`LevelSpec` (a recipe for one), their features.
- ``_scores``, ``_sdpa``, ``_streamed``, ``_pieces``: the four exact execution paths (private).
- ``functional``: :func:`structured_attention`, :func:`bilinear_scores`, :func:`attend`, and which path runs
  (:func:`attention_path`).
- ``layers``: :class:`StructuredAttention` and its :class:`KVCache`.
- ``variants``: the paper's constructors (:func:`standard_attention`, :func:`mlr_attention`, ...).
- ``model``: :class:`TransformerBlock` and :class:`GPT`.
- ``experiments``: the paper's three tasks (``python -m structmat_attention``).
"""

from .cost import AttentionCost, CostPart, pairs_joined
from .functional import attend, attention_path, bilinear_scores, structured_attention
from .layers import KVCache, StructuredAttention
from .levels import Level, LevelFeatures, LevelSpec, attention_features, level_features, resolve_scale
from .model import GPT, TransformerBlock
from .variants import (
    bilinear_btt_attention,
    bilinear_mlr_attention,
    gswa_attention,
    mlr_attention,
    sliding_window_attention,
    standard_attention,
)

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
