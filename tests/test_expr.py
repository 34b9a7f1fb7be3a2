"""structmat.expr: the whitelist parser, the printer, and their round trip."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import zoo
from hypothesis import given
from hypothesis import strategies as st
from zoo import ZOO, build

import structmat as sm
from structmat.expr import REGISTRY, parse, to_expr

META = "meta"


def structure(op: sm.LinearOperator) -> tuple:
    """What an expression fixes: classes, shapes, heads, nesting, scales, and for leaves the parameter count and rank
    (which pin down the family's hyperparameters). Independent of to_expr, so the round trip is checked against it."""
    extra: object = None
    if isinstance(op, sm.Scaled):
        extra = op.scale
    elif isinstance(op, sm.Permutation):
        extra = op.perm
    kids = tuple(structure(k) for k in op._operands())
    leaf = (op.num_params, op.rank()) if not kids else None
    return (type(op).__name__, op.shape, op.heads, extra, leaf, kids)


def tree(op: sm.LinearOperator) -> list[tuple]:
    """The operator tree, node by node in pre-order, written independently of to_expr: class, shape, heads, name (which
    carries the structural arguments), scale, permutation, spec, the names and shapes of the node's own parameters,
    and which earlier node it is when an object is used twice (the sharing pattern)."""
    seen: dict[int, int] = {}
    out: list[tuple] = []
    stack = [op]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            out.append(("again", seen[id(node)]))
            continue
        seen[id(node)] = len(seen)
        extra: object = None
        if isinstance(node, sm.Scaled):
            extra = node.scale
        elif isinstance(node, sm.Permutation):
            extra = node._axes if node._axes is not None else node.perm
        elif isinstance(node, sm.TensorNetwork):
            extra = node.spec
        own = tuple((name, tuple(p.shape)) for name, p in node.named_parameters(recurse=False))
        out.append((type(node).__name__, node.shape, node.heads, node.name, extra, own, len(node._operands())))
        stack.extend(reversed(node._operands()))
    return out


def assert_same_structure(op: sm.LinearOperator, back: sm.LinearOperator, batch: int = 3) -> None:
    """Structurally equal: the same tree (classes, shapes, heads, arguments, sharing), the same expression again, and
    the same parameter count, rank and cost."""
    assert tree(back) == tree(op)
    assert to_expr(back) == to_expr(op)
    assert back.num_params == op.num_params
    assert back.rank() == op.rank()
    assert back.cost(batch) == op.cost(batch)


def roundtrip(op: sm.LinearOperator) -> sm.LinearOperator:
    text = to_expr(op)
    back = parse(text, device=META)
    assert structure(back) == structure(op), text
    assert_same_structure(op, back)
    return back


def D(m: int, n: int, **kw) -> sm.Dense:  # noqa: N802
    return sm.Dense(m, n, device=META, **kw)


# -- round trips ------------------------------------------------------------------------------------------------------
CASES = {
    "dense": lambda: D(5, 7),
    "dense_heads": lambda: D(5, 7, heads=3),
    "identity": lambda: sm.Identity(6),
    "diag": lambda: sm.Diagonal(5, device=META),
    "axis_permutation": lambda: sm.Permutation.from_axes((3, 4, 2), (2, 0, 1)),
    "sum_python": lambda: D(2, 3) + D(2, 3) + D(2, 3),
    "sum_nary": lambda: sm.Sum(D(2, 3), D(2, 3), D(2, 3)),
    "difference": lambda: D(2, 3) - D(2, 3),
    "difference_of_difference": lambda: (D(2, 3) - D(2, 3)) - (D(2, 3) - D(2, 3)),
    "negated_first": lambda: -D(2, 3) + D(2, 3),
    "negate_twice": lambda: -(-D(2, 3)),  # noqa: B002 - a double negation is the case under test
    "scale_negated": lambda: 2.0 * (-D(2, 3)),
    "negate_scaled": lambda: -(2.0 * D(2, 3)),
    "scale_scaled": lambda: 3.0 * (0.5 * D(2, 3)),
    "negative_scale_in_sum": lambda: D(2, 3) + (-2.5) * D(2, 3),
    "tiny_and_huge_scales": lambda: 1e-20 * D(2, 2) + (-1e300) * D(2, 2) + (1 / 3) * D(2, 2),
    "division": lambda: D(2, 2) / 7,
    "product_python": lambda: (D(2, 3) @ D(3, 4)) @ D(4, 5),
    "product_right_nested": lambda: D(2, 3) @ (D(3, 4) @ D(4, 5)),
    "product_nary": lambda: sm.Product(D(2, 3), D(3, 4), D(4, 5)),
    "scaled_in_product": lambda: (0.1 * D(2, 2)) @ D(2, 2) @ (-D(2, 2)),
    "product_in_scaled": lambda: 0.1 * (D(2, 3) @ D(3, 2)),
    "product_of_sums": lambda: (D(4, 6) + D(4, 6)) @ (D(6, 5) - D(6, 5)),
    "transpose": lambda: D(5, 7).T,
    "transpose_twice": lambda: sm.Transpose(sm.Transpose(D(5, 7))),
    "transpose_thrice": lambda: sm.Transpose(sm.Transpose(sm.Transpose(D(5, 7)))),
    "block_diag_of_stack_heads": lambda: sm.BlockDiagonal(D(3, 5, heads=6), heads=2),
    "block_diag_from_sizes_heads": lambda: sm.BlockDiagonal.from_sizes(12, 20, 4, heads=3, device=META),
    "general_permutation": lambda: sm.Permutation([3, 0, 4, 1, 2]) @ D(5, 2),
    "tensor_network_heads": lambda: sm.TensorNetwork(
        "y[c,d] = L[c,d,a] R[a,c,b] x[a,b]", sizes=dict(a=2, b=3, c=4, d=5), heads=3, device=META
    ),
    "shared": lambda: (lambda a: a @ a.T - 2.0 * a @ a.T)(D(3, 5)),
    "shared_nested": lambda: (
        lambda a: (lambda s: sm.kron(s, s.T) + sm.kron(a, sm.Identity(3)) @ sm.kron(s, a))(a + a)
    )(D(3, 3)),
    "shared_transpose": lambda: (lambda t: t + sm.Transpose(t))(D(4, 4).T),
    "transpose_of_sum": lambda: (D(2, 2) + D(2, 2)).T,
    "transpose_of_negation": lambda: (-D(2, 2)).T,
    "negation_of_transpose": lambda: -D(2, 2).T,
    "kron": lambda: sm.kron(D(2, 3), D(5, 4)),
    "kron_single": lambda: sm.Kronecker(D(2, 3)),
    "kron_mixed": lambda: sm.kron(D(2, 3) + D(2, 3), sm.Diagonal(4, device=META), sm.Identity(3)).T,
    "block_diag": lambda: sm.block_diag(D(2, 3), sm.Identity(4), 2.0 * D(1, 1)),
    "block_diag_of_stack": lambda: sm.BlockDiagonal(D(3, 5, heads=4)),
    "nested": lambda: sm.kron(sm.block_diag(D(2, 2), D(1, 3) @ D(3, 1)), sm.Identity(2)) - 0.25 * D(6, 6).T @ D(6, 6),
    "stack_of_heads": lambda: D(3, 4, heads=2) @ D(4, 3, heads=2) + 2 * sm.Identity(3),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_roundtrip(name: str) -> None:
    roundtrip(CASES[name]())


EXPRS = [(name, text) for name, entry in sorted(zoo.FAMILIES.items()) for text in entry.exprs]


@pytest.mark.parametrize("name, text", EXPRS)
def test_family_roundtrip(name: str, text: str) -> None:
    op = parse(text, device=META)
    assert type(op) is zoo.FAMILIES[name].cls
    assert to_expr(op) == text
    roundtrip(op)
    roundtrip(0.5 * op.T @ op + op.T @ op)


def test_lowrank_in_a_product() -> None:
    op = parse("dense(1000000, 1000000) @ lowrank(1000000, 1000000, rank=8)", device=META)
    assert op.rank().bound == 8
    roundtrip(op)


# -- what parse builds ------------------------------------------------------------------------------------------------
def test_parse_follows_python_precedence() -> None:
    op = parse("dense(2, 3) + 2 * dense(2, 4) @ dense(3, 4).T.T.T - dense(3, 2).T", device=META)
    assert isinstance(op, sm.Sum) and len(op.terms) == 3
    a, b, c = op.terms
    assert isinstance(a, sm.Dense)
    assert isinstance(b, sm.Product) and isinstance(b.factors[0], sm.Scaled) and b.factors[0].scale == 2.0
    assert isinstance(b.factors[1], sm.Transpose) and type(b.factors[1].op) is sm.Dense  # A.T.T.T is A.T
    assert isinstance(c, sm.Scaled) and c.scale == -1.0 and isinstance(c.op, sm.Transpose)
    # unary minus binds looser than .T and tighter than * (as in Python)
    neg = parse("-dense(2, 3).T * 3", device=META)
    assert isinstance(neg, sm.Scaled) and neg.scale == 3.0
    assert isinstance(neg.op, sm.Scaled) and neg.op.scale == -1.0 and isinstance(neg.op.op, sm.Transpose)
    # * and @ share one level, left to right: (A @ B) * 2 @ C
    mixed = parse("dense(2, 3) @ dense(3, 4) * 2 @ dense(4, 5)", device=META)
    assert isinstance(mixed, sm.Product) and len(mixed.factors) == 2
    assert isinstance(mixed.factors[0], sm.Scaled) and isinstance(mixed.factors[0].op, sm.Product)


def test_parse_numbers() -> None:
    op = parse("-2 * 1.5e1 * dense(2 * 3, 1_000 - 990) / 4 * .5", device=META)
    assert op.shape == (6, 10)
    assert isinstance(op, sm.Scaled) and op.scale == 0.5
    assert isinstance(op.op, sm.Scaled) and op.op.scale == 0.25
    assert op.op.op.scale == -30.0 and isinstance(op.op.op.op, sm.Dense)
    assert parse("dense(3, 3) * 2").scale == 2.0  # type: ignore[attr-defined]


def test_parse_whitespace_and_trailing_comma() -> None:
    op = parse("  kron(\n  dense(2, 3),\n  identity(4),\n)\t", device=META)
    assert isinstance(op, sm.Kronecker) and op.shape == (8, 12)


def test_parse_dtype_and_device() -> None:
    op = parse("dense(2, 3) @ diag(3) + identity(2) @ dense(2, 3)", dtype=torch.float64)
    assert op.dtype == torch.float64 and op.device.type == "cpu"
    assert {p.dtype for p in op.parameters()} == {torch.float64}
    x = torch.randn(4, 3, dtype=torch.float64)
    assert op(x).shape == (4, 2)
    meta = parse("dense(2, 3)", device=META)
    assert meta.device.type == "meta"
    assert parse("identity(3)", dtype=torch.float64).dtype is None  # Identity takes neither


def test_parse_huge_on_meta_allocates_nothing() -> None:
    op = parse("dense(1000000, 1000000) @ (dense(1000000, 8) @ dense(8, 1000000))", device=META)
    assert op.num_params == 10**12 + 16 * 10**6
    assert all(p.device.type == "meta" for p in op.parameters())
    assert op.rank().bound == 8


def test_parse_aliases_and_registry_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    assert type(parse("diagonal(4)", device=META)) is sm.Diagonal
    monkeypatch.setitem(REGISTRY, "square", lambda n, *, device=None: sm.Dense(n, n, device=device))
    op = parse("square(5) @ dense(5, 2)", device=META)
    assert op.shape == (5, 2) and op.factors[0].device.type == "meta"  # type: ignore[attr-defined]


def test_parse_permute_axes() -> None:
    op = parse("permute_axes([2, 3], [1, 0])")
    assert op(torch.arange(6.0)).tolist() == [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]


def test_parsed_parameters_are_new() -> None:
    a = sm.Dense(3, 3)
    b = parse(to_expr(a + a))
    assert to_expr(a + a) == "v1 = dense(3, 3); v1 + v1"
    assert b.num_params == 9 and b.terms[0] is b.terms[1]  # type: ignore[attr-defined] - the sharing is kept
    assert b.terms[0].weight is not a.weight  # type: ignore[attr-defined] - but the values are not
    assert parse("dense(3, 3) + dense(3, 3)").num_params == 18


# -- errors -----------------------------------------------------------------------------------------------------------
ERRORS = [
    ("foo(3)", r"unknown name 'foo' at position 0; known names: .*dense"),
    ("dense(2, 2) + foo(3)", r"unknown name 'foo' at position 14"),
    ("__import__('os').system('ls')", r"unknown name '__import__' at position 0"),
    ("dense(2, 2).T.__class__", r"attribute access '\.__class__' is not allowed at position 13"),
    ("__import__(1)", r"unknown name '__import__' at position 0"),
    ("eval(1)", r"unknown name 'eval' at position 0"),
    ("dense(2,2).__class__", r"attribute access '\.__class__' is not allowed at position 10 \(only \.T"),
    ("dense(2, 3).weight", r"attribute access '\.weight' is not allowed at position 11"),
    ("dense(2, 3).T.mT", r"attribute access '\.mT' is not allowed at position 13"),
    ("dense(2, 3).", r"attribute access '\.' is not allowed at position 11"),
    ("(dense(2,2))(3)", r"call of an expression at position 12; only whitelisted names can be called"),
    ("dense(2, 2)(3)", r"call of an expression at position 11"),
    ("dense(2, 2).T(3)", r"call of an expression at position 13"),
    ("dense(2, 2)[0]", r"indexing is not allowed at position 11"),
    ("dense", r"'dense' is not called at position 0; write dense\(\.\.\.\)"),
    ("dense(2, 3", r"unbalanced parentheses: '\(' is never closed at position 5"),
    ("(dense(2, 3) + dense(2, 3)", r"unbalanced parentheses: '\(' is never closed at position 0"),
    ("dense(2, 3))", r"unbalanced parentheses: '\)' without a matching '\(' at position 11"),
    ("dense(2, 3) + )", r"unbalanced parentheses: '\)' without a matching '\(' at position 14"),
    ("permute_axes([2, 3], [1, 0)", r"expected ',' or '\]' in the list, found '\)' at position 26"),
    ("permute_axes([2, 3], [1, 0", r"unbalanced brackets: '\[' is never closed at position 21"),
    ("()", r"unexpected '\)' at position 1; expected a number"),
    ("", r"empty expression at position 0"),
    ("   ", r"empty expression at position 3"),
    ("dense(2, 3) +", r"unexpected end of input at position 13"),
    ("dense(2, 3) dense(2, 3)", r"unexpected 'dense' at position 12; expected an operator"),
    ("dense(2 3)", r"expected ',' or '\)' in the arguments of dense\(\), found '3' at position 8"),
    ("dense(2, 3) ** 2", r"unexpected '\*' after '\*' at position 13 \(no \*\* or //\)"),
    ("dense(2, 3) ; 1", r"unexpected ';' at position 12; expected an operator"),
    ("dense(2, 3) ? 1", r"unexpected character '\?' at position 12"),
    ("dense(2, 3) # comment", r"unexpected character '#' at position 12"),
    ("dense('2', 3)", r"dense\('2', 3\) at position 0: Dense: m \(rows\) must be an int, got str '2'"),
    ('tensor_network("y[o] = W[o,i] x[i], sizes=dict(o=2, i=2))', r"unterminated string: \" is never closed at pos"),
    (r'tensor_network("y[o] = W[o,i] x[i]\q")', r"unknown escape '\\\\q' in a string at position 34"),
    ('dense(2, 2) + "x"', r"a string cannot be added or subtracted at position 14"),
    ("2 * (1, 2)", r"a tuple cannot be multiplied at position 4"),
    ("dict(a=1) @ dense(2, 2)", r"a mapping cannot be multiplied at position 0"),
    ("dense(2, 2) @ (1,)", r"a tuple cannot be multiplied at position 14"),
    ("dense(2, 2).T.T.T.x", r"attribute access '\.x' is not allowed at position 17"),
    ("(1, 2", r"unbalanced parentheses: '\(' is never closed at position 0"),
    ("(1, 2]", r"expected ',' or '\)' in the tuple, found '\]' at position 5"),
    ("v = dense(2, 2); w", r"unknown name 'w' at position 17; known names: .*; assigned names: v"),
    ("dense = identity(2); dense", r"cannot assign to 'dense' at position 0; it is a registered name"),
    ("v = identity(2); v = identity(2); v", r"'v' is assigned twice at position 17"),
    ("v = identity(2) v", r"expected ';' after the assignment to 'v', found 'v' at position 16"),
    ("v = identity(2);", r"unexpected end of input after ';' at position 16"),
    ("v = identity(2); v(3)", r"call of an expression at position 18"),
    ("v = 3; v", r"the expression is a number, not an operator"),
    ("identity(2) = 3", r"unexpected '=' at position 12; an assignment is NAME = expression;"),
    ("multilevel(4, 4, [dense(4, 4), 3])", r"multilevel\(4, 4, .* at position 0: MultiLevel\(4, 4\): levels\[1\]"),
    ("permutation(5)", r"permutation\(5\) at position 0: Permutation: perm must be a sequence of ints .* got int 5"),
    ("permutation([0, 0])", r"permutation\(\[0, 0\]\) at position 0: .*0 appears twice"),
    ("transpose(3)", r"transpose\(3\) at position 0: Transpose: expected LinearOperator operands, got int"),
    ("+dense(2, 3)", r"unary '\+' is not supported at position 0"),
    ("lambda(0)", r"unknown name 'lambda' at position 0"),
    ("lambda: 0", r"unexpected character ':' at position 6"),
    ("dense(2, 3, rank=4)", r"dense\(\) has no keyword 'rank' at position 12 \(its keywords: m, n, heads\)"),
    ("dense(2, n=3, n=3)", r"dense\(\): keyword 'n' given twice at position 14"),
    ("dense(m=2, 3)", r"dense\(\): positional argument after keyword arguments at position 11"),
    ("dense(2, 3, dtype=1)", r"keyword 'dtype' of dense\(\) is not allowed at position 12; pass dtype= to structmat"),
    ("dense(2, 3, device=1)", r"keyword 'device' of dense\(\) is not allowed at position 12"),
    ("dense(2, 3, 4)", r"bad arguments to dense\(\) at position 0: too many positional arguments"),
    ("dense(2)", r"bad arguments to dense\(\) at position 0: missing a required argument: 'n'"),
    ("identity(2, 3)", r"bad arguments to identity\(\) at position 0"),
    ("dense(0, 3)", r"dense\(0, 3\) at position 0: Dense: m \(rows\) must be >= 1, got 0"),
    ("dense(2.5, 3)", r"dense\(2\.5, 3\) at position 0: Dense: m \(rows\) must be an int, got float 2\.5"),
    ("dense(2, [3])", r"dense\(2, \[3\]\) at position 0: Dense: n \(columns\) must be an int"),
    ("kron()", r"kron\(\) at position 0: Kronecker: needs at least one operator"),
    ("kron(2, 3)", r"kron\(2, 3\) at position 0: Kronecker: expected LinearOperator operands, got int"),
    ("dense(2, 3) + dense(3, 2)", r"'\+' at position 12: Sum: operands must share one shape"),
    ("dense(2, 3) @ dense(2, 3)", r"'@' at position 12: Product: cannot compose Dense\(2, 3\) @ Dense\(2, 3\)"),
    ("dense(2, 3) * 1e999", r"'\*' at position 12: Scaled\(.*\): scale must be finite, got inf"),
    ("dense(2, 3) / 0", r"division by zero at position 12"),
    ("dense(2, 3) / dense(2, 3)", r"'/' by an operator at position 12"),
    ("dense(2, 3) * dense(3, 3)", r"'\*' of two operators at position 12; '\*' scales by a number, '@' composes"),
    ("dense(2, 3) @ 2", r"'@' with a number at position 12"),
    ("2 @ dense(2, 3)", r"'@' with a number at position 2"),
    ("dense(2, 3) + 1", r"cannot add a number and an operator at position 12"),
    ("1 + dense(2, 3)", r"cannot add a number and an operator at position 0"),
    ("dense(2, 3) + [1]", r"a list cannot be added or subtracted at position 14"),
    ("2 * [1]", r"a list cannot be multiplied at position 4"),
    ("[1] * 2", r"a list cannot be multiplied at position 0"),
    ("-[1]", r"unary '-' needs an operator at position 1, got a list"),
    ("2.5.T", r"\.T needs an operator at position 0, got a number"),
    ("permute_axes([dense(2, 2)], [0])", r"permute_axes\(.* at position 0: Permutation.from_axes: sizes must be pos"),
    ("3", r"the expression is a number, not an operator at position 0"),
    ("[1, 2]", r"the expression is a list, not an operator at position 0"),
    ("dense(" + "9" * 5000 + ", 2)", r"number '9{20}' is too long at position 6"),
    ("(" * 200 + "dense(2, 2)" + ")" * 200, r"expression nested too deeply \(more than 100 levels\) at position 100"),
    ("-" * 200 + "dense(2, 2)", r"expression nested too deeply \(more than 100 levels\) at position 100"),
    ("kron(" * 200 + "dense(2, 2)" + ")" * 200, r"nested too deeply \(more than 100 levels\) at position 500"),
    ("transpose(" * 5000 + "dense(2, 2)" + ")" * 5000, r"nested too deeply \(more than 100 levels\) at position 1000"),
    ("permute_axes(" + "[" * 5000 + "]" * 5000 + ", [0])", r"nested too deeply \(more than 100 levels\) at pos"),
    ("(" * 5000 + "1," + ")" * 5000, r"nested too deeply \(more than 100 levels\) at position 100"),
    ("tensor_network('y[o] = W[o,i] x[i]', sizes=" + "dict(a=" * 200 + "1" + ")" * 200 + ")", r"nested too deeply"),
]


@pytest.mark.parametrize(("text", "match"), ERRORS, ids=[t[:30] for t, _ in ERRORS])
def test_parse_errors(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse(text, device=META)


def test_error_message_has_a_caret_under_the_position() -> None:
    with pytest.raises(ValueError) as info:
        parse("dense(2, 2) + foo(3)")
    message = str(info.value)
    assert message.startswith("structmat.parse: unknown name 'foo' at position 14")
    text_line, caret_line = message.splitlines()[1:3]
    assert text_line == "    dense(2, 2) + foo(3)"
    assert caret_line == " " * text_line.index("foo") + "^"


def test_error_caret_on_a_later_line() -> None:
    with pytest.raises(ValueError, match=r"at position 16") as info:
        parse("dense(2, 2)\n  + bar(1)")
    lines = str(info.value).splitlines()
    assert lines[1] == "      + bar(1)" and lines[2] == "        ^"


def test_constructor_errors_are_raised_from_none() -> None:
    with pytest.raises(ValueError, match=r"dense\(0, 3\) at position 4") as info:
        parse("2 * dense(0, 3)")
    assert info.value.__suppress_context__


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(TypeError, match=r"structmat.parse: text must be a str, got bytes"):
        parse(b"dense(2, 2)")  # type: ignore[arg-type]


def test_to_expr_errors() -> None:
    a = sm.Dense(2, 3)
    tied = sm.TensorNetwork("y[o] = W[o,i] x[i]", factors=dict(W=a.weight))  # a different operator, a's parameter
    with pytest.raises(ValueError, match=r"to_expr: Dense\(2, 3\) and TensorNetwork\(2, 3\) share a parameter"):
        to_expr(a + tied)

    class Custom(sm.LinearOperator):
        def __init__(self) -> None:
            super().__init__((2, 2))

        def _lower(self):  # noqa: ANN202
            return sm.Identity(2)._node

    with pytest.raises(ValueError, match=r"to_expr: Custom has no expression"):
        to_expr(Custom() + sm.Identity(2))
    with pytest.raises(TypeError, match=r"to_expr: expected a LinearOperator, got Tensor"):
        to_expr(torch.eye(2))  # type: ignore[arg-type]


def test_single_operand_sum_and_product_print_as_the_operand() -> None:
    assert to_expr(sm.Sum(sm.Dense(2, 3))) == "dense(2, 3)"
    assert to_expr(sm.Product(sm.Dense(2, 3)) @ sm.Dense(3, 1)) == "dense(2, 3) @ dense(3, 1)"
    assert to_expr(2.0 * sm.Sum(sm.Dense(2, 3))) == "2.0 * dense(2, 3)"


# -- random trees -----------------------------------------------------------------------------------------------------
SCALES = st.one_of(
    st.sampled_from([-1.0, 2.0, 0.5, -2.5, 1e-3, 0.0, -0.0]),
    st.floats(allow_nan=False, allow_infinity=False),
)


def divisors(k: int) -> list[int]:
    return [d for d in range(1, k + 1) if k % d == 0]


@st.composite
def operators(draw: st.DrawFn, m: int, n: int, depth: int) -> sm.LinearOperator:
    kinds = ["dense"] + (["identity", "diag", "permutation"] if m == n else [])
    if depth > 0:
        kinds += ["sum", "sum_python", "difference", "product", "product_python", "transpose", "scaled", "neg", "kron"]
        kinds += ["shared", "transpose_explicit", "transpose_python"]
        if m >= 2 and n >= 2:
            kinds.append("block_diag")
    kind = draw(st.sampled_from(kinds))
    sub = depth - 1
    if kind == "dense":
        return D(m, n)
    if kind == "identity":
        return sm.Identity(m)
    if kind == "diag":
        return sm.Diagonal(m, device=META)
    if kind == "permutation":
        return sm.Permutation(draw(st.permutations(range(m))))
    if kind == "shared":  # one object used twice (its parameters shared)
        x = draw(operators(m, n, sub))
        return x + x if draw(st.booleans()) else sm.Sum(x, 0.5 * x, x)
    if kind == "transpose_explicit":
        return sm.Transpose(sm.Transpose(draw(operators(m, n, sub))))
    if kind == "transpose_python":
        return draw(operators(m, n, sub)).T.T
    if kind == "sum":
        k = draw(st.integers(2, 3))
        return sm.Sum(*(draw(operators(m, n, sub)) for _ in range(k)))
    if kind == "sum_python":
        return draw(operators(m, n, sub)) + draw(operators(m, n, sub))
    if kind == "difference":
        return draw(operators(m, n, sub)) - draw(operators(m, n, sub))
    if kind in ("product", "product_python"):
        inner = draw(st.integers(1, 5))
        a, b = draw(operators(m, inner, sub)), draw(operators(inner, n, sub))
        return a @ b if kind == "product_python" else sm.Product(a, b)
    if kind == "transpose":
        return sm.Transpose(draw(operators(n, m, sub)))
    if kind == "scaled":
        return sm.Scaled(draw(operators(m, n, sub)), draw(SCALES))
    if kind == "neg":
        return -draw(operators(m, n, sub))
    if kind == "kron":
        m1, n1 = draw(st.sampled_from(divisors(m))), draw(st.sampled_from(divisors(n)))
        return sm.Kronecker(draw(operators(m1, n1, sub)), draw(operators(m // m1, n // n1, sub)))
    m1, n1 = draw(st.integers(1, m - 1)), draw(st.integers(1, n - 1))
    return sm.BlockDiagonal(draw(operators(m1, n1, sub)), draw(operators(m - m1, n - n1, sub)))


@st.composite
def random_operators(draw: st.DrawFn) -> sm.LinearOperator:
    m, n = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    return draw(operators(m, n, draw(st.integers(0, 3))))


@given(random_operators())
def test_roundtrip_random_trees(op: sm.LinearOperator) -> None:
    back = roundtrip(op)
    assert back.shape == op.shape
    assert math.isfinite(sum(s.scale for s in back.modules() if isinstance(s, sm.Scaled)))


def test_issue_example() -> None:
    text = "btt(1024, 1024, ranks=2) @ lowrank(1024, 1024, rank=16) + 0.5 * dense(1024, 1024).T"
    op = parse(text, device=META)
    assert to_expr(op) == text
    assert isinstance(op, sm.Sum) and isinstance(op.terms[0], sm.Product) and isinstance(op.terms[1], sm.Scaled)
    assert type(op.terms[0].factors[0]) is sm.BlockTensorTrain and op.terms[1].scale == 0.5


# -- every operator of the zoo has an expression (issue 8, item 11) -------------------------------------------------
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_roundtrip(name: str) -> None:
    op = build(name)
    text = op.expr()
    assert_same_structure(op, parse(text, device=META))
    back = parse(text, dtype=torch.float64)  # real parameters too: the same shapes of the same parameters
    assert_same_structure(op, back, batch=5)
    assert [(k, p.shape) for k, p in back.named_parameters()] == [(k, p.shape) for k, p in op.named_parameters()]


def test_block_diagonal_keeps_heads() -> None:
    stack = D(3, 5, heads=6)
    op = sm.BlockDiagonal(stack, heads=2)  # 2 heads of 3 blocks each, not 6 blocks
    assert op.expr() == "block_diag(dense(3, 5, heads=6), heads=2)"
    back = parse(op.expr(), device=META)
    assert back.heads == 2 and back.shape == (9, 15)
    assert parse("block_diag(dense(3, 5, heads=6))", device=META).shape == (18, 30)


def test_tensor_network_and_general_permutation_are_written_in_full() -> None:
    tn = sm.TensorNetwork("y[o] = W[o,i] x[i]", sizes=dict(o=2, i=3))
    assert tn.expr() == 'tensor_network("y[o] = W[o,i] x[i]", sizes=dict(o=2, i=3))'
    assert sm.Permutation([2, 0, 1]).expr() == "permutation([2, 0, 1])"
    spec = "y[o] =\n\tW[o,i] x[i]"  # escapes in the spec survive the round trip
    assert parse(sm.TensorNetwork(spec, sizes=dict(o=2, i=3)).expr()).spec == spec  # type: ignore[attr-defined]


def test_multilevel_with_heads_roundtrips() -> None:
    op = sm.MultiLevel(
        12,
        8,
        [sm.LevelRecipe(sm.LowRank, rank=2), sm.LevelRecipe(sm.Dense, blocks=4)],
        heads=3,
        device=META,
    )
    assert (
        op.expr() == "multilevel(12, 8, [lowrank(12, 8, rank=2, heads=3), block_diag(dense(3, 2, heads=12), heads=3)])"
    )
    assert_same_structure(op, parse(op.expr(), device=META))


def test_values_strings_tuples_mappings() -> None:
    op = parse("permute_axes((2, 3), (1, 0))")
    assert op(torch.arange(6.0)).tolist() == [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
    tn = parse("tensor_network('y[o] = W[o,i] x[i]', sizes=dict(o=2, i=3))", device=META)
    assert isinstance(tn, sm.TensorNetwork) and tn.shape == (2, 3)
    labels = parse("tensor_network('y[dtype] = W[dtype,device] x[device]', sizes=dict(dtype=2, device=3))", device=META)
    assert labels.shape == (2, 3)  # dict() takes any name


# -- transposes and deep structures ---------------------------------------------------------------------------------
def test_transpose_of_a_transpose_is_the_operator() -> None:
    a = D(3, 5)
    assert a.T.T is a
    op = a
    for _ in range(5001):
        op = op.T
    assert isinstance(op, sm.Transpose) and op.op is a and op.num_params == 15
    assert type(parse("dense(3, 5)" + ".T" * 5000, device=META)) is sm.Dense
    odd = parse("dense(3, 5)" + ".T" * 5001, device=META)
    assert isinstance(odd, sm.Transpose) and type(odd.op) is sm.Dense and odd.shape == (5, 3)
    explicit = parse("transpose(dense(3, 5).T)", device=META)  # Transpose(Transpose(A)) on purpose
    assert isinstance(explicit, sm.Transpose) and isinstance(explicit.op, sm.Transpose)


def test_deep_operators_give_value_errors_not_recursion_errors() -> None:
    deep = D(2, 2)
    for _ in range(300):
        deep = sm.Transpose(deep)
    with pytest.raises(ValueError, match=r"to_expr: the operator is nested more than 200 levels deep"):
        to_expr(deep)
    sums = D(2, 2)
    for _ in range(120):
        sums = sm.Sum(sums, D(2, 2))
    with pytest.raises(ValueError, match=r"to_expr: Sum\(2, 2\) has no expression that structmat.parse reads back: .*"):
        to_expr(sums)
    text = "(" * 5000 + "dense(2, 2)" + ")" * 5000
    with pytest.raises(ValueError, match=r"nested too deeply") as info:
        parse(text)
    assert len(str(info.value)) < 400  # the message shows a window of the text, not all of it
    flat = parse(" + ".join(["dense(2, 2)"] * 3000), device=META)  # a long chain is flat, not deep
    assert isinstance(flat, sm.Sum) and len(flat.terms) == 3000


# -- axis permutations never build their index vector -----------------------------------------------------------------
def test_permute_axes_allocates_no_index_vector() -> None:
    op = parse("permute_axes([100000, 100000], [1, 0]) @ dense(10000000000, 3)", device=META)
    assert op.shape == (10**10, 3) and op.num_params == 3 * 10**10
    assert op.expr() == "permute_axes([100000, 100000], [1, 0]) @ dense(10000000000, 3)"
    big = sm.Permutation.from_axes([100000, 100000], [1, 0])
    assert big.rank().bound == 10**10 and big.cost(2).flops == 0


def reference_axis_perm(sizes: tuple[int, ...], order: tuple[int, ...]) -> list[int]:
    """Entry k of the flattened permuted array: the row-major index in ``sizes`` of the multi-index it came from."""
    out = []
    for idx in itertools.product(*(range(sizes[k]) for k in order)):
        source = [0] * len(sizes)
        for axis, i in zip(order, idx):
            source[axis] = i
        out.append(int(sum(i * math.prod(sizes[a + 1 :]) for a, i in enumerate(source))))
    return out


@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=4).flatmap(
        lambda s: st.tuples(st.just(s), st.permutations(range(len(s))))
    )
)
def test_axis_permutation_matches_reference(case: tuple[list[int], list[int]]) -> None:
    sizes, order = tuple(case[0]), tuple(case[1])
    op = sm.Permutation.from_axes(sizes, order)
    expected = reference_axis_perm(sizes, order)
    assert list(op.perm) == expected
    n = math.prod(sizes)
    assert torch.equal(op.dense(torch.float64), torch.eye(n, dtype=torch.float64)[expected])
    assert_same_structure(op, parse(op.expr()))
