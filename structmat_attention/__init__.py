"""structmat_attention: attention whose scores are bilinear forms ``x_i^T A_ij x_j`` through structmat operators.

Standard multi-head attention, Bilinear BTT attention and MLR attention (Kuang et al., ICML 2025) are instances of
one mechanism, :func:`structured_attention` over a list of :class:`Level` s.
"""

from .functional import Level, bilinear_scores, level_features, resolve_scale, structured_attention

__all__ = ["Level", "bilinear_scores", "structured_attention", "level_features", "resolve_scale"]
