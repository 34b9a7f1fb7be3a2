"""Independent dense references: each operator's matrix built from its parameters with plain torch ops
(torch.kron, torch.block_diag, matmul, einsum), never through structmat's networks or nodes."""

from __future__ import annotations

import functools

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
    if isinstance(op, sm.Sum):
        return functools.reduce(torch.add, [reference_dense(t) for t in op.terms])
    if isinstance(op, sm.Product):
        return functools.reduce(torch.matmul, [reference_dense(t) for t in op.factors])
    if isinstance(op, sm.Transpose):
        return reference_dense(op.op).T
    if isinstance(op, sm.Kronecker):
        return functools.reduce(torch.kron, [reference_dense(t) for t in op.parts])
    if isinstance(op, sm.BlockDiagonal):
        return torch.block_diag(*[reference_dense(t) for t in op.blocks])
    if isinstance(op, sm.Scaled):
        return op.scale * reference_dense(op.op)
    raise TypeError(f"no reference for {type(op).__name__}")


def _tn_dense(op: sm.TensorNetwork) -> torch.Tensor:
    """Parse the spec text again with str methods and contract with an identity standing for x."""
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
            sizes.update(zip(labs, getattr(op, name).shape))
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
            operands.append(getattr(op, name).detach())
            subs.append("".join(letters[lab] for lab in labs))
    eq = ",".join(subs) + "->" + "".join(letters[lab] for lab in out) + "Z"
    return torch.einsum(eq, *operands).reshape(op.shape[0], n)


def _labels(text: str) -> list[str]:
    inner = text.split("[")[1].split("]")[0]
    return [s.strip() for s in inner.split(",") if s.strip()]
