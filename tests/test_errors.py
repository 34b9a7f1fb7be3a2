"""Every user-facing error: the exception type, and a message that names the operator and the offending values.

Sizes are distinct (3, 5, 7, 12 ...) so that a message quoting the wrong axis does not match.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import structmat as sm

F32, F64 = torch.float32, torch.float64
LOWRANK = "y[o] = U[o,r] V[r,i] x[i]"
LR_SIZES = dict(o=3, r=2, i=5)


def tn(spec: str, sizes=None, factors=None, **kw) -> sm.TensorNetwork:
    return sm.TensorNetwork(spec, sizes=sizes, factors=factors, **kw)


def where(spec: str) -> str:
    """The regex that matches the ``TensorNetwork('<spec>')`` prefix of a message."""
    return re.escape(f"TensorNetwork({spec!r})")


# -- shapes of combinations ----------------------------------------------------------------------------------------
def test_matmul_inner_size_mismatch():
    with pytest.raises(ValueError, match=r"Product: cannot compose Dense\(3, 5\) @ Dense\(7, 3\): inner sizes 5 and 7"):
        sm.Dense(3, 5) @ sm.Dense(7, 3)


def test_product_of_three_names_the_bad_pair():
    with pytest.raises(ValueError, match=r"Dense\(5, 7\) @ Dense\(12, 3\): inner sizes 7 and 12"):
        sm.Product(sm.Dense(3, 5), sm.Dense(5, 7), sm.Dense(12, 3))


def test_add_shape_mismatch():
    with pytest.raises(ValueError, match=r"Sum: operands must share one shape, got Dense\(3, 5\) \+ Dense\(7, 3\)"):
        sm.Dense(3, 5) + sm.Dense(7, 3)


def test_sub_shape_mismatch():
    # A - B is A + (-1) B: the message names both shapes.
    with pytest.raises(ValueError, match=r"Sum: operands must share one shape, got Dense\(3, 5\) .*\(7, 3"):
        sm.Dense(3, 5) - sm.Dense(7, 3)


def test_sum_of_no_operands():
    with pytest.raises(ValueError, match="Sum: needs at least one operator, got none"):
        sm.Sum()


def test_product_of_no_operands():
    with pytest.raises(ValueError, match="Product: needs at least one operator, got none"):
        sm.Product()


@pytest.mark.parametrize("build", [sm.kron, sm.Kronecker])
def test_kron_of_no_operands(build):
    with pytest.raises(ValueError, match="Kronecker: needs at least one operator, got none"):
        build()


@pytest.mark.parametrize("build", [sm.block_diag, sm.BlockDiagonal])
def test_block_diag_of_no_operands(build):
    with pytest.raises(ValueError, match="BlockDiagonal: needs at least one operator, got none"):
        build()


@pytest.mark.parametrize(
    "args, got",
    [((sm.Dense(3, 5), 3), "int"), ((torch.randn(3, 5),), "Tensor"), ((7,), "int"), ((sm.Dense(3, 5), "A"), "str")],
)
def test_kron_of_non_operators(args, got):
    with pytest.raises(TypeError, match=f"Kronecker: expected LinearOperator operands, got {got}"):
        sm.kron(*args)


@pytest.mark.parametrize(
    "args, got",
    [
        ((sm.Dense(3, 5), 3), "int"),
        ((torch.randn(3, 5),), "Tensor"),
        (("A",), "str"),
        ((sm.Identity(3), None), "NoneType"),
    ],
)
def test_block_diag_of_non_operators(args, got):
    with pytest.raises(TypeError, match=f"BlockDiagonal: expected LinearOperator operands, got {got}"):
        sm.block_diag(*args)


@pytest.mark.parametrize("kind", ["Sum", "Product"])
def test_combinator_of_non_operator(kind):
    with pytest.raises(TypeError, match=f"{kind}: expected LinearOperator operands, got int"):
        getattr(sm, kind)(sm.Dense(3, 3), 3)


def test_transpose_of_non_operator():
    with pytest.raises(TypeError, match="Transpose: expected LinearOperator operands, got int"):
        sm.Transpose(3)


# -- the input x -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 4), (5, 3), (7,), ()])
def test_wrong_last_dim_of_x(shape):
    msg = rf"Dense\(3, 5\): input must have shape \(\.\.\., 5\), got {re.escape(str(shape))}"
    with pytest.raises(ValueError, match=msg):
        sm.Dense(3, 5)(torch.randn(shape))


def test_wrong_last_dim_of_x_for_a_composite():
    op = sm.Dense(3, 5) @ sm.Dense(5, 7)
    with pytest.raises(ValueError, match=r"Product\(3, 7\): input must have shape \(\.\.\., 7\), got \(2, 5\)"):
        op(torch.randn(2, 5))


@pytest.mark.parametrize("x, got", [([1.0] * 5, "list"), (np.ones(5), "ndarray"), (3.0, "float")])
def test_x_not_a_tensor(x, got):
    with pytest.raises(TypeError, match=rf"Dense\(3, 5\): input must be a torch.Tensor, got {got}"):
        sm.Dense(3, 5)(x)


def test_matmul_tensor_wrong_rows():
    msg = r"Dense\(3, 5\) @ tensor: tensor must have shape \(\.\.\., 5, k\), got \(7, 2\)"
    with pytest.raises(ValueError, match=msg):
        sm.Dense(3, 5) @ torch.randn(7, 2)


def test_matmul_scalar_tensor():
    with pytest.raises(ValueError, match=r"Dense\(3, 5\) @ tensor: tensor must have shape \(\.\.\., 5, k\), got \(\)"):
        sm.Dense(3, 5) @ torch.tensor(1.0)


def test_rmatmul_tensor_wrong_cols():
    with pytest.raises(ValueError, match=r"tensor @ Dense\(3, 5\): tensor must have shape \(\.\.\., 3\), got \(2, 5\)"):
        torch.randn(2, 5) @ sm.Dense(3, 5)


def test_x_float64_into_float32_operator():
    msg = r"Dense\(3, 5\): input has dtype torch.float64 but the operator's parameters are torch.float32"
    with pytest.raises(TypeError, match=msg):
        sm.Dense(3, 5, dtype=F32)(torch.randn(2, 5, dtype=F64))


def test_x_float32_into_float64_composite():
    op = sm.Dense(3, 5, dtype=F64) + sm.Dense(3, 5, dtype=F64)
    msg = r"Sum\(3, 5\): input has dtype torch.float32 but the operator's parameters are torch.float64"
    with pytest.raises(TypeError, match=msg):
        op(torch.randn(5))


def test_matmul_tensor_of_wrong_dtype():
    with pytest.raises(TypeError, match=r"Dense\(3, 5\): tensor has dtype torch.float64"):
        sm.Dense(3, 5, dtype=F32) @ torch.randn(5, 2, dtype=F64)


def test_x_on_another_device():
    with pytest.raises(ValueError, match=r"Dense\(3, 5\): input is on meta but the operator's parameters are on cpu"):
        sm.Dense(3, 5)(torch.empty(2, 5, device="meta"))


# -- dtypes and devices of combinations ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build, kind",
    [
        (lambda a, b: a + b, "Sum"),
        (lambda a, b: a - b, "Sum"),
        (lambda a, b: a @ b.T, "Product"),
        (lambda a, b: sm.kron(a, b), "Kronecker"),
        (lambda a, b: sm.block_diag(a, b), "BlockDiagonal"),
    ],
)
def test_mixed_dtypes(build, kind):
    a, b = sm.Dense(3, 5, dtype=F32), sm.Dense(3, 5, dtype=F64)
    msg = rf"{kind}: operators have different dtypes: Dense\(3, 5\) torch.float32, .*torch.float64"
    with pytest.raises(TypeError, match=msg):
        build(a, b)


def test_mixed_devices():
    msg = r"Product: operators are on different devices: Dense\(3, 5\) on cpu, Dense\(5, 7\) on meta"
    with pytest.raises(ValueError, match=msg):
        sm.Dense(3, 5) @ sm.Dense(5, 7, device="meta")


# -- sizes and dtypes of leaves --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build, exc, msg",
    [
        (lambda: sm.Dense(0, 3), ValueError, r"Dense: m \(rows\) must be >= 1, got 0"),
        (lambda: sm.Dense(3, -5), ValueError, r"Dense: n \(columns\) must be >= 1, got -5"),
        (lambda: sm.Dense(2.5, 3), TypeError, r"Dense: m \(rows\) must be an int, got float 2.5"),
        (lambda: sm.Dense(3, "7"), TypeError, r"Dense: n \(columns\) must be an int, got str '7'"),
        (lambda: sm.Dense(True, 3), TypeError, r"Dense: m \(rows\) must be an int, got bool True"),
        (lambda: sm.Identity(-1), ValueError, r"Identity: m \(rows\) must be >= 1, got -1"),
        (lambda: sm.Identity(0), ValueError, r"Identity: m \(rows\) must be >= 1, got 0"),
        (lambda: sm.Identity(3.0), TypeError, r"Identity: m \(rows\) must be an int, got float 3.0"),
        (lambda: sm.Diagonal(0), ValueError, r"Diagonal: m \(rows\) must be >= 1, got 0"),
    ],
)
def test_bad_sizes(build, exc, msg):
    with pytest.raises(exc, match=msg):
        build()


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, "float32"])
def test_non_float_dtype(dtype):
    with pytest.raises(TypeError, match=r"Dense\(2, 3\): dtype must be a floating-point torch.dtype, got "):
        sm.Dense(2, 3, dtype=dtype)


def test_non_float_dtype_diagonal():
    msg = r"Diagonal\(3, 3\): dtype must be a floating-point torch.dtype, got torch.int32"
    with pytest.raises(TypeError, match=msg):
        sm.Diagonal(3, dtype=torch.int32)


def test_dense_from_tensor_wrong_ndim():
    with pytest.raises(ValueError, match=r"Dense.from_tensor: weight must be a 2-D .*got \(5,\)"):
        sm.Dense.from_tensor(torch.ones(5))
    with pytest.raises(ValueError, match=r"Dense.from_tensor: weight must be a 2-D .*got \(2, 3, 5, 7\)"):
        sm.Dense.from_tensor(torch.ones(2, 3, 5, 7))
    with pytest.raises(TypeError, match=r"Dense.from_tensor: weight must be a torch.Tensor, got list"):
        sm.Dense.from_tensor([[1.0, 2.0]])


def test_dense_from_tensor_empty():
    with pytest.raises(ValueError, match=r"Dense: m \(rows\) must be >= 1, got 0"):
        sm.Dense.from_tensor(torch.ones(0, 3))


def test_dense_from_tensor_integer_dtype():
    # The documented default requires_grad=True must not surface torch's "Only Tensors of floating point ... can
    # require gradients" RuntimeError: the dtype check comes first and names the operator.
    with pytest.raises(TypeError, match=r"Dense\(3, 5\): dtype must be a floating-point torch.dtype, got torch.int64"):
        sm.Dense.from_tensor(torch.ones(3, 5, dtype=torch.int64))


def test_dense_from_tensor_integer_dtype_without_grad():
    with pytest.raises(TypeError, match=r"Dense\(3, 5\): dtype must be a floating-point torch.dtype, got torch.int64"):
        sm.Dense.from_tensor(torch.ones(3, 5, dtype=torch.int64), requires_grad=False)


def test_diagonal_from_tensor_wrong_ndim():
    with pytest.raises(ValueError, match=r"Diagonal.from_tensor: diag must be a 1-D tensor, got \(3, 5\)"):
        sm.Diagonal.from_tensor(torch.ones(3, 5))
    with pytest.raises(ValueError, match=r"Diagonal.from_tensor: diag must be a 1-D tensor, got \(\)"):
        sm.Diagonal.from_tensor(torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"Diagonal.from_tensor: diag must be a torch.Tensor, got list"):
        sm.Diagonal.from_tensor([1.0, 2.0])


def test_diagonal_from_tensor_integer_dtype():
    msg = r"Diagonal\(3, 3\): dtype must be a floating-point torch.dtype, got torch.int64"
    with pytest.raises(TypeError, match=msg):
        sm.Diagonal.from_tensor(torch.ones(3, dtype=torch.int64))


def test_dense_of_other_dtype():
    msg = r"Dense\(3, 5\).dense\(dtype=torch.float64\): the operator's parameters are torch.float32"
    with pytest.raises(TypeError, match=msg):
        sm.Dense(3, 5, dtype=F32).dense(dtype=F64)


def test_dense_dtype_not_a_dtype():
    # A string is a plausible slip; it should be named in a TypeError, not reach torch.eye's argument parser.
    with pytest.raises(TypeError, match=r"Identity\(3, 3\).dense.*'float64'"):
        sm.Identity(3).dense(dtype="float64")


# -- queries -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "batch, exc, msg",
    [
        (0, ValueError, r"Dense\(3, 5\).cost: batch must be >= 1, got 0"),
        (-7, ValueError, r"Dense\(3, 5\).cost: batch must be >= 1, got -7"),
        (1.5, TypeError, r"Dense\(3, 5\).cost: batch must be an int, got float 1.5"),
        (True, TypeError, r"Dense\(3, 5\).cost: batch must be an int, got bool True"),
    ],
)
def test_bad_cost_batch(batch, exc, msg):
    with pytest.raises(exc, match=msg):
        sm.Dense(3, 5).cost(batch=batch)


def test_numerical_rank_on_meta():
    op = sm.Dense(3, 5, device="meta") @ sm.Dense(5, 7, device="meta")
    with pytest.raises(ValueError, match=r"numerical_rank\(Product\(3, 7\)\): the operator is on the meta device"):
        sm.numerical_rank(op)


@pytest.mark.parametrize("rtol", [-1, -1e-3, float("nan"), float("inf")])
def test_numerical_rank_bad_rtol(rtol):
    with pytest.raises(
        ValueError, match=rf"numerical_rank\(Dense\(3, 5\)\): rtol must be a finite number >= 0, got {rtol!r}"
    ):
        sm.numerical_rank(sm.Dense(3, 5), rtol=rtol)


@pytest.mark.parametrize("rtol, got", [("0.1", "str"), (True, "bool"), (torch.tensor(0.1), "Tensor")])
def test_numerical_rank_rtol_of_the_wrong_type(rtol, got):
    with pytest.raises(
        TypeError, match=rf"numerical_rank\(Dense\(3, 5\)\): rtol must be a real number or None, got {got}"
    ):
        sm.numerical_rank(sm.Dense(3, 5), rtol=rtol)


def test_numerical_rank_of_a_tensor():
    with pytest.raises(TypeError, match="numerical_rank: expected a LinearOperator, got Tensor"):
        sm.numerical_rank(torch.randn(3, 5))


# -- scalars -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "other, got", [(torch.ones(1), "Tensor"), (torch.tensor(2.0), "Tensor"), (sm.Dense(3, 5), "Dense")]
)
def test_op_times_tensor_or_operator(other, got):
    with pytest.raises(TypeError, match=rf"Dense\(3, 5\) \* {got}: an operator is scaled by a real number"):
        sm.Dense(3, 5) * other


def test_tensor_times_op():
    with pytest.raises(TypeError, match=r"Dense\(3, 5\) \* Tensor: an operator is scaled by a real number"):
        torch.ones(1) * sm.Dense(3, 5)


@pytest.mark.parametrize("zero", [0, 0.0])
def test_divide_by_zero(zero):
    with pytest.raises(ValueError, match=r"Dense\(3, 5\) / 0: division by zero"):
        sm.Dense(3, 5) / zero


@pytest.mark.parametrize("scale", [float("inf"), float("-inf"), float("nan")])
def test_scaled_non_finite(scale):
    with pytest.raises(ValueError, match=rf"Scaled\(Dense\(3, 5\)\): scale must be finite, got {scale}"):
        sm.Scaled(sm.Dense(3, 5), scale)
    with pytest.raises(ValueError, match=rf"Scaled\(Dense\(3, 5\)\): scale must be finite, got {scale}"):
        scale * sm.Dense(3, 5)


@pytest.mark.parametrize(
    "scale, got", [("2", "str"), (True, "bool"), (torch.tensor(2.0), "Tensor"), (None, "NoneType")]
)
def test_scaled_non_real(scale, got):
    with pytest.raises(TypeError, match=rf"Scaled\(Dense\(3, 5\)\): scale must be a real number, got {got}"):
        sm.Scaled(sm.Dense(3, 5), scale)


def test_scaled_of_non_operator():
    with pytest.raises(TypeError, match="Scaled: expected LinearOperator operands, got int"):
        sm.Scaled(3, 2.0)


def test_scaled_of_non_operator_with_bad_scale():
    # Must not be an AttributeError ('int' object has no attribute 'name') from building the message.
    with pytest.raises(TypeError, match="Scaled: expected LinearOperator operands, got int"):
        sm.Scaled(3, "a")


# -- permutations ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "perm, text",
    [
        ([0, 0, 1], r"range\(3\), got \[0, 0, 1\]"),
        ([1, 2, 3], r"range\(3\), got \[1, 2, 3\]"),
        ([], r"range\(0\), got \[\]"),
    ],
)
def test_permutation_not_a_permutation(perm, text):
    with pytest.raises(ValueError, match=rf"Permutation: perm must be a permutation of {text}"):
        sm.Permutation(perm)


def test_permutation_of_non_ints():
    with pytest.raises(TypeError, match=r"Permutation: perm must hold ints, got \[0.0, 1.0\]"):
        sm.Permutation([0.0, 1.0])


@pytest.mark.parametrize(
    "sizes, order, exc, msg",
    [
        ((3, 0), (1, 0), ValueError, r"Permutation.from_axes: sizes must be positive ints, got \(3, 0\)"),
        ((), (), ValueError, r"Permutation.from_axes: sizes must be positive ints, got \(\)"),
        ((3.0, 5), (1, 0), TypeError, r"Permutation.from_axes: sizes must be positive ints, got \(3.0, 5\)"),
        ((3, 5), (0, 0), ValueError, r"Permutation.from_axes: order must be a permutation of range\(2\), got \(0, 0\)"),
        (
            (3, 5),
            (0, 1, 2),
            ValueError,
            r"Permutation.from_axes: order must be a permutation of range\(2\), got \(0, 1, 2\)",
        ),
    ],
)
def test_permutation_from_axes(sizes, order, exc, msg):
    with pytest.raises(exc, match=msg):
        sm.Permutation.from_axes(sizes, order)


def test_permutation_from_axes_float_order():
    # sorted((1.0, 0.0)) == [0, 1], so the order passes the check and reaches torch's permute(), whose TypeError
    # does not name Permutation.from_axes.
    with pytest.raises((TypeError, ValueError), match=r"Permutation.from_axes: order .*\(1.0, 0.0\)"):
        sm.Permutation.from_axes((3, 5), (1.0, 0.0))


def test_permutation_from_axes_sizes_not_a_sequence():
    # from_axes(15, ...) raises Python's bare "'int' object is not iterable".
    with pytest.raises((TypeError, ValueError), match=r"Permutation.from_axes: sizes .*15"):
        sm.Permutation.from_axes(15, (0,))


# -- TensorNetwork specs -----------------------------------------------------------------------------------------
def test_spec_not_a_str():
    with pytest.raises(TypeError, match="TensorNetwork: spec must be a str, got int"):
        sm.TensorNetwork(42)
    with pytest.raises(TypeError, match="TensorNetwork: spec must be a str, got bytes"):
        sm.TensorNetwork(b"y[o] = U[o,i] x[i]")


def test_spec_without_equals():
    spec = "y[o] U[o,r] V[r,i] x[i]"
    with pytest.raises(ValueError, match=where(spec) + r": expected the form .* found no '='"):
        tn(spec, LR_SIZES)


@pytest.mark.parametrize(
    "spec, got",
    [("z[o] = U[o,i] x[i]", "z[o]"), ("y = U[o,i] x[i]", "y"), ("y[o] y[o] = U[o,i] x[i]", "y[o] y[o]")],
)
def test_spec_left_side_not_y(spec, got):
    msg = where(spec) + r": the left side must be y\[labels\], got " + re.escape(repr(got))
    with pytest.raises(ValueError, match=msg):
        tn(spec, dict(o=3, i=5))


@pytest.mark.parametrize("spec, count", [("y[o] = U[o,i]", 0), ("y[o] = U[o,i] x[i] x[i]", 2)])
def test_spec_x_missing_or_twice(spec, count):
    msg = where(spec) + rf": the right side must hold the input x\[labels\] exactly once, found {count}"
    with pytest.raises(ValueError, match=msg):
        tn(spec, dict(o=3, i=5))


@pytest.mark.parametrize(
    "spec, pos, found",
    [
        ("y[o] = U[o,r] V(r,i) x[i]", 14, "'V(r,i) x[i]'"),
        ("y[o] = U[o,r] * V[r,i] x[i]", 14, "'* V[r,i] x[i'"),
        ("y[o] = U[o,i] x[i] +", 19, "'+'"),
        ("y[o] = U[o,i] = x[i]", 14, "'= x[i]'"),
    ],
)
def test_spec_term_does_not_parse(spec, pos, found):
    assert spec[pos] == found[1]  # the position points at the offending character
    msg = where(spec) + rf": expected a term like F\[a,b\] at position {pos}, found {re.escape(found)}"
    with pytest.raises(ValueError, match=msg):
        tn(spec, dict(o=3, r=2, i=5))


def test_spec_bad_label():
    spec = "y[o] = U[o,1r] V[1r,i] x[i]"
    with pytest.raises(ValueError, match=where(spec) + r": bad label '1r' in U\[o,1r\]; labels are identifiers"):
        tn(spec, dict(o=3, i=5))


@pytest.mark.parametrize(
    "spec, term", [("y[o] = U[o,o] V[o,i] x[i]", r"U\[o,o\]"), ("y[o,o] = U[o,i] x[i]", r"y\[o,o\]")]
)
def test_spec_label_twice_in_a_term(spec, term):
    with pytest.raises(ValueError, match=where(spec) + rf": label 'o' appears twice in {term}"):
        tn(spec, dict(o=3, i=5))


def test_spec_factor_twice():
    spec = "y[o] = U[o,r] U[r,i] x[i]"
    with pytest.raises(ValueError, match=where(spec) + r": factor 'U' appears twice"):
        tn(spec, LR_SIZES)


def test_unknown_label_in_sizes():
    msg = where(LOWRANK) + r": unknown label 'q' in sizes; the spec's labels are \['i', 'o', 'r'\]"
    with pytest.raises(ValueError, match=msg):
        tn(LOWRANK, dict(o=3, r=2, i=5, q=7))


@pytest.mark.parametrize("size", [0, -3])
def test_size_out_of_range_in_sizes(size):
    with pytest.raises(ValueError, match=where(LOWRANK) + rf": size of label 'r' must be >= 1, got {size!r}"):
        tn(LOWRANK, dict(o=3, r=size, i=5))


@pytest.mark.parametrize("size, got", [(2.0, "float 2.0"), (True, "bool True"), (None, "NoneType None")])
def test_size_of_the_wrong_type_in_sizes(size, got):
    with pytest.raises(TypeError, match=where(LOWRANK) + rf": size of label 'r' must be an int, got {got}"):
        tn(LOWRANK, dict(o=3, r=size, i=5))


@pytest.mark.parametrize(
    "sizes, got", [([3, 2, 5], "list"), ((3, 2, 5), "tuple"), (torch.tensor([3, 2, 5]), r"Tensor of shape \(3,\)")]
)
def test_sizes_not_a_mapping(sizes, got):
    with pytest.raises(
        TypeError, match=where(LOWRANK) + rf": sizes must be a mapping of label sizes, e\.g\. .*, got {got}$"
    ):
        tn(LOWRANK, sizes)


def test_factors_not_a_mapping():
    with pytest.raises(
        TypeError, match=where(LOWRANK) + r": factors must be a mapping of tensors by factor name, got list"
    ):
        tn(LOWRANK, LR_SIZES, [torch.randn(3, 2), torch.randn(2, 5)])


def test_label_with_two_sizes_from_sizes_and_factor():
    with pytest.raises(ValueError, match=where(LOWRANK) + r": label 'r' has two sizes: 2 \(sizes\) and 7 \(U axis 1\)"):
        tn(LOWRANK, dict(o=3, r=2, i=5), factors=dict(U=torch.randn(3, 7)))


def test_label_with_two_sizes_from_two_factors():
    msg = where(LOWRANK) + r": label 'r' has two sizes: 2 \(U axis 1\) and 7 \(V axis 0\)"
    with pytest.raises(ValueError, match=msg):
        tn(LOWRANK, dict(o=3, i=5), factors=dict(U=torch.randn(3, 2), V=torch.randn(7, 5)))


def test_label_with_no_size():
    with pytest.raises(ValueError, match=where(LOWRANK) + r": no size for label\(s\) \['r'\]; pass them in sizes"):
        tn(LOWRANK, dict(o=3, i=5))


def test_labels_with_no_size_are_all_listed():
    with pytest.raises(ValueError, match=where(LOWRANK) + r": no size for label\(s\) \['i', 'r'\]"):
        tn(LOWRANK, dict(o=3))


def test_output_label_in_no_factor_and_not_in_x():
    spec = "y[o,p] = U[o,r] V[r,i] x[i]"
    with pytest.raises(ValueError, match=where(spec) + r": output label 'p' appears in no factor and not in x"):
        tn(spec, dict(o=3, r=2, i=5, p=7))


def test_input_label_in_no_factor_and_not_in_y():
    spec = "y[o] = U[o,r] V[r,i] x[i,a]"
    with pytest.raises(ValueError, match=where(spec) + r": input label 'a' appears in no factor and not in y"):
        tn(spec, dict(o=3, r=2, i=5, a=7))


def test_factor_not_in_spec():
    with pytest.raises(ValueError, match=where(LOWRANK) + r": factor 'W' is given but the spec has only \['U', 'V'\]"):
        tn(LOWRANK, LR_SIZES, factors=dict(W=torch.randn(3, 2)))


def test_factor_with_wrong_ndim():
    msg = where(LOWRANK) + r": factor 'U' has labels \[o,r\] but a tensor of shape \(3, 2, 5\)"
    with pytest.raises(ValueError, match=msg):
        tn(LOWRANK, LR_SIZES, factors=dict(U=torch.randn(3, 2, 5)))


def test_factor_not_a_tensor():
    with pytest.raises(TypeError, match=where(LOWRANK) + r": factor 'U' must be a torch.Tensor, got list"):
        tn(LOWRANK, LR_SIZES, factors=dict(U=[[1.0, 2.0]] * 3))


def test_factor_named_y():
    spec = "y[o] = y[o,i] x[i]"
    with pytest.raises(ValueError, match=where(spec) + r": y is the output and cannot be a factor"):
        tn(spec, dict(o=3, i=5))


@pytest.mark.parametrize("name", ["_w", "_network", "__dict__"])
def test_factor_name_with_underscore(name):
    spec = f"y[o] = {name}[o,i] x[i]"
    with pytest.raises(ValueError, match=where(spec) + rf": '{name}' cannot be a factor name"):
        tn(spec, dict(o=3, i=5))


@pytest.mark.parametrize("name", ["forward", "T", "cost", "shape", "training", "dense", "to", "spec"])
def test_factor_name_that_the_operator_uses(name):
    # 'spec' is set on the operator after the attribute check, so torch's register_parameter raises a bare
    # KeyError("attribute 'spec' already exists"); it must be the same ValueError as the other reserved names.
    spec = f"y[o] = {name}[o,i] x[i]"
    with pytest.raises(ValueError, match=where(spec) + rf": '{name}' cannot be a factor name"):
        tn(spec, dict(o=3, i=5))


def test_factors_with_different_dtypes():
    msg = where(LOWRANK) + r": the given factors have different dtypes \['torch.float32', 'torch.float64'\]"
    with pytest.raises(TypeError, match=msg):
        tn(LOWRANK, factors=dict(U=torch.randn(3, 2), V=torch.randn(2, 5, dtype=F64)))


def test_factor_dtype_against_dtype_argument():
    msg = where(LOWRANK) + r": the given factors have dtype torch.float32 but dtype=torch.float64"
    with pytest.raises(TypeError, match=msg):
        tn(LOWRANK, factors=dict(U=torch.randn(3, 2), V=torch.randn(2, 5)), dtype=F64)


def test_factors_on_different_devices():
    msg = where(LOWRANK) + r": the given factors are on different devices \['cpu', 'meta'\]"
    with pytest.raises(ValueError, match=msg):
        tn(LOWRANK, factors=dict(U=torch.randn(3, 2), V=torch.empty(2, 5, device="meta")))


def test_integer_factor():
    spec = "y[o] = U[o,i] x[i]"
    with pytest.raises(TypeError, match=where(spec) + r": dtype must be a floating-point torch.dtype, got torch.int64"):
        tn(spec, factors=dict(U=torch.ones(3, 5, dtype=torch.int64)))


def test_integer_dtype_argument():
    spec = "y[o] = U[o,i] x[i]"
    with pytest.raises(TypeError, match=where(spec) + r": dtype must be a floating-point torch.dtype, got torch.int64"):
        tn(spec, dict(o=3, i=5), dtype=torch.int64)


def test_factor_with_an_empty_output_axis():
    spec = "y[o] = U[o,i] x[i]"
    with pytest.raises(ValueError, match=r"TensorNetwork.*must be >= 1, got 0"):
        tn(spec, factors=dict(U=torch.ones(0, 5)))


def test_factor_with_an_empty_summed_axis():
    # sizes=dict(r=0) is rejected, but the same size 0 coming from the given factors' shapes is accepted silently
    # (an operator of rank 0 with no parameters). It should be the same error, naming the label.
    with pytest.raises(ValueError, match=where(LOWRANK) + r": .*label 'r'.*0"):
        tn(LOWRANK, factors=dict(U=torch.randn(3, 0), V=torch.randn(0, 5)))


def test_tensor_network_with_too_many_labels_is_rejected_at_construction():
    # 55 factors in a chain: labels o, a1..a55 = 56 > 51 (torch's einsum has 52 letters, one is the batch)
    spec = "y[o] = F0[o,a1] " + " ".join(f"F{k}[a{k},a{k + 1}]" for k in range(1, 55)) + " x[a55]"
    sizes = {"o": 2, **{f"a{k}": 2 for k in range(1, 56)}}
    with pytest.raises(ValueError, match=r"TensorNetwork\(2, 2\): its tensor network has 56 labels; one einsum"):
        sm.TensorNetwork(spec, sizes=sizes)


# -- heads: TypeError for a non-int, ValueError out of range, in every family --------------------------------------
HEADS_BUILDERS = {
    "Dense": lambda h: sm.Dense(3, 5, heads=h),
    "LowRank": lambda h: sm.LowRank(7, 5, rank=2, heads=h),
    "TensorNetwork": lambda h: tn(LOWRANK, LR_SIZES, heads=h),
    "MultiLevel": lambda h: sm.MultiLevel(12, 12, [sm.LevelRecipe(sm.Dense)], heads=h),
    "BlockDiagonal.from_sizes": lambda h: sm.BlockDiagonal.from_sizes(12, 20, 4, heads=h),
    "BlockDiagonal": lambda h: sm.BlockDiagonal(sm.Dense(2, 3, heads=12), heads=h),
}


@pytest.mark.parametrize("name", sorted(HEADS_BUILDERS))
@pytest.mark.parametrize("heads, got", [(2.0, "float 2.0"), (True, "bool True"), ("2", "str '2'")])
def test_heads_of_the_wrong_type(name, heads, got):
    with pytest.raises(TypeError, match=rf"heads must be None or an int >= 1, got {got}"):
        HEADS_BUILDERS[name](heads)


@pytest.mark.parametrize("name", sorted(HEADS_BUILDERS))
@pytest.mark.parametrize("heads", [0, -3])
def test_heads_out_of_range(name, heads):
    with pytest.raises(ValueError, match=rf"heads must be None or an int >= 1, got {heads}"):
        HEADS_BUILDERS[name](heads)


@pytest.mark.parametrize(
    "args, exc, msg",
    [
        ((12.0, 20, 4), TypeError, r"m must be an int, got float 12\.0"),
        ((12, 20, "4"), TypeError, r"nblocks must be an int, got str '4'"),
        ((12, -20, 4), ValueError, r"n must be >= 1, got -20"),
    ],
)
def test_block_diagonal_from_sizes_types(args, exc, msg):
    with pytest.raises(exc, match=msg):
        sm.BlockDiagonal.from_sizes(*args)


# -- a tensor where an operator is expected: named by type and shape, never by its values ----------------------------
VALUES = torch.full((3, 5), 12345.678)


@pytest.mark.parametrize(
    "build, msg",
    [
        (
            lambda: sm.Sum(sm.Dense(3, 5), VALUES),
            r"Sum: expected LinearOperator operands, got Tensor of shape \(3, 5\) ",
        ),
        (lambda: sm.Product(VALUES, sm.Dense(5, 7)), r"Product: expected LinearOperator operands, got Tensor of shape"),
        (lambda: sm.kron(sm.Dense(3, 5), VALUES), r"Kronecker: expected LinearOperator operands, got Tensor of shape"),
        (lambda: sm.block_diag(VALUES), r"BlockDiagonal: expected LinearOperator operands, got Tensor of shape"),
        (lambda: sm.Scaled(VALUES, 2.0), r"Scaled: expected LinearOperator operands, got Tensor of shape \(3, 5\)"),
        (lambda: sm.Dense(3, 5) + VALUES, r"Dense\(3, 5\) \+ Tensor of shape \(3, 5\): an operator adds only to"),
        (lambda: VALUES + sm.Dense(3, 5), r"Tensor of shape \(3, 5\) \+ Dense\(3, 5\): an operator adds only to"),
        (lambda: sm.Dense(3, 5) - VALUES, r"Dense\(3, 5\) - Tensor of shape \(3, 5\): an operator adds only to"),
        (lambda: VALUES - sm.Dense(3, 5), r"Tensor of shape \(3, 5\) - Dense\(3, 5\): an operator adds only to"),
        (lambda: sm.Dense(3, 5) * VALUES, r"Dense\(3, 5\) \* Tensor: an operator is scaled by a real number"),
    ],
)
def test_tensor_operand_is_named_without_its_values(build, msg):
    with pytest.raises(TypeError, match=msg) as info:
        build()
    assert "12345" not in str(info.value)


def test_block_level_of_a_built_operator():
    with pytest.raises(
        TypeError,
        match=r"LevelRecipe: family must be an operator class or a factory called as family\(rows, cols, \.\.\.\) for "
        r"every block, got the built operator Dense\(5, 3\); pass its class",
    ):
        sm.LevelRecipe(sm.Dense(5, 3), blocks=2)
    with pytest.raises(TypeError, match=r"got the built operator Linear"):
        sm.LevelRecipe(torch.nn.Linear(3, 5))


# -- scalars whose product leaves float64 --------------------------------------------------------------------------
def test_scalars_whose_product_overflows():
    A = sm.Dense(3, 5)
    with pytest.raises(
        ValueError,
        match=r"Scaled\(3, 5, scale=1e\+308\): the product of its scalars \[1e\+308, 1e\+308\] overflows float64",
    ):
        (A * 1e308) * 1e308
    with pytest.raises(ValueError, match=r"Scaled\(3, 5, scale=-1e\+308\): the product of its scalars"):
        (-A * 1e308) * -1e308
    with pytest.raises(ValueError, match=r"Product\(3, 7\): the product of its scalars \[1e\+200, 1e\+200\] overflows"):
        (1e200 * A) @ (1e200 * sm.Dense(5, 7))
    with pytest.raises(
        ValueError, match=r"Kronecker\(6, 20\): the product of its scalars \[1e\+160, 1e\+160\] overflows"
    ):
        sm.kron(1e160 * A, 1e160 * sm.Dense(2, 4))
    with pytest.raises(ValueError, match=r"Scaled\(5, 5, scale=1e\+300\): the product of its scalars"):
        (1e300 * sm.Permutation([4, 0, 3, 1, 2])) * 1e300  # a gather's scale too


def test_scalars_whose_product_underflows_to_zero():
    with pytest.raises(
        ValueError, match=r"the product of its nonzero scalars \[1e-200, 1e-200\] underflows float64 to 0"
    ):
        (sm.Dense(3, 5) * 1e-200) * 1e-200
    # a zero asked for is not an underflow
    assert (0.0 * (sm.Dense(3, 5) * 1e-200)).rank() == sm.Rank(0, True)


@pytest.mark.parametrize(
    "build, msg",
    [
        (lambda: sm.Diagonal(VALUES), r"Diagonal: m \(rows\) must be an int, got Tensor of shape \(3, 5\)"),
        (lambda: sm.Dense(3, VALUES), r"Dense: n \(columns\) must be an int, got Tensor of shape \(3, 5\)"),
        (
            lambda: sm.Dense(3, 5, heads=VALUES),
            r"Dense: heads must be None or an int >= 1, got Tensor of shape \(3, 5\)",
        ),
        (lambda: sm.Dense(3, 5).cost(batch=VALUES), r"cost: batch must be an int, got Tensor of shape \(3, 5\)"),
        (
            lambda: tn(LOWRANK, dict(o=3, r=VALUES, i=5)),
            r"size of label 'r' must be an int, got Tensor of shape \(3, 5\)",
        ),
    ],
)
def test_a_tensor_as_a_size_is_named_without_its_values(build, msg):
    with pytest.raises(TypeError, match=msg) as info:
        build()
    assert "12345" not in str(info.value)
