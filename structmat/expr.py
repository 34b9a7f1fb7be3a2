r"""Operator expressions: build an operator from text, and write an operator back as text.

``parse("lowrank(1024, 1024, rank=16) + 0.5 * dense(1024, 1024).T")`` builds the operator the text describes, through
a whitelist grammar; ``to_expr(op)`` writes an expression that parses back to an operator of the same structure (same
classes, shapes, heads, nesting, scales and sharing; the parameters are new). The text is never handed to ``eval``: a
hand-written tokenizer and a recursive-descent parser accept only the grammar below, and only the names in
:data:`REGISTRY` can be called.

Grammar (precedence as in Python; ``.T`` binds tightest, then unary minus, then ``@ * /``, then ``+ -``)::

    program  := (NAME "=" expr ";")* expr
    expr     := term (("+" | "-") term)*
    term     := unary (("@" | "*" | "/") unary)*
    unary    := "-" unary | postfix
    postfix  := primary (".T")*
    primary  := NUMBER | STRING | NAME | NAME "(" [args] ")" | "(" expr ")"
              | "(" expr "," [expr ("," expr)*] [","] ")" | "[" [expr ("," expr)*] [","] "]"
    args     := arg ("," arg)* [","]          (keyword arguments after the positional ones)
    arg      := expr | NAME "=" expr

Values are numbers (``8``, ``0.5``, ``1e-3``, ``1_000_000``), strings (``"y[o] = U[o,r] V[r,i] x[i]"``, in single or
double quotes, with the escapes ``\\ \" \' \n \t \r``), lists ``[1, 2]`` and tuples ``(1, 2)``, ``(1,)`` of any
values, mappings ``dict(o=5, i=7)`` and operators. Numbers combine with numbers (``2 * 512``); an operator is scaled by
a number (``2.5 * A``, ``A * 2.5``, ``A / 4``, ``-A``); operators combine with ``+ - @``. A chain ``A + B - C`` builds
one n-ary ``Sum`` (of ``A``, ``B`` and ``-1.0 * C``) and ``A @ B @ C`` one n-ary ``Product``; parentheses nest.

``A.T`` is ``A``'s transpose as Python's ``A.T`` gives it: ``Transpose(A)``, and ``A`` itself when ``A`` is a transpose
(so ``A.T.T`` is ``A``, however long the chain); ``transpose(A)`` builds ``Transpose(A)`` even then. An assignment
``v = expr;`` names a value, and every use of ``v`` is the same object: ``v = dense(5, 5); v + v.T`` shares ``v``'s
parameters between the two terms (that is how :func:`to_expr` writes an operator used twice).
"""

from __future__ import annotations

import inspect
import numbers
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from . import operators as _operators  # noqa: F401 - defining the families registers their expressions
from .combinators import Product, Scaled, Sum, Transpose
from .core.base import LinearOperator
from .core.family import EXPRESSIONS, register_expression

__all__ = ["parse", "to_expr", "REGISTRY"]


# ----------------------------------------------------------------------------------------------------------------------
# The whitelist
# ----------------------------------------------------------------------------------------------------------------------
def _mapping(**items: Any) -> dict[str, Any]:
    """``dict(o=5, i=7)``: a mapping from names to values (the ``sizes`` of a ``tensor_network``)."""
    return dict(items)


register_expression("dict", _mapping)

#: The names an expression may call. Each maps to a constructor that takes the call's positional and keyword
#: arguments; ``dtype``/``device`` are passed on to every constructor whose signature names them. Filled by the
#: operator classes themselves: a class that declares ``expr_name`` (and ``_expr_args`` for :func:`to_expr`) is
#: registered when it is defined (see :mod:`structmat.core.family`), so a new family adds nothing here.
REGISTRY: dict[str, Callable[..., Any]] = EXPRESSIONS

#: The composites written with operators rather than a call: ``A + B``, ``A @ B``, ``c * A`` and ``A.T``.
SYNTAX: dict[type, str] = {Sum: "+", Product: "@", Scaled: "*", Transpose: ".T"}

_RESERVED_KEYWORDS = ("dtype", "device")
_SHOWN = 60  # characters of the text shown on either side of an error's position


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
    if len(shown) > 2 * _SHOWN:  # a window around the position, not a line of thousands of characters
        left = max(0, col - _SHOWN)
        right = min(len(shown), col + _SHOWN)
        head, tail = ("..." if left else ""), ("..." if right < len(shown) else "")
        shown, col = head + shown[left:right] + tail, col - left + len(head)
    return ValueError(f"structmat.parse: {message} at position {pos}{detail}\n    {shown}\n    {' ' * col}^")


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------------
_DIGITS = r"[0-9](?:_?[0-9])*"
_NUMBER = re.compile(rf"(?:{_DIGITS}(?:\.(?:{_DIGITS})?)?|\.{_DIGITS})(?:[eE][+-]?{_DIGITS})?")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PUNCT = "+-*/@()[],=.;"
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "r": "\r"}
_MAX_DEPTH = 100


class _Token(NamedTuple):
    kind: str  # "num", "str", "name", "op" or "end"
    text: str  # for "str": the string's value, escapes resolved
    pos: int


def _string(text: str, pos: int) -> tuple[str, int]:
    """The string literal opening at ``pos``: ``(value, position after the closing quote)``."""
    quote = text[pos]
    out = []
    k = pos + 1
    while k < len(text):
        ch = text[k]
        if ch == quote:
            return "".join(out), k + 1
        if ch == "\\":
            esc = text[k + 1 : k + 2]
            if esc not in _ESCAPES:
                bad = "\\" + esc
                raise _error(text, k, f"unknown escape {bad!r} in a string", r" (known: \\ \" \' \n \t \r)")
            out.append(_ESCAPES[esc])
            k += 2
            continue
        out.append(ch)
        k += 1
    raise _error(text, pos, f"unterminated string: {quote} is never closed")


# one token at a position: blanks, then a number (".5" is one; "." alone is punctuation), a name, punctuation or the
# opening quote of a string
_TOKEN = re.compile(
    rf"\s*(?:(?P<num>{_NUMBER.pattern})|(?P<name>{_NAME.pattern})|(?P<op>[{re.escape(_PUNCT)}])|(?P<quote>[\"']))"
)


def _tokenize(text: str) -> list[_Token]:
    tokens = []
    pos = 0
    end = len(text)
    match = _TOKEN.match
    while True:
        m = match(text, pos)
        if m is None:  # blanks, then the end or a character outside the grammar
            start = len(text) - len(text[pos:].lstrip())
            if start == end:
                break
            raise _error(text, start, f"unexpected character {text[start]!r}")
        kind = m.lastgroup
        start = m.start(kind)
        if kind == "quote":
            value, pos = _string(text, start)
            tokens.append(_Token("str", value, start))
            continue
        tokens.append(_Token(kind, m.group(kind), start))  # type: ignore[arg-type]
        pos = m.end()
    tokens.append(_Token("end", "", end))
    return tokens


# ----------------------------------------------------------------------------------------------------------------------
# Syntax tree (parsing builds this first, so that a syntax error allocates nothing)
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Num:
    pos: int
    value: int | float


@dataclass(frozen=True)
class _Str:
    pos: int
    value: str


@dataclass(frozen=True)
class _Var:
    pos: int
    name: str


@dataclass(frozen=True)
class _List:
    pos: int
    items: tuple[_Expr, ...]
    tuple: bool = False  # "(a, b)" rather than "[a, b]"


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
    """``operand.T.T...``: ``count`` transposes in a row (a chain is one node, however long)."""

    pos: int  # position of the first "."
    operand: _Expr
    count: int


@dataclass(frozen=True)
class _Chain:
    """``first op1 x1 op2 x2 ...`` at one precedence level: ``+ -`` or ``@ * /``."""

    pos: int
    first: _Expr
    rest: tuple[tuple[str, int, _Expr], ...]  # (operator, its position, operand)


_Expr = _Num | _Str | _Var | _List | _Call | _Neg | _T | _Chain


@dataclass(frozen=True)
class _Program:
    """``v1 = e1; v2 = e2; body``."""

    bindings: tuple[tuple[str, int, _Expr], ...]  # (name, its position, value)
    body: _Expr


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.k = 0
        self.depth = 0
        self.bound: set[str] = set()

    # -- helpers -----------------------------------------------------------------------------------------------------
    @property
    def tok(self) -> _Token:
        return self.tokens[self.k]

    def at(self, text: str) -> bool:
        return self.tok.kind == "op" and self.tok.text == text

    def describe(self, tok: _Token) -> str:
        if tok.kind == "str":
            return "a string"
        return "end of input" if tok.kind == "end" else repr(tok.text)

    def fail(self, message: str, tok: _Token | None = None, detail: str = "") -> ValueError:
        tok = self.tok if tok is None else tok
        return _error(self.text, tok.pos, message, detail)

    def enter(self) -> None:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise self.fail(f"expression nested too deeply (more than {_MAX_DEPTH} levels)")

    def assignment_ahead(self) -> bool:
        nxt = self.tokens[self.k + 1] if self.k + 1 < len(self.tokens) else self.tok
        return self.tok.kind == "name" and nxt.kind == "op" and nxt.text == "="

    # -- grammar -----------------------------------------------------------------------------------------------------
    def parse(self) -> _Program:
        if self.tok.kind == "end":
            raise self.fail("empty expression")
        bindings = []
        while self.assignment_ahead():
            bindings.append(self.assignment())
        node = self.expr()
        if self.tok.kind != "end":
            if self.at(")"):
                raise self.fail("unbalanced parentheses: ')' without a matching '('")
            if self.at("]"):
                raise self.fail("unbalanced brackets: ']' without a matching '['")
            if self.at("=") and isinstance(node, (_Var, _Call)):
                raise self.fail("unexpected '='", detail="; an assignment is NAME = expression; (before the result)")
            detail = "; expected an operator (+ - @ * /) or the end"
            raise self.fail(f"unexpected {self.describe(self.tok)}", detail=detail)
        return _Program(tuple(bindings), node)

    def assignment(self) -> tuple[str, int, _Expr]:
        name = self.tok
        if name.text in REGISTRY:
            raise self.fail(f"cannot assign to {name.text!r}", name, "; it is a registered name")
        if name.text in self.bound:
            raise self.fail(f"{name.text!r} is assigned twice", name)
        self.k += 2
        value = self.expr()
        if not self.at(";"):
            raise self.fail(
                f"expected ';' after the assignment to {name.text!r}, found {self.describe(self.tok)}",
                detail="; the result expression comes last",
            )
        self.k += 1
        if self.tok.kind == "end":
            raise self.fail("unexpected end of input after ';'", detail="; the result expression comes last")
        self.bound.add(name.text)
        return name.text, name.pos, value

    def expr(self) -> _Expr:
        self.enter()
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
            self.enter()
            node = _Neg(tok.pos, self.unary())
            self.depth -= 1
            return node
        if self.at("+"):
            raise self.fail("unary '+' is not supported")
        return self.postfix()

    def postfix(self) -> _Expr:
        node = self.primary()
        first_dot, count = None, 0
        while True:
            if self.at("."):
                dot = self.tok
                self.k += 1
                if self.tok.kind == "name" and self.tok.text == "T":
                    self.k += 1
                    first_dot = dot if first_dot is None else first_dot
                    count += 1
                    continue
                what = f"'.{self.tok.text}'" if self.tok.kind == "name" else "'.'"
                raise self.fail(f"attribute access {what} is not allowed", dot, " (only .T, the transpose)")
            if self.at("("):
                raise self.fail("call of an expression", detail="; only whitelisted names can be called")
            if self.at("["):
                raise self.fail("indexing is not allowed")
            return _T(first_dot.pos, node, count) if first_dot is not None else node

    def primary(self) -> _Expr:
        tok = self.tok
        if tok.kind == "num":
            self.k += 1
            return _Num(tok.pos, self.number(tok))
        if tok.kind == "str":
            self.k += 1
            return _Str(tok.pos, tok.text)
        if tok.kind == "name":
            self.k += 1
            if tok.text in self.bound:
                return _Var(tok.pos, tok.text)
            if tok.text not in REGISTRY:
                known = ", ".join(sorted(REGISTRY))
                variables = f"; assigned names: {', '.join(sorted(self.bound))}" if self.bound else ""
                raise self.fail(f"unknown name {tok.text!r}", tok, f"; known names: {known}{variables}")
            if not self.at("("):
                raise self.fail(f"{tok.text!r} is not called", tok, f"; write {tok.text}(...)")
            return self.call(tok)
        if self.at("("):
            self.k += 1
            node = self.expr()
            if self.at(","):
                self.k += 1
                items = [node, *self.list_items(")", "tuple", tok)]
                return _List(tok.pos, tuple(items), tuple=True)
            if not self.at(")"):
                if self.tok.kind == "end":
                    raise self.fail("unbalanced parentheses: '(' is never closed", tok)
                raise self.fail(f"expected ')' to close the '(' at position {tok.pos}, found {self.describe(self.tok)}")
            self.k += 1
            return node
        if self.at("["):
            self.k += 1
            items = self.list_items("]", "list", tok)
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

    def list_items(self, close: str, what: str, opener: _Token) -> list[_Expr]:
        items: list[_Expr] = []
        while not self.at(close):
            if self.tok.kind != "end":
                items.append(self.expr())
            if self.tok.kind == "end":
                kind = "parentheses" if opener.text == "(" else "brackets"
                raise self.fail(f"unbalanced {kind}: {opener.text!r} is never closed", opener)
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
        free_keywords = REGISTRY.get(name.text) is _mapping  # dict(...) takes any name, dtype and device included
        while not self.at(")"):
            if self.tok.kind == "end":
                raise self.fail("unbalanced parentheses: '(' is never closed", opener)
            if self.assignment_ahead():
                key = self.tok
                self.k += 2
                if key.text in _RESERVED_KEYWORDS and not free_keywords:
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
_Value = int | float | str | list | tuple | dict | LinearOperator


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _kind(v: Any) -> str:
    if _is_number(v):
        return "a number"
    if isinstance(v, LinearOperator):
        return "an operator"
    return {str: "a string", list: "a list", tuple: "a tuple", dict: "a mapping"}.get(type(v), type(v).__name__)


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
        self.env: dict[str, _Value] = {}

    def fail(self, pos: int, message: str, detail: str = "") -> ValueError:
        return _error(self.text, pos, message, detail)

    def program(self, tree: _Program) -> _Value:
        for name, _, value in tree.bindings:
            self.env[name] = self.build(value)
        return self.build(tree.body)

    def build(self, node: _Expr) -> _Value:
        if isinstance(node, (_Num, _Str)):
            return node.value
        if isinstance(node, _Var):
            return self.env[node.name]
        if isinstance(node, _List):
            items = [self.build(item) for item in node.items]
            return tuple(items) if node.tuple else items
        if isinstance(node, _Neg):
            value = self.build(node.operand)
            if _is_number(value):
                return -value
            target = self.need_op(node.operand.pos, value, "unary '-'")
            return self.op(node.pos, "-", lambda: Scaled(target, -1.0))
        if isinstance(node, _T):
            value = self.need_op(node.operand.pos, self.build(node.operand), ".T")
            if node.count % 2 == 0:  # A.T.T is A, as in Python
                return value
            return self.op(node.pos, ".T", lambda: value.T)
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
        for value, sub in zip(values, subs):
            if not (_is_number(value) or isinstance(value, LinearOperator)):
                raise self.fail(sub.pos, f"{_kind(value)} cannot be added or subtracted")
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
        if not (_is_number(acc) or isinstance(acc, LinearOperator)):
            raise self.fail(node.first.pos, f"{_kind(acc)} cannot be multiplied")
        chain: list[LinearOperator] = []  # operands of the @-chain in progress
        chain_pos = 0
        for op, pos, sub in node.rest:
            value = self.build(sub)
            if not (_is_number(value) or isinstance(value, LinearOperator)):
                raise self.fail(sub.pos, f"{_kind(value)} cannot be multiplied")
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
    value = _Builder(text, dtype, device).program(tree)
    if not isinstance(value, LinearOperator):
        raise _error(text, 0, f"the expression is {_kind(value)}, not an operator")
    return value


# ----------------------------------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------------------------------
# Precedence levels of printed forms: an operand printed below the level its position needs gets parentheses.
_SUM, _MUL, _UNARY, _POSTFIX = 1, 2, 3, 4
_STRING_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _quote(text: str) -> str:
    """A string literal that the tokenizer reads back as ``text``."""
    return '"' + "".join(_STRING_ESCAPES.get(ch, ch) for ch in text) + '"'


def _literal(value: Any) -> str:
    """An argument as text: ints, floats (repr, which round-trips exactly), strings, mappings with identifier keys
    (``dict(a=1)``) and (nested) sequences of them."""
    if isinstance(value, bool):
        raise ValueError(f"to_expr: cannot write the value {value!r}")
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, Mapping):
        for key in value:
            if not (isinstance(key, str) and _NAME.fullmatch(key)):
                raise ValueError(f"to_expr: cannot write the mapping key {key!r} (keys are names)")
        return "dict(" + ", ".join(f"{k}={_literal(v)}" for k, v in value.items()) + ")"
    if isinstance(value, torch.Size) or isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    raise ValueError(f"to_expr: cannot write the value {value!r} of type {type(value).__name__}")


def _expr_call(op: LinearOperator) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    """``(name, args, kwargs)`` of an operator written as a call: its class's ``expr_name`` (or its ``_expr_name()``,
    for an operator written under an alias) and its ``_expr_args()``."""
    name = getattr(type(op), "expr_name", None)
    if name is None or not hasattr(op, "_expr_args"):
        raise ValueError(f"to_expr: {type(op).__name__} has no expression")
    if hasattr(op, "_expr_name"):
        name = op._expr_name()
    args, kwargs = op._expr_args()
    return name, tuple(args), dict(kwargs)


def _operators_in(values: Any) -> list[LinearOperator]:
    """The operators among (nested lists and tuples of) argument values, in order."""
    if isinstance(values, LinearOperator):
        return [values]
    if isinstance(values, (list, tuple)):
        return [op for v in values for op in _operators_in(v)]
    return []


def _children(
    op: LinearOperator, calls: dict[int, tuple[str, tuple[Any, ...], dict[str, Any]]]
) -> list[LinearOperator]:
    """The operands the printer writes out: those of ``+ @ * .T``, else the operators among the call's arguments (a
    family written by its sizes has none). ``calls`` caches each operator's call by id."""
    if type(op) in SYNTAX:
        return list(op._operands())
    if id(op) not in calls:
        calls[id(op)] = _expr_call(op)
    _, args, kwargs = calls[id(op)]
    return _operators_in([*args, *kwargs.values()])


def _walk(
    root: LinearOperator, calls: dict[int, tuple[str, tuple[Any, ...], dict[str, Any]]]
) -> tuple[dict[int, int], list[LinearOperator]]:
    """How often each operator object is used under ``root`` (by id), and the distinct operators in post-order
    (children first). Iterative, so that a deep operator is no problem; a shared operator is entered once."""
    uses: dict[int, int] = {}
    post: list[LinearOperator] = []
    stack: list[tuple[LinearOperator, bool]] = [(root, False)]
    while stack:
        op, done = stack.pop()
        if done:
            post.append(op)
            continue
        if id(op) in uses:
            uses[id(op)] += 1
            continue
        uses[id(op)] = 1
        stack.append((op, True))
        stack.extend((child, False) for child in reversed(_children(op, calls)))
    return uses, post


def _check_sharing(leaves: list[LinearOperator]) -> None:
    """Raise when two different operators share a parameter: an expression shares whole operators only."""
    owner: dict[int, LinearOperator] = {}
    for leaf in leaves:
        for _, p in leaf.named_parameters(remove_duplicate=False):
            other = owner.setdefault(id(p), leaf)
            if other is not leaf:
                raise ValueError(
                    f"to_expr: {other.name} and {leaf.name} share a parameter but are different operators; an "
                    "expression can only share whole operators (v = ...; v + v.T), so it would build another operator"
                )


class _Printer:
    """Writes one operator; operators used more than once are named (``v1 = ...;``) and written once."""

    def __init__(self, root: LinearOperator) -> None:
        self.calls: dict[int, tuple[str, tuple[Any, ...], dict[str, Any]]] = {}
        uses, post = _walk(root, self.calls)
        _check_sharing([op for op in post if not _children(op, self.calls)])
        taken = set(REGISTRY)
        self.names: dict[int, str] = {}
        self.shared = [op for op in post if uses[id(op)] > 1]
        k = 0
        for op in self.shared:
            k += 1
            while f"v{k}" in taken:
                k += 1
            self.names[id(op)] = f"v{k}"
        self.root = root
        self.depth = 0
        self.deepest = 0  # the deepest nesting of operators written

    def program(self) -> str:
        lines = []
        for op in self.shared:
            lines.append(f"{self.names[id(op)]} = {self.text(op, named=False)[0]}; ")
        return "".join(lines) + self.text(self.root)[0]

    def operand(self, op: LinearOperator, level: int) -> str:
        text, prec = self.text(op)
        return text if prec >= level else f"({text})"

    def text(self, op: LinearOperator, named: bool = True) -> tuple[str, int]:
        """``(text, precedence)`` of ``op``; its name when it is shared (unless writing its definition)."""
        if named and id(op) in self.names:
            return self.names[id(op)], _POSTFIX
        self.depth += 1
        self.deepest = max(self.deepest, self.depth)
        if self.depth > 2 * _MAX_DEPTH:  # the parser would refuse it anyway; stop before Python's recursion limit
            raise ValueError(
                f"to_expr: the operator is nested more than {2 * _MAX_DEPTH} levels deep (at {op.name}); "
                f"structmat.parse reads at most {_MAX_DEPTH} levels of nesting"
            )
        try:
            return self.form(op)
        finally:
            self.depth -= 1

    def form(self, op: LinearOperator) -> tuple[str, int]:
        if isinstance(op, (Sum, Product)) and len(op._operands()) == 1:
            return self.text(op._operands()[0])
        if isinstance(op, Sum):
            parts = [self.operand(op.terms[0], _MUL)]
            for term in list(op.terms)[1:]:
                if isinstance(term, Scaled) and term.scale == -1.0 and id(term) not in self.names:
                    parts.append("- " + self.operand(term.op, _MUL))
                else:
                    parts.append("+ " + self.operand(term, _MUL))
            return " ".join(parts), _SUM
        if isinstance(op, Product):
            return " @ ".join(self.operand(f, _UNARY) for f in op.factors), _MUL
        if isinstance(op, Scaled):
            if op.scale == -1.0:
                return "-" + self.operand(op.op, _UNARY), _UNARY
            return f"{op.scale!r} * {self.operand(op.op, _UNARY)}", _MUL
        if isinstance(op, Transpose):
            if isinstance(op.op, Transpose):  # X.T would give X.op back: Transpose(Transpose(A)) is written explicitly
                return f"transpose({self.text(op.op)[0]})", _POSTFIX
            return self.operand(op.op, _POSTFIX) + ".T", _POSTFIX
        name, args, kwargs = self.calls[id(op)] if id(op) in self.calls else _expr_call(op)
        parts = [self.value(a) for a in args] + [f"{k}={self.value(v)}" for k, v in kwargs.items() if v is not None]
        return f"{name}({', '.join(parts)})", _POSTFIX

    def value(self, value: Any) -> str:
        """An argument as text: an operator by its expression, a list of values as ``[...]``, else a literal."""
        if isinstance(value, LinearOperator):
            return self.text(value)[0]
        if isinstance(value, (list, tuple)) and _operators_in(value):
            return "[" + ", ".join(self.value(v) for v in value) + "]"
        return _literal(value)


def to_expr(op: LinearOperator) -> str:
    """An expression that :func:`parse` turns back into an operator of the same structure as ``op``.

    Same classes, shapes, heads, arguments, nesting, scales and sharing (an operator used twice is named once,
    ``v1 = ...;``, and used by name); the parameters of the parsed operator are new (an expression holds no values).
    A ``Sum`` or ``Product`` of a single operand is written as that operand.

    Args:
        op: the operator.

    Returns:
        The expression, e.g. ``"dense(5, 3) @ dense(3, 7) + -2.5 * dense(7, 5).T"``.

    Raises:
        ValueError: for an operator without an expression: two different operators sharing a parameter, an operator
            class that is not in the grammar, or nesting deeper than :func:`parse` reads.

    Example:
        >>> import structmat as sm
        >>> from structmat.expr import parse, to_expr
        >>> A = sm.Dense(6, 3) @ sm.Dense(3, 6) - 2.5 * sm.kron(sm.Identity(2), sm.Diagonal(3)).T
        >>> to_expr(A)
        'dense(6, 3) @ dense(3, 6) - 2.5 * kron(identity(2), diag(3)).T'
        >>> to_expr(parse(to_expr(A))) == to_expr(A)
        True
        >>> W = sm.Dense(4, 4)
        >>> to_expr(W + W.T)
        'v1 = dense(4, 4); v1 + v1.T'
    """
    if not isinstance(op, LinearOperator):
        raise TypeError(f"to_expr: expected a LinearOperator, got {type(op).__name__}")
    printer = _Printer(op)
    text = printer.program()
    # Each operator nests its operands at most 2 levels deeper in the text (``-(X)``, ``multilevel(m, n, [X])``), a
    # leaf's arguments at most 4 (``mlr(..., blocks=[1, [[4, 3], ...]])``), the whole 1: a shallow operator is within
    # the nesting parse reads. Only a deep one is checked, by parsing its syntax (nothing is built).
    if 2 * printer.deepest + 5 > _MAX_DEPTH:
        try:
            _Parser(text).parse()
        except ValueError as err:
            raise ValueError(f"to_expr: {op.name} has no expression that structmat.parse reads back: {err}") from None
    return text
