"""Completeness: every public operator class is known everywhere a family must be known.

For every ``LinearOperator`` subclass in ``structmat.__all__``: an entry in the test registry (tests/zoo.py) with
members of that class, an expression name (``parse(to_expr(op))`` rebuilds every member), an independent reference
(tests/reference.py or the entry's ``reference``) that matches ``dense()``, and a projection rule declared in the
class body (``projection``; ``_project`` for a closed form, with members whose projection is exact) or the explicit
``"gradient"`` fallback mark. :func:`problems` lists what is missing; a deliberately unregistered class shows that it
reports each gap.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import ClassVar

import pytest
import torch
import zoo
from reference import reference_dense

import structmat as sm
from structmat.core import family as _family
from structmat.core.family import FAMILIES as EXPRESSION_CLASSES
from structmat.core.family import PROJECTIONS
from structmat.core.network import Factor, Network
from structmat.core.nodes import NetNode, Node
from structmat.expr import REGISTRY, SYNTAX, parse, to_expr

F64 = torch.float64


def public_classes() -> list[type[sm.LinearOperator]]:
    """The ``LinearOperator`` subclasses that ``structmat.__all__`` exports (aliases counted once)."""
    found: dict[type, None] = {}
    for name in sm.__all__:
        obj = getattr(sm, name)
        if isinstance(obj, type) and issubclass(obj, sm.LinearOperator) and obj is not sm.LinearOperator:
            found[obj] = None
    return list(found)


def _reference_problem(op: sm.LinearOperator) -> str | None:
    try:
        ref = reference_dense(op)
    except TypeError as err:
        return f"no reference implementation ({err})"
    got = op.dense(dtype=F64 if op.dtype is None else None)
    if tuple(ref.shape) != tuple(got.shape) or not torch.allclose(got, ref.to(got.dtype), rtol=1e-10, atol=1e-10):
        return f"the reference of {op.name} differs from its dense()"
    return None


def _expression_problem(op: sm.LinearOperator) -> str | None:
    try:
        text = to_expr(op)
    except ValueError as err:
        return f"no expression ({err})"
    try:
        back = parse(text, device="meta")
    except ValueError as err:
        return f"{text!r} does not parse ({err})"
    if type(back) is not type(op) or back.shape != op.shape or to_expr(back) != text:
        return f"{text!r} does not parse back to the same structure"
    return None


def problems(cls: type, members: list[sm.LinearOperator] | None = None) -> list[str]:
    """What ``cls`` lacks, one line each (empty when it is complete). ``members`` default to its registry entry's."""
    out = []
    entry = zoo.entry(cls)
    if entry is None:
        out.append("not in the test registry (tests/zoo.py FAMILIES)")
    elif not entry.members:
        out.append("its test registry entry has no members")
    if members is None:
        members = [] if entry is None else [zoo.build(name) for name in entry.members]
    wrong = [op.name for op in members if type(op) is not cls]
    if wrong:
        out.append(f"test registry members of another class: {wrong}")
    name = vars(cls).get("expr_name")
    if cls not in SYNTAX and (name is None or REGISTRY.get(name) is not cls):
        out.append("not in the expression registry (no expr_name in its class body)")
    elif cls not in SYNTAX and "_expr_args" not in vars(cls):
        out.append("no _expr_args, so to_expr cannot write it")
    rule = vars(cls).get("projection")
    if rule not in PROJECTIONS:
        out.append(f"no projection rule (class attribute projection in {PROJECTIONS}, or 'gradient' as the mark)")
    elif rule == "closed form" and "_project" not in vars(cls):
        out.append("projection is 'closed form' but the class defines no _project")
    if entry is not None and rule in PROJECTIONS:
        if entry.projection != rule:
            out.append(f"the test registry says projection {entry.projection!r}, the class {rule!r}")
        if rule == "closed form" and not entry.exact:
            out.append("a closed-form projection without exact members in the test registry to check it")
    for op in members:
        for problem in (_reference_problem(op), _expression_problem(op)):
            if problem is not None:
                out.append(problem)
    return out


@pytest.mark.parametrize("cls", public_classes(), ids=lambda c: c.__name__)
def test_public_class_is_registered_everywhere(cls: type) -> None:
    assert problems(cls) == []


def test_every_registry_entry_is_public() -> None:
    """No stale entries: each test registry entry is a public class, and each class with an expression name is
    exported (a family file whose class is not in ``structmat.__all__`` fails here)."""
    public = set(public_classes())
    assert {entry.cls for entry in zoo.FAMILIES.values()} == public
    assert set(EXPRESSION_CLASSES.values()) <= public


def test_block_lowrank_is_known_everywhere() -> None:
    """The worked example of CONTRIBUTING.md: one library file, one registry entry."""
    assert sm.BlockLowRank in public_classes()
    assert REGISTRY["block_lowrank"] is sm.BlockLowRank and zoo.entry(sm.BlockLowRank) is not None


class Unregistered(sm.LinearOperator):
    """A family someone forgot to register: a dense matrix with no expression, projection rule or test entry."""

    def __init__(self) -> None:
        super().__init__((3, 2))
        self.weight = torch.nn.Parameter(torch.randn(3, 2, dtype=F64))

    def _lower(self) -> Node:
        return NetNode(Network((Factor(self, "weight", (0, 1), (3, 2)),), ((1, 2),), ((0, 3),)))


def test_an_unregistered_family_is_reported_everywhere() -> None:
    found = problems(Unregistered, [Unregistered()])
    text = "\n".join(found)
    assert "not in the test registry" in text
    assert "not in the expression registry" in text
    assert "no projection rule" in text
    assert "no reference implementation" in text
    assert "no expression" in text


@contextlib.contextmanager
def restored_registry() -> Iterator[None]:
    """Classes defined inside leave the expression registry as it was."""
    saved = dict(_family.EXPRESSIONS), dict(_family.FAMILIES)
    try:
        yield
    finally:
        for table, old in zip((_family.EXPRESSIONS, _family.FAMILIES), saved):
            table.clear()
            table.update(old)


def test_a_half_registered_family_is_reported() -> None:
    with restored_registry():

        class HalfRegistered(sm.LinearOperator):
            """Declares an expression name and a closed form it does not implement."""

            expr_name: ClassVar[str] = "half_registered_for_tests"
            projection: ClassVar[str] = "closed form"

            def __init__(self) -> None:
                super().__init__((2, 2))
                self.weight = torch.nn.Parameter(torch.randn(2, 2, dtype=F64))

            def _lower(self) -> Node:
                return NetNode(Network((Factor(self, "weight", (0, 1), (2, 2)),), ((1, 2),), ((0, 2),)))

        text = "\n".join(problems(HalfRegistered, [HalfRegistered()]))
        assert REGISTRY["half_registered_for_tests"] is HalfRegistered
    assert "half_registered_for_tests" not in REGISTRY
    assert "not in the test registry" in text
    assert "no _expr_args" in text
    assert "defines no _project" in text


def test_a_bad_projection_rule_is_refused() -> None:
    with pytest.raises(ValueError, match=r"Bad: projection must be one of .*'gradient'.*, got 'svd'"):

        class Bad(sm.LinearOperator):
            projection: ClassVar[str] = "svd"


def test_an_expression_name_cannot_be_taken_twice() -> None:
    with restored_registry(), pytest.raises(ValueError, match=r"LowRank: the expression name 'dense' is taken by"):

        class LowRank(sm.LinearOperator):  # noqa: F811 - a second class that wants Dense's name
            expr_name: ClassVar[str] = "dense"


def test_a_family_missing_from_one_place_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take BlockLowRank out of each table in turn: each removal alone is reported."""
    assert problems(sm.BlockLowRank) == []
    members = [zoo.build("block_lowrank")]
    with monkeypatch.context() as patch:
        patch.delitem(zoo.FAMILIES, "BlockLowRank")
        assert problems(sm.BlockLowRank, members) == [
            "not in the test registry (tests/zoo.py FAMILIES)",
            "no reference implementation (no reference for BlockLowRank)",  # its reference lives in its entry
        ]
    with monkeypatch.context() as patch:
        patch.delitem(REGISTRY, "block_lowrank")
        assert "not in the expression registry (no expr_name in its class body)" in problems(sm.BlockLowRank)
    with monkeypatch.context() as patch:
        patch.delattr(sm.BlockLowRank, "projection")
        assert any("no projection rule" in p for p in problems(sm.BlockLowRank))
    with monkeypatch.context() as patch:
        entry = zoo.FAMILIES["BlockLowRank"]
        patch.setitem(zoo.FAMILIES, "BlockLowRank", type(entry)(entry.cls, entry.members, entry.projection))
        found = problems(sm.BlockLowRank)
        assert "a closed-form projection without exact members in the test registry to check it" in found
        assert any("no reference implementation" in p for p in found)
