"""Independent dense references: each operator's matrix built from its parameters with plain torch ops
(torch.kron, torch.block_diag, matmul, einsum), never through structmat's networks or nodes.

A stack of H operators (``heads=H``) gives an ``(H, m, n)`` tensor; combinators of stacks broadcast per head."""

from __future__ import annotations

import functools
import string

import torch

import structmat as sm


def reference_dense(op: sm.LinearOperator) -> torch.Tensor:
    if isinstance(op, sm.Dense):
        return op.weight.detach().clone()
    if isinstance(op, sm.Identity):
        return torch.eye(op.shape[0], dtype=torch.float64)
    if isinstance(op, sm.Diagonal):
        return torch.diag(op.diag.detach())
    if isinstance(op, sm.Permutation):
        return torch.eye(op.shape[0], dtype=torch.float64)[list(op.perm)]
    if isinstance(op, sm.TensorNetwork):
        return _tn_dense(op)
    if isinstance(op, sm.LowRank):
        return (op.U @ op.V).detach()
    if isinstance(op, sm.BlockTensorTrain):
        return _btt_dense(op)
    if isinstance(op, sm.Monarch):
        return _monarch_dense(op)
    if isinstance(op, sm.TensorTrain):
        return _tt_dense(op)
    if isinstance(op, (sm.MultiLevelLowRank, sm.MultiLevel)):
        return functools.reduce(torch.add, [reference_dense(level) for level in op.levels])
    if isinstance(op, sm.Sum):
        return functools.reduce(torch.add, [reference_dense(t) for t in op.terms])
    if isinstance(op, sm.Product):
        return functools.reduce(torch.matmul, [reference_dense(t) for t in op.factors])
    if isinstance(op, sm.Transpose):
        return reference_dense(op.op).mT
    if isinstance(op, sm.Kronecker):
        return _per_head(torch.kron, [reference_dense(t) for t in op.parts], op.heads)
    if isinstance(op, sm.BlockDiagonal):
        parts = [reference_dense(t) for t in op.blocks]
        if len(parts) == 1 and parts[0].ndim == 3:  # one stack: its operators are the blocks, grouped per head
            stack = parts[0]
            if op.heads is None:
                return torch.block_diag(*stack)
            groups = stack.reshape(op.heads, -1, *stack.shape[1:])
            return torch.stack([torch.block_diag(*group) for group in groups])
        return torch.block_diag(*parts)
    if isinstance(op, sm.Scaled):
        return op.scale * reference_dense(op.op)
    from zoo import entry  # here: zoo's entries may name the functions of this module

    found = entry(type(op))
    if found is not None and found.reference is not None:  # a family whose reference lives in its registry entry
        return found.reference(op)
    raise TypeError(f"no reference for {type(op).__name__}")


def _per_head(fn, parts: list[torch.Tensor], heads: int | None) -> torch.Tensor:
    """``reduce(fn, parts)`` for 2-D parts, else head by head (an unstacked part is the same for every head)."""
    if heads is None:
        return functools.reduce(fn, parts)
    return torch.stack([functools.reduce(fn, [p[h] if p.ndim == 3 else p for p in parts]) for h in range(heads)])


def _btt_dense(op: sm.BlockTensorTrain) -> torch.Tensor:
    """The BTT matrix from btt.py's layout, one explicit einsum over the cores.

    With N cores, inputs ``i_0..i_{N-1}``, outputs ``o_0..o_{N-1}`` and bonds ``r_0..r_N`` (``r_0 = r_N = 1``), core
    ``k`` is stored as ``[o_0..o_{k-1}, i_0..i_{N-k-2}, r_k, o_k, i_{N-1-k}, r_{k+1}]`` and
    ``W[(o_0..o_{N-1}), (i_0..i_{N-1})] = sum over the bonds of prod_k core_k``.
    """
    cores = [c.detach() for c in op.cores]
    N = len(cores)
    letters = iter(string.ascii_letters)
    i = [next(letters) for _ in range(N)]
    o = [next(letters) for _ in range(N)]
    r = [next(letters) for _ in range(N + 1)]
    subs = ["".join(o[:k] + i[: N - k - 1] + [r[k], o[k], i[N - 1 - k], r[k + 1]]) for k in range(N)]
    return _einsum_matrix(subs, "".join(o) + "".join(i), cores, op.heads, op.shape)


def _monarch_dense(op: sm.Monarch) -> torch.Tensor:
    """Dao et al.'s Monarch ``W = P_out L P_mid R``: ``R = block_diag(blkdiag1)`` maps n to the ``N = min(m, n)``
    intermediate entries, ``P_mid`` views them as an ``(N / nblocks, nblocks)`` grid and transposes it,
    ``L = block_diag(blkdiag2)`` maps N to m, and ``P_out`` transposes the ``(nblocks, m / nblocks)`` output grid."""
    k = op.nblocks

    def grid_transpose(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """``P x``: x viewed as ``(rows, cols)`` row-major, transposed, flattened."""
        size = rows * cols
        return torch.eye(size, dtype=dtype).reshape(rows, cols, size).transpose(0, 1).reshape(size, size)

    def one(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        R = torch.block_diag(*w1)
        L = torch.block_diag(*w2)
        N, m = R.shape[0], L.shape[0]
        return grid_transpose(k, m // k, R.dtype) @ L @ grid_transpose(N // k, k, R.dtype) @ R

    w1, w2 = op.blkdiag1.detach(), op.blkdiag2.detach()
    if op.heads is None:
        return one(w1, w2)
    return torch.stack([one(w1[h], w2[h]) for h in range(op.heads)])


def _tt_dense(op: sm.TensorTrain) -> torch.Tensor:
    """``A[(o_1..o_N), (i_1..i_N)] = G_1[:, o_1, i_1, :] G_2[:, o_2, i_2, :] ... G_N[:, o_N, i_N, :]``, core by core."""

    def one(cores: list[torch.Tensor]) -> torch.Tensor:
        acc = cores[0][0]  # (o, i, r)
        for g in cores[1:]:
            acc = torch.einsum("OIr,roip->OoIip", acc, g)
            acc = acc.reshape(acc.shape[0] * acc.shape[1], acc.shape[2] * acc.shape[3], acc.shape[4])
        return acc[..., 0]

    cores = [c.detach() for c in op.cores]
    if op.heads is None:
        return one(cores)
    return torch.stack([one([c[h] for c in cores]) for h in range(op.heads)])


def _einsum_matrix(
    subs: list[str], out: str, tensors: list[torch.Tensor], heads: int | None, shape: tuple[int, int]
) -> torch.Tensor:
    """Contract ``tensors`` (a leading head axis on each for a stack) into the ``(m, n)`` matrix (``(H, m, n)``)."""
    if heads is not None:
        subs, out = ["Z" + s for s in subs], "Z" + out
    W = torch.einsum(",".join(subs) + "->" + out, *tensors)
    lead = (heads,) if heads is not None else ()
    return W.reshape(*lead, *shape)


def _tn_dense(op: sm.TensorNetwork) -> torch.Tensor:
    """Parse the spec text again with str methods and contract with an identity standing for x (head by head)."""
    if op.heads is None:
        return _tn_one(op, lambda name: getattr(op, name).detach())
    return torch.stack([_tn_one(op, lambda name, h=h: getattr(op, name).detach()[h]) for h in range(op.heads)])


def _tn_one(op: sm.TensorNetwork, factor) -> torch.Tensor:
    lhs, rhs = op.spec.split("=")
    out = _labels(lhs)
    terms = []
    for chunk in rhs.split("]"):
        if chunk.strip():
            name, labs = chunk.split("[")
            terms.append((name.strip(), [s.strip() for s in labs.split(",") if s.strip()]))
    letters: dict[str, str] = {}
    for _, labs in terms:
        for lab in labs:
            letters.setdefault(lab, "abcdefghijklmnopqrstuvwxyz"[len(letters)])
    for lab in out:
        letters.setdefault(lab, "abcdefghijklmnopqrstuvwxyz"[len(letters)])
    x_labels = dict(terms)["x"]
    sizes = {}
    for name, labs in terms:
        if name != "x":
            sizes.update(zip(labs, factor(name).shape))
    in_sizes = []
    for lab in x_labels:
        in_sizes.append(sizes.get(lab))
    # sizes of labels that live only in x are fixed by n
    unknown = [k for k, s in enumerate(in_sizes) if s is None]
    known = 1
    for s in in_sizes:
        known *= s or 1
    for k in unknown:
        in_sizes[k] = op.shape[1] // known if len(unknown) == 1 else None
    n = op.shape[1]
    eye = torch.eye(n, dtype=torch.float64).reshape(*in_sizes, n)  # x[in..., column]
    operands, subs = [], []
    for name, labs in terms:
        if name == "x":
            operands.append(eye)
            subs.append("".join(letters[lab] for lab in labs) + "Z")
        else:
            operands.append(factor(name))
            subs.append("".join(letters[lab] for lab in labs))
    eq = ",".join(subs) + "->" + "".join(letters[lab] for lab in out) + "Z"
    return torch.einsum(eq, *operands).reshape(op.shape[0], n)


def _labels(text: str) -> list[str]:
    inner = text.split("[")[1].split("]")[0]
    return [s.strip() for s in inner.split(",") if s.strip()]
