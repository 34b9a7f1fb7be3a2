"""Operator expressions: build an operator from text, and write an operator back as text.

``parse("lowrank(1024, 1024, rank=16) + 0.5 * dense(1024, 1024).T")`` builds the operator the text describes, through
a whitelist grammar; ``to_expr(op)`` writes an expression that parses back to an operator of the same structure (same
classes, shapes, nesting and scales; the parameters are new). The text is never handed to ``eval``: a hand-written
tokenizer and a recursive-descent parser accept only the grammar below, and only the names in :data:`REGISTRY` can be
called.

Grammar (precedence as in Python; ``.T`` binds tightest, then unary minus, then ``@ * /``, then ``+ -``)::

    expr     := term (("+" | "-") term)*
    term     := unary (("@" | "*" | "/") unary)*
    unary    := "-" unary | postfix
    postfix  := primary (".T")*
    primary  := NUMBER | NAME "(" [args] ")" | "(" expr ")" | "[" [expr ("," expr)*] "]"
    args     := arg ("," arg)* [","]          (keyword arguments after the positional ones)
    arg      := expr | NAME "=" expr

Values are numbers (``8``, ``0.5``, ``1e-3``, ``1_000_000``), lists of them (``[1, 2, 4]``, nested for per-level block
sizes) and operators. Numbers combine with numbers (``2 * 512``); an operator is scaled by a number (``2.5 * A``,
``A * 2.5``, ``A / 4``, ``-A``); operators combine with ``+ - @``. A chain ``A + B - C`` builds one n-ary ``Sum`` (of
``A``, ``B`` and ``-1.0 * C``) and ``A @ B @ C`` one n-ary ``Product``; parentheses nest. ``A.T`` builds
``Transpose(A)``, also when ``A`` is itself a transpose, so that every structure has exactly one expression.
"""

from __future__ import annotations

import importlib
import inspect
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._base import LinearOperator
from .combinators import BlockDiagonal, Kronecker, Product, Scaled, Sum, Transpose
from .operators import Dense, Diagonal, Identity, Permutation, TensorNetwork

__all__ = ["parse", "to_expr", "REGISTRY"]


# ----------------------------------------------------------------------------------------------------------------------
# The whitelist
# ----------------------------------------------------------------------------------------------------------------------
class _Family:
    """A registry entry for a family class looked up on the ``structmat`` package when it is called, so that this
    module imports whether or not the family exists yet."""

    def __init__(self, attr: str) -> None:
        self.attr = attr

    def resolve(self) -> Callable[..., LinearOperator]:
        package = importlib.import_module(__package__ or "structmat")
        cls = getattr(package, self.attr, None)  # a fixed name from this module, never user text
        if cls is None:
            raise LookupError(f"structmat.{self.attr}, which this version of structmat does not have")
        return cls

    def __call__(self, *args: Any, **kwargs: Any) -> LinearOperator:
        return self.resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"structmat.{self.attr}"


def _permute_axes(sizes: list[int], order: list[int]) -> Permutation:
    """``Permutation.from_axes(sizes, order)``: view the input as ``sizes``, permute the axes, flatten."""
    return Permutation.from_axes(sizes, order)


#: The names an expression may call. Each maps to a constructor that takes the call's positional and keyword
#: arguments; ``dtype``/``device`` are passed on to every constructor whose signature names them. A new family adds one
#: line here (and one printer in ``_FAMILY_PRINTERS`` below, for :func:`to_expr`).
REGISTRY: dict[str, Callable[..., LinearOperator]] = {
    "dense": Dense,
    "identity": Identity,
    "diag": Diagonal,
    "diagonal": Diagonal,
    "kron": Kronecker,
    "block_diag": BlockDiagonal,
    "permute_axes": _permute_axes,
    "lowrank": _Family("LowRank"),
    "btt": _Family("BlockTensorTrain"),
    "monarch": _Family("Monarch"),
    "tt": _Family("TensorTrain"),
    "mlr": _Family("MultiLevelLowRank"),
}

_RESERVED_KEYWORDS = ("dtype", "device")


# ----------------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------------
def _error(text: str, pos: int, message: str, detail: str = "") -> ValueError:
    """``structmat.parse: MESSAGE at position POS DETAIL``, then the text with a caret under position ``pos``."""
    lines = text.split("\n")
    row, col, start = 0, pos, 0
    for row, line in enumerate(lines):  # noqa: B007 - row is used after the loop
        if pos <= start + len(line):
            col = pos - start
            break
        start += len(line) + 1
    shown = lines[row] if lines else ""
    return ValueError(f"structmat.parse: {message} at position {pos}{detail}\n    {shown}\n    {' ' * col}^")


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------------
_DIGITS = r"[0-9](?:_?[0-9])*"
_NUMBER = re.compile(rf"(?:{_DIGITS}(?:\.(?:{_DIGITS})?)?|\.{_DIGITS})(?:[eE][+-]?{_DIGITS})?")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PUNCT = "+-*/@()[],=."
_MAX_DEPTH = 100


@dataclass(frozen=True)
class _Token:
    kind: str  # "num", "name", "op" or "end"
    text: str
    pos: int


def _tokenize(text: str) -> list[_Token]:
    tokens = []
    pos = 0
    while pos < len(text):
        ch = text[pos]
        if ch.isspace():
            pos += 1
            continue
        number = _NUMBER.match(text, pos)
        if number is not None and (ch in "0123456789" or (ch == "." and number.end() > pos + 1)):
            tokens.append(_Token("num", number.group(), pos))
            pos = number.end()
            continue
        name = _NAME.match(text, pos)
        if name is not None:
            tokens.append(_Token("name", name.group(), pos))
            pos = name.end()
            continue
        if ch in _PUNCT:
            tokens.append(_Token("op", ch, pos))
            pos += 1
            continue
        raise _error(text, pos, f"unexpected character {ch!r}")
    tokens.append(_Token("end", "", len(text)))
    return tokens


# ----------------------------------------------------------------------------------------------------------------------
# Syntax tree (parsing builds this first, so that a syntax error allocates nothing)
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Num:
    pos: int
    value: int | float


@dataclass(frozen=True)
class _List:
    pos: int
    items: tuple[_Expr, ...]


@dataclass(frozen=True)
class _Call:
    pos: int
    name: str
    args: tuple[_Expr, ...]
    kwargs: tuple[tuple[str, int, _Expr], ...]  # (keyword, its position, value)
    end: int  # one past the closing parenthesis


@dataclass(frozen=True)
class _Neg:
    pos: int
    operand: _Expr


@dataclass(frozen=True)
class _T:
    pos: int  # position of the "."
    operand: _Expr


@dataclass(frozen=True)
class _Chain:
    """``first op1 x1 op2 x2 ...`` at one precedence level: ``+ -`` or ``@ * /``."""

    pos: int
    first: _Expr
    rest: tuple[tuple[str, int, _Expr], ...]  # (operator, its position, operand)


_Expr = _Num | _List | _Call | _Neg | _T | _Chain


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.k = 0
        self.depth = 0

    # -- helpers -----------------------------------------------------------------------------------------------------
    @property
    def tok(self) -> _Token:
        return self.tokens[self.k]

    def at(self, text: str) -> bool:
        return self.tok.kind == "op" and self.tok.text == text

    def describe(self, tok: _Token) -> str:
        return "end of input" if tok.kind == "end" else repr(tok.text)

    def fail(self, message: str, tok: _Token | None = None, detail: str = "") -> ValueError:
        tok = self.tok if tok is None else tok
        return _error(self.text, tok.pos, message, detail)

    # -- grammar -----------------------------------------------------------------------------------------------------
    def parse(self) -> _Expr:
        if self.tok.kind == "end":
            raise self.fail("empty expression")
        node = self.expr()
        if self.tok.kind != "end":
            if self.at(")"):
                raise self.fail("unbalanced parentheses: ')' without a matching '('")
            if self.at("]"):
                raise self.fail("unbalanced brackets: ']' without a matching '['")
            detail = "; expected an operator (+ - @ * /) or the end"
            raise self.fail(f"unexpected {self.describe(self.tok)}", detail=detail)
        return node

    def expr(self) -> _Expr:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise self.fail(f"expression nested too deeply (more than {_MAX_DEPTH} levels)")
        start = self.tok.pos
        first = self.term()
        rest = []
        while self.at("+") or self.at("-"):
            op = self.tok
            self.k += 1
            rest.append((op.text, op.pos, self.term()))
        self.depth -= 1
        return _Chain(start, first, tuple(rest)) if rest else first

    def term(self) -> _Expr:
        start = self.tok.pos
        first = self.unary()
        rest = []
        while self.at("@") or self.at("*") or self.at("/"):
            op = self.tok
            self.k += 1
            if self.at("*") or self.at("/"):
                raise self.fail(f"unexpected {self.describe(self.tok)} after {op.text!r}", detail=" (no ** or //)")
            rest.append((op.text, op.pos, self.unary()))
        return _Chain(start, first, tuple(rest)) if rest else first

    def unary(self) -> _Expr:
        if self.at("-"):
            tok = self.tok
            self.k += 1
            self.depth += 1
            if self.depth > _MAX_DEPTH:
                raise self.fail(f"expression nested too deeply (more than {_MAX_DEPTH} levels)")
            node = _Neg(tok.pos, self.unary())
            self.depth -= 1
            return node
        if self.at("+"):
            raise self.fail("unary '+' is not supported")
        return self.postfix()

    def postfix(self) -> _Expr:
        node = self.primary()
        while True:
            if self.at("."):
                dot = self.tok
                self.k += 1
                if self.tok.kind == "name" and self.tok.text == "T":
                    self.k += 1
                    node = _T(dot.pos, node)
                    continue
                what = f"'.{self.tok.text}'" if self.tok.kind == "name" else "'.'"
                raise self.fail(f"attribute access {what} is not allowed", dot, " (only .T, the transpose)")
            if self.at("("):
                raise self.fail("call of an expression", detail="; only whitelisted names can be called")
            if self.at("["):
                raise self.fail("indexing is not allowed")
            return node

    def primary(self) -> _Expr:
        tok = self.tok
        if tok.kind == "num":
            self.k += 1
            return _Num(tok.pos, self.number(tok))
        if tok.kind == "name":
            self.k += 1
            if tok.text not in REGISTRY:
                raise self.fail(f"unknown name {tok.text!r}", tok, f"; known names: {', '.join(sorted(REGISTRY))}")
            if not self.at("("):
                raise self.fail(f"{tok.text!r} is not called", tok, f"; write {tok.text}(...)")
            return self.call(tok)
        if self.at("("):
            self.k += 1
            node = self.expr()
            if not self.at(")"):
                if self.tok.kind == "end":
                    raise self.fail("unbalanced parentheses: '(' is never closed", tok)
                raise self.fail(f"expected ')' to close the '(' at position {tok.pos}, found {self.describe(self.tok)}")
            self.k += 1
            return node
        if self.at("["):
            self.k += 1
            items = self.list_items("]", "list")
            return _List(tok.pos, tuple(items))
        if tok.kind == "end":
            raise self.fail("unexpected end of input", detail="; expected a number, a name or '('")
        if self.at(")"):
            if self._unmatched_close():
                raise self.fail("unbalanced parentheses: ')' without a matching '('")
            raise self.fail("unexpected ')'", detail="; expected a number, a name or '('")
        raise self.fail(f"unexpected {self.describe(tok)}", detail="; expected a number, a name or '('")

    def _unmatched_close(self) -> bool:
        opened = sum(1 for t in self.tokens[: self.k] if t.kind == "op" and t.text == "(")
        closed = sum(1 for t in self.tokens[: self.k] if t.kind == "op" and t.text == ")")
        return closed >= opened

    def number(self, tok: _Token) -> int | float:
        digits = tok.text.replace("_", "")
        try:
            if any(c in digits for c in ".eE"):
                return float(digits)
            return int(digits)
        except ValueError:
            raise self.fail(f"number {tok.text[:20]!r} is too long", tok) from None

    def list_items(self, close: str, what: str) -> list[_Expr]:
        opener = self.tokens[self.k - 1]
        items: list[_Expr] = []
        while not self.at(close):
            if self.tok.kind != "end":
                items.append(self.expr())
            if self.tok.kind == "end":
                raise self.fail(f"unbalanced brackets: {opener.text!r} is never closed", opener)
            if self.at(","):
                self.k += 1
            elif not self.at(close):
                raise self.fail(f"expected ',' or {close!r} in the {what}, found {self.describe(self.tok)}")
        self.k += 1
        return items

    def call(self, name: _Token) -> _Call:
        opener = self.tok
        self.k += 1
        args: list[_Expr] = []
        kwargs: list[tuple[str, int, _Expr]] = []
        while not self.at(")"):
            if self.tok.kind == "end":
                raise self.fail("unbalanced parentheses: '(' is never closed", opener)
            nxt = self.tokens[self.k + 1]
            if self.tok.kind == "name" and nxt.kind == "op" and nxt.text == "=":
                key = self.tok
                self.k += 2
                if key.text in _RESERVED_KEYWORDS:
                    raise self.fail(
                        f"keyword {key.text!r} of {name.text}() is not allowed",
                        key,
                        f"; pass {key.text}= to structmat.parse instead",
                    )
                if any(key.text == k for k, _, _ in kwargs):
                    raise self.fail(f"{name.text}(): keyword {key.text!r} given twice", key)
                kwargs.append((key.text, key.pos, self.expr()))
            else:
                if kwargs:
                    raise self.fail(f"{name.text}(): positional argument after keyword arguments")
                args.append(self.expr())
            if self.at(","):
                self.k += 1
            elif not self.at(")"):
                if self.tok.kind == "end":
                    raise self.fail("unbalanced parentheses: '(' is never closed", opener)
                found = self.describe(self.tok)
                raise self.fail(f"expected ',' or ')' in the arguments of {name.text}(), found {found}")
        self.k += 1
        return _Call(name.pos, name.text, tuple(args), tuple(kwargs), self.tokens[self.k - 1].pos + 1)


# ----------------------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------------------
_Value = int | float | list | LinearOperator


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _kind(v: Any) -> str:
    if _is_number(v):
        return "a number"
    if isinstance(v, list):
        return "a list"
    return "an operator"


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: let the call check its arguments
        return None


class _Builder:
    def __init__(self, text: str, dtype: torch.dtype | None, device: torch.device | str | None) -> None:
        self.text = text
        self.dtype = dtype
        self.device = device

    def fail(self, pos: int, message: str, detail: str = "") -> ValueError:
        return _error(self.text, pos, message, detail)

    def build(self, node: _Expr) -> _Value:
        if isinstance(node, _Num):
            return node.value
        if isinstance(node, _List):
            items = [self.build(item) for item in node.items]
            for item, sub in zip(items, node.items):
                if isinstance(item, LinearOperator):
                    raise self.fail(sub.pos, "a list holds numbers or lists, not operators")
            return items
        if isinstance(node, _Neg):
            value = self.build(node.operand)
            if _is_number(value):
                return -value
            target = self.need_op(node.operand.pos, value, "unary '-'")
            return self.op(node.pos, "-", lambda: Scaled(target, -1.0))
        if isinstance(node, _T):
            value = self.need_op(node.operand.pos, self.build(node.operand), ".T")
            return self.op(node.pos, ".T", lambda: Transpose(value))
        if isinstance(node, _Chain):
            if node.rest[0][0] in "+-":
                return self.sum(node)
            return self.product(node)
        return self.call(node)

    def need_op(self, pos: int, value: _Value, what: str) -> LinearOperator:
        if not isinstance(value, LinearOperator):
            raise self.fail(pos, f"{what} needs an operator", f", got {_kind(value)}")
        return value

    def op(self, pos: int, what: str, make: Callable[[], LinearOperator]) -> LinearOperator:
        try:
            return make()
        except (ValueError, TypeError, OverflowError) as e:
            raise self.fail(pos, f"'{what}'", f": {e}") from None

    def arith(self, pos: int, what: str, fn: Callable[[], int | float]) -> int | float:
        try:
            return fn()
        except OverflowError as e:
            raise self.fail(pos, f"'{what}'", f": {e}") from None

    def sum(self, node: _Chain) -> _Value:
        values = [self.build(node.first)] + [self.build(x) for _, _, x in node.rest]
        subs = [node.first] + [x for _, _, x in node.rest]
        ops = [(None, node.pos)] + [(op, pos) for op, pos, _ in node.rest]
        for value, sub, (_op, _pos) in zip(values, subs, ops):
            if isinstance(value, list):
                raise self.fail(sub.pos, "a list cannot be added or subtracted")
        if all(_is_number(v) for v in values):
            total = values[0]
            for v, (op, pos) in zip(values[1:], ops[1:]):
                total = self.arith(pos, op, lambda a=total, b=v, o=op: a + b if o == "+" else a - b)
            return total
        for value, (op, pos) in zip(values, ops):
            if _is_number(value):
                raise self.fail(pos if op else node.pos, "cannot add a number and an operator")
        terms = [values[0]]
        for value, (op, pos) in zip(values[1:], ops[1:]):
            terms.append(value if op == "+" else self.op(pos, "-", lambda v=value: Scaled(v, -1.0)))
        return self.op(node.rest[0][1], "+", lambda: Sum(*terms))

    def product(self, node: _Chain) -> _Value:
        acc = self.build(node.first)
        if isinstance(acc, list):
            raise self.fail(node.first.pos, "a list cannot be multiplied")
        chain: list[LinearOperator] = []  # operands of the @-chain in progress
        chain_pos = 0
        for op, pos, sub in node.rest:
            value = self.build(sub)
            if isinstance(value, list):
                raise self.fail(sub.pos, "a list cannot be multiplied")
            if op == "@":
                if _is_number(acc) or _is_number(value):
                    raise self.fail(pos, "'@' with a number", "; '@' composes operators, '*' scales by a number")
                if not chain:
                    chain, chain_pos = [acc], pos
                chain.append(value)
                acc = value
                continue
            if chain:
                acc = self.op(chain_pos, "@", lambda c=tuple(chain): Product(*c))
                chain = []
            if op == "*":
                if _is_number(acc) and _is_number(value):
                    acc = self.arith(pos, "*", lambda a=acc, b=value: a * b)
                elif _is_number(acc) or _is_number(value):
                    scale, target = (acc, value) if _is_number(acc) else (value, acc)
                    acc = self.op(pos, "*", lambda s=scale, t=target: Scaled(t, s))
                else:
                    raise self.fail(pos, "'*' of two operators", "; '*' scales by a number, '@' composes operators")
            else:  # "/"
                if not _is_number(value):
                    raise self.fail(pos, "'/' by an operator", "; '/' divides by a number")
                if value == 0:
                    raise self.fail(pos, "division by zero")
                if _is_number(acc):
                    acc = self.arith(pos, "/", lambda a=acc, b=value: a / b)
                else:
                    acc = self.op(pos, "/", lambda t=acc, s=value: Scaled(t, 1.0 / s))
        if chain:
            acc = self.op(chain_pos, "@", lambda c=tuple(chain): Product(*c))
        return acc

    def call(self, node: _Call) -> LinearOperator:
        ctor = REGISTRY[node.name]
        if isinstance(ctor, _Family):
            try:
                ctor = ctor.resolve()
            except LookupError as e:
                raise self.fail(node.pos, f"{node.name}() is not available", f": it needs {e}") from None
        args = [self.build(a) for a in node.args]
        kwargs = {key: self.build(v) for key, _, v in node.kwargs}
        sig = _signature(ctor)
        if sig is not None:
            params = sig.parameters
            takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
            for key, pos, _ in node.kwargs:
                p = params.get(key)
                if (p is None and not takes_any) or (p is not None and p.kind is inspect.Parameter.POSITIONAL_ONLY):
                    names = [
                        q.name
                        for q in params.values()
                        if q.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
                        and q.name not in _RESERVED_KEYWORDS
                    ]
                    listing = ", ".join(names) if names else "none"
                    raise self.fail(pos, f"{node.name}() has no keyword {key!r}", f" (its keywords: {listing})")
            for key in _RESERVED_KEYWORDS:
                if key in params and getattr(self, key) is not None:
                    kwargs[key] = getattr(self, key)
            try:
                sig.bind(*args, **kwargs)
            except TypeError as e:
                raise self.fail(node.pos, f"bad arguments to {node.name}()", f": {e}") from None
        try:
            return ctor(*args, **kwargs)
        except (TypeError, ValueError) as e:
            raise self.fail(node.pos, f"{self.text[node.pos : node.end]}", f": {e}") from None


def parse(text: str, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> LinearOperator:
    """Build the operator an expression describes (see the module docstring for the grammar).

    Only the names in :data:`REGISTRY` can be called, and ``.T`` is the only attribute; the text is never evaluated as
    Python. ``dtype`` and ``device`` go to every constructor that creates parameters; ``device="meta"`` allocates no
    memory, for shape-only queries (rank, cost, path) on operators too large to hold.

    Args:
        text: the expression, e.g. ``"dense(64, 8) @ dense(8, 64) + 0.5 * identity(64)"``.
        dtype: parameter dtype (torch's default when None).
        device: parameter device (torch's default when None).

    Returns:
        The operator, with freshly initialized parameters.

    Raises:
        ValueError: for malformed text, unknown names, attribute access other than ``.T``, calls of anything but a
            whitelisted name, bad arguments, and operators that don't fit together. The message gives the character
            offset and shows the text with a caret under it.

    Example:
        >>> import structmat as sm
        >>> from structmat.expr import parse
        >>> A = parse("dense(64, 8) @ dense(8, 64) + 0.5 * identity(64)", device="meta")
        >>> type(A).__name__, A.shape, A.rank().bound
        ('Sum', (64, 64), 64)
        >>> parse("dense(3, 4).weight")
        Traceback (most recent call last):
        ...
        ValueError: structmat.parse: attribute access '.weight' is not allowed at position 11 (only .T, the transpose)
            dense(3, 4).weight
                       ^
    """
    if not isinstance(text, str):
        raise TypeError(f"structmat.parse: text must be a str, got {type(text).__name__}")
    tree = _Parser(text).parse()
    value = _Builder(text, dtype, device).build(tree)
    if not isinstance(value, LinearOperator):
        raise _error(text, 0, f"the expression is {_kind(value)}, not an operator")
    return value


# ----------------------------------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------------------------------
# Precedence levels of printed forms: an operand printed below the level its position needs gets parentheses.
_SUM, _MUL, _UNARY, _POSTFIX = 1, 2, 3, 4


def _literal(value: Any) -> str:
    """A keyword value as text: ints, floats (repr, which round-trips exactly) and (nested) sequences of them."""
    if isinstance(value, bool):
        raise ValueError(f"to_expr: cannot write the value {value!r}")
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))
    if isinstance(value, torch.Size) or isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    raise ValueError(f"to_expr: cannot write the value {value!r} of type {type(value).__name__}")


def _call(name: str, *args: Any, **kwargs: Any) -> str:
    """``name(a, b, key=value)``, skipping keywords whose value is None (the constructors' default)."""
    parts = [_literal(a) for a in args] + [f"{k}={_literal(v)}" for k, v in kwargs.items() if v is not None]
    return f"{name}({', '.join(parts)})"


def _ranks(ranks: tuple[int, ...]) -> int | list[int]:
    """Bond ranks as written: one int when they are all equal (the constructors accept both)."""
    return ranks[0] if len(set(ranks)) == 1 else list(ranks)


def _train(name: str, op: Any) -> str:
    """``btt(...)``/``tt(...)``: the factor splits are left out when they are the constructor's default."""
    from ._factors import balanced_factors

    fin, fout = tuple(op.in_factors), tuple(op.out_factors)
    m, n = op.shape
    default = len(fin) == 2 and fin == balanced_factors(n, 2) and fout == balanced_factors(m, 2)
    splits = {} if default else {"in_factors": list(fin), "out_factors": list(fout)}
    return _call(name, m, n, ranks=_ranks(tuple(op.ranks)), **splits, heads=op.heads)


#: Printers of the families, keyed by their class name on the ``structmat`` package (looked up when ``to_expr`` runs,
#: so a family that does not exist yet costs nothing). Each returns a call of the family's :data:`REGISTRY` name whose
#: arguments rebuild the same structure; a new family adds one line here and one in ``REGISTRY``, and
#: tests/test_expr.py round-trips it.
_FAMILY_PRINTERS: dict[str, Callable[[Any], str]] = {
    "LowRank": lambda op: _call("lowrank", *op.shape, rank=op.rank_, heads=op.heads),
    "BlockTensorTrain": lambda op: _train("btt", op),
    "Monarch": lambda op: _call("monarch", *op.shape, nblocks=op.nblocks, heads=op.heads),
    "TensorTrain": lambda op: _train("tt", op),
    "MultiLevelLowRank": lambda op: _call(
        "mlr",
        *op.shape,
        ranks=list(op.ranks),
        blocks=[_level_blocks(op.shape, part) for part in op.blocks],
        heads=op.heads,
    ),
}


def _level_blocks(shape: tuple[int, int], part: Sequence[tuple[int, int]]) -> int | list[list[int]]:
    """One level's blocks as written: their number when they split ``shape`` equally, else their ``[rows, cols]``."""
    k = len(part)
    m, n = shape
    if m % k == 0 and n % k == 0 and all(tuple(b) == (m // k, n // k) for b in part):
        return k
    return [list(b) for b in part]


def _print(op: LinearOperator) -> tuple[str, int]:
    """``(text, precedence)`` of ``op``."""
    if isinstance(op, (Sum, Product)) and len(op._operands()) == 1:
        return _print(op._operands()[0])
    if isinstance(op, Sum):
        parts = [_operand(op.terms[0], _MUL)]
        for term in list(op.terms)[1:]:
            if isinstance(term, Scaled) and term.scale == -1.0:
                parts.append("- " + _operand(term.op, _MUL))
            else:
                parts.append("+ " + _operand(term, _MUL))
        return " ".join(parts), _SUM
    if isinstance(op, Product):
        parts = [_operand(f, _UNARY) for f in op.factors]
        return " @ ".join(parts), _MUL
    if isinstance(op, Scaled):
        if op.scale == -1.0:
            return "-" + _operand(op.op, _UNARY), _UNARY
        return f"{op.scale!r} * {_operand(op.op, _UNARY)}", _MUL
    if isinstance(op, Transpose):
        return _operand(op.op, _POSTFIX) + ".T", _POSTFIX
    if isinstance(op, Kronecker):
        return "kron(" + ", ".join(to_expr(p) for p in op.parts) + ")", _POSTFIX
    if isinstance(op, BlockDiagonal):
        return "block_diag(" + ", ".join(to_expr(b) for b in op.blocks) + ")", _POSTFIX
    if isinstance(op, Dense):
        return _call("dense", *op.shape, heads=op.heads), _POSTFIX
    if isinstance(op, Identity):
        return _call("identity", op.shape[0], heads=op.heads), _POSTFIX
    if isinstance(op, Diagonal):
        return _call("diag", op.shape[0], heads=op.heads), _POSTFIX
    if isinstance(op, Permutation):
        axes = op._axes  # set only by Permutation.from_axes: a reshape-transpose, which has an expression
        if axes is None:
            raise ValueError(
                f"to_expr: a general {op.name} has no expression (only axis permutations, permute_axes(sizes, order))"
            )
        return _call("permute_axes", list(axes[0]), list(axes[1])), _POSTFIX
    if isinstance(op, TensorNetwork):
        raise ValueError(f"to_expr: TensorNetwork({op.spec!r}) has no expression; build it with sm.TensorNetwork")
    package = importlib.import_module(__package__ or "structmat")
    for attr, printer in _FAMILY_PRINTERS.items():
        cls = getattr(package, attr, None)
        if cls is not None and type(op) is cls:
            return printer(op), _POSTFIX
    raise ValueError(f"to_expr: {type(op).__name__} has no expression")


def _operand(op: LinearOperator, level: int) -> str:
    text, prec = _print(op)
    return text if prec >= level else f"({text})"


def to_expr(op: LinearOperator) -> str:
    """An expression that :func:`parse` turns back into an operator of the same structure as ``op``.

    Same classes, shapes, nesting and scales; the parameters of the parsed operator are new (an expression holds no
    values). A ``Sum`` or ``Product`` of a single operand is written as that operand.

    Args:
        op: the operator.

    Returns:
        The expression, e.g. ``"dense(5, 3) @ dense(3, 7) + -2.5 * dense(7, 5).T"``.

    Raises:
        ValueError: for an operator without an expression: a ``TensorNetwork`` or a general ``Permutation``.

    Example:
        >>> import structmat as sm
        >>> from structmat.expr import parse, to_expr
        >>> A = sm.Dense(6, 3) @ sm.Dense(3, 6) - 2.5 * sm.kron(sm.Identity(2), sm.Diagonal(3)).T
        >>> to_expr(A)
        'dense(6, 3) @ dense(3, 6) - 2.5 * kron(identity(2), diag(3)).T'
        >>> to_expr(parse(to_expr(A))) == to_expr(A)
        True
    """
    if not isinstance(op, LinearOperator):
        raise TypeError(f"to_expr: expected a LinearOperator, got {type(op).__name__}")
    return _print(op)[0]
