"""Pictures of every family's structure, drawn at build time from the operators' ``dense()`` matrices.

``mkdocs build`` loads this file as a hook (``hooks:`` in mkdocs.yml): :func:`on_files` adds one PNG per entry of
:data:`FIGURES` to the site as ``pictures/<name>.png``, so nothing is written into ``docs/`` and the pictures always
show what the installed library computes. Each figure draws ``|W|`` (darker = larger) of a small random instance;
grids mark the blocks the family's rank rule speaks of, and the numbers in them are the blocks' numerical ranks,
computed from ``dense()`` as well. ``tests/test_docs.py`` renders every figure and checks the pages use them.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import structmat as sm  # noqa: E402

__all__ = ["FIGURES", "render", "on_files"]

_CMAP = "Greys"


def _show(ax, W: torch.Tensor, title: str, grid: tuple[list[int], list[int]] | None = None) -> None:
    """Draw ``|W|`` on ``ax``, with lines between blocks at the given row and column boundaries."""
    W = W.detach().abs().double()
    ax.imshow(W.numpy(), cmap=_CMAP, interpolation="nearest", vmin=0.0)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if grid is not None:
        rows, cols = grid
        for r in rows[1:-1]:
            ax.axhline(r - 0.5, color="tab:red", lw=0.8)
        for c in cols[1:-1]:
            ax.axvline(c - 0.5, color="tab:red", lw=0.8)


def _block_ranks(ax, W: torch.Tensor, rows: list[int], cols: list[int]) -> None:
    """Write each block's numerical rank (float64 SVD) in its middle."""
    W = W.detach().double()
    for r0, r1 in zip(rows[:-1], rows[1:]):
        for c0, c1 in zip(cols[:-1], cols[1:]):
            rank = int(torch.linalg.matrix_rank(W[r0:r1, c0:c1]))
            ax.text((c0 + c1 - 1) / 2, (r0 + r1 - 1) / 2, str(rank), ha="center", va="center", fontsize=8,
                    color="tab:blue", fontweight="bold")  # fmt: skip


def _cuts(size: int, parts: int) -> list[int]:
    return [size * k // parts for k in range(parts + 1)]


def _figure(n_panels: int, width: float = 2.6) -> tuple[plt.Figure, list]:
    fig, axes = plt.subplots(1, n_panels, figsize=(width * n_panels, width + 0.3), squeeze=False)
    return fig, list(axes[0])


def _dense() -> plt.Figure:
    fig, (ax,) = _figure(1)
    _show(ax, sm.Dense(16, 16).dense(), "Dense(16, 16): every entry free")
    return fig


def _diagonal() -> plt.Figure:
    D = sm.Diagonal.from_tensor(torch.rand(16) + 0.2)
    fig, (ax,) = _figure(1)
    _show(ax, D.dense(), "Diagonal(16)")
    return fig


def _identity() -> plt.Figure:
    fig, (ax,) = _figure(1)
    _show(ax, sm.Identity(16).dense(), "Identity(16)")
    return fig


def _permutation() -> plt.Figure:
    fig, axes = _figure(2)
    _show(axes[0], sm.Permutation(torch.randperm(16).tolist()).dense(), "Permutation(random perm of 16)")
    _show(axes[1], sm.Permutation.from_axes((4, 4), (1, 0)).dense(), "Permutation.from_axes((4, 4), (1, 0))")
    return fig


def _lowrank() -> plt.Figure:
    A = sm.LowRank(16, 16, rank=2)
    fig, axes = plt.subplots(1, 3, figsize=(7.0, 2.9), gridspec_kw={"width_ratios": [16, 2, 16]})
    _show(axes[0], A.dense(), "W = U V  (16 x 16, rank 2)")
    _show(axes[1], A.U, "U")
    _show(axes[2], A.V, "V  (2 x 16)")
    return fig


def _btt() -> plt.Figure:
    A = sm.BTT(16, 16, ranks=1)  # input (a, b) = (4, 4), output (c, d) = (4, 4), bond 1
    B = sm.BTT(16, 16, ranks=2)
    fig, axes = _figure(2, 3.0)
    cuts = _cuts(16, 4)
    for ax, op, s in ((axes[0], A, 1), (axes[1], B, 2)):
        W = op.dense()
        _show(ax, W, f"BTT(16, 16, ranks={s}): blocks of rank {s}", (cuts, cuts))
        _block_ranks(ax, W, cuts, cuts)
    return fig


def _tt() -> plt.Figure:
    A = sm.TT(16, 16, ranks=1)
    B = sm.TT(16, 16, ranks=2)
    fig, axes = _figure(2, 3.0)
    cuts = _cuts(16, 4)
    _show(axes[0], A.dense(), "TT(16, 16, ranks=1) = G1 ⊗ G2", (cuts, cuts))
    _show(axes[1], B.dense(), "TT(16, 16, ranks=2): a sum of 2 ⊗", (cuts, cuts))
    return fig


def _monarch() -> plt.Figure:
    k = 4
    A = sm.Monarch(16, 16, nblocks=k)
    W = A.dense()
    rows = torch.cat([torch.arange(g, 16, k) for g in range(k)])  # rows grouped by t mod k
    cuts = _cuts(16, k)
    fig, axes = _figure(2, 3.0)
    _show(axes[0], W, "Monarch(16, 16, nblocks=4)")
    _show(axes[1], W[rows], "rows grouped by (row mod 4)", (cuts, cuts))
    _block_ranks(axes[1], W[rows], cuts, cuts)
    return fig


def _kronecker() -> plt.Figure:
    A, B = sm.Dense(4, 4), sm.Dense(4, 4)
    K = sm.kron(A, B)
    cuts = _cuts(16, 4)
    fig, axes = plt.subplots(1, 3, figsize=(7.4, 2.9), gridspec_kw={"width_ratios": [4, 4, 16]})
    _show(axes[0], A.dense(), "A (4 x 4)")
    _show(axes[1], B.dense(), "B (4 x 4)")
    _show(axes[2], K.dense(), "kron(A, B): block (i, j) = A[i, j] B", (cuts, cuts))
    return fig


def _mlr() -> plt.Figure:
    A = sm.MLR(16, 16, ranks=[2, 1, 1], blocks=[1, 2, 4])
    fig, axes = _figure(4, 2.3)
    _show(axes[0], A.dense(), "MLR(16, 16, [2, 1, 1], [1, 2, 4])")
    for i, (level, nb) in enumerate(zip(A.levels, (1, 2, 4))):
        cuts = _cuts(16, nb)
        W = level.dense()
        _show(axes[i + 1], W, f"level {i}: {nb} block(s)", (cuts, cuts))
        _block_ranks(axes[i + 1], W, cuts, cuts)
    return fig


def _multilevel() -> plt.Figure:
    A = sm.MultiLevel(16, 16, [sm.LevelRecipe(sm.LowRank, rank=2), sm.LevelRecipe(sm.BTT, blocks=2, ranks=1)])
    fig, axes = _figure(3, 2.6)
    _show(axes[0], A.dense(), "MultiLevel: low rank + 2 BTT blocks")
    _show(axes[1], A.levels[0].dense(), "level 0: LowRank(16, 16, rank=2)")
    cuts = _cuts(16, 2)
    _show(axes[2], A.levels[1].dense(), "level 1: 2 blocks BTT(8, 8, ranks=1)", (cuts, cuts))
    return fig


def _tensor_network() -> plt.Figure:
    B = sm.TensorNetwork("y[b,o] = W[b,o,i] x[b,i]", factors=dict(W=torch.randn(4, 3, 4)))
    C = sm.TensorNetwork("y[o,p] = U[o,r] V[p,q] x[r,q]", sizes=dict(o=4, p=4, r=4, q=4))
    fig, axes = _figure(2, 3.0)
    _show(axes[0], B.dense(), "y[b,o] = W[b,o,i] x[b,i]", (_cuts(12, 4), _cuts(16, 4)))
    _show(axes[1], C.dense(), "y[o,p] = U[o,r] V[p,q] x[r,q]")
    return fig


def _block_low_rank() -> plt.Figure:
    A = sm.BlockLowRank(16, 16, p=4, q=4, rank=1)
    B = sm.BlockLowRank(16, 24, p=2, q=3, rank=2)
    fig, axes = plt.subplots(1, 2, figsize=(7.0, 2.9), gridspec_kw={"width_ratios": [16, 24]})
    for ax, op, p, q, r in ((axes[0], A, 4, 4, 1), (axes[1], B, 2, 3, 2)):
        rows, cols = _cuts(op.shape[0], p), _cuts(op.shape[1], q)
        W = op.dense()
        _show(ax, W, f"BlockLowRank{op.shape}, p={p}, q={q}, rank={r}", (rows, cols))
        _block_ranks(ax, W, rows, cols)
    return fig


#: name -> function drawing the figure; ``pictures/<name>.png`` in the site.
FIGURES: dict[str, Callable[[], plt.Figure]] = {
    "dense": _dense,
    "diagonal": _diagonal,
    "identity": _identity,
    "permutation": _permutation,
    "lowrank": _lowrank,
    "btt": _btt,
    "tt": _tt,
    "monarch": _monarch,
    "kronecker": _kronecker,
    "mlr": _mlr,
    "multilevel": _multilevel,
    "tensor-network": _tensor_network,
}
if hasattr(sm, "BlockLowRank"):
    FIGURES["block-low-rank"] = _block_low_rank


def render(name: str) -> bytes:
    """The PNG of figure ``name``, drawn from a fixed seed (the same bytes on every build with the same library)."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # block ranks by SVD need float64 values
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # rank-capping splits are the point of some pictures
            fig = FIGURES[name]()
    finally:
        torch.set_default_dtype(default)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def on_files(files, config):  # noqa: ANN001, ANN201 (mkdocs hook signature)
    """mkdocs hook: add ``pictures/<name>.png`` for every figure to the site's files."""
    from mkdocs.structure.files import File

    for name in FIGURES:
        files.append(File.generated(config, f"pictures/{name}.png", content=render(name)))
    return files
