"""Permutation's arguments: every bad one is a TypeError or ValueError that names Permutation and the value."""

from __future__ import annotations

import pytest
import torch

import structmat as sm

BAD = [
    (
        5,
        TypeError,
        r"Permutation: perm must be a sequence of ints .*, got int 5; for the identity of size 5, use Identi",
    ),
    (5.0, TypeError, r"Permutation: perm must be a sequence of ints .*, got float 5\.0$"),
    ("201", TypeError, r"Permutation: perm must be a sequence of ints .*, got str '201'"),
    (None, TypeError, r"Permutation: perm must be a sequence of ints .*, got NoneType None"),
    ({0, 1}, TypeError, r"Permutation: perm must be a sequence of ints .*, got set \{0, 1\}"),
    ([0, 1.0], TypeError, r"Permutation: perm must hold ints, got \[0, 1\.0\] \(not an int: 1\.0\)"),
    ([True, False], TypeError, r"Permutation: perm must hold ints, got \[True, False\] \(not an int: True\)"),
    ([[0], [1]], TypeError, r"Permutation: perm must hold ints, got \[\[0\], \[1\]\] \(not an int: \[0\]\)"),
    (
        torch.tensor([1.0, 0.0]),
        TypeError,
        r"Permutation: perm must be a sequence of ints, got a tensor of shape \(2,\)",
    ),
    (
        torch.tensor([[1, 0]]),
        TypeError,
        r"Permutation: perm must be a sequence of ints, got a tensor of shape \(1, 2\)",
    ),
    ([], ValueError, r"Permutation: perm must be a permutation of range\(0\), got \[\]; an operator needs n >= 1"),
    ([0, 2, 2], ValueError, r"Permutation: perm must be a permutation of range\(3\), got \[0, 2, 2\]: 2 appears twice"),
    ([0, 3, 1], ValueError, r"range\(3\), got \[0, 3, 1\]: entry 1 is 3, outside range\(3\)"),
    ([-1, 0, 1], ValueError, r"range\(3\), got \[-1, 0, 1\]: entry 0 is -1, outside range\(3\)"),
    (
        list(range(20)) + [5],
        ValueError,
        r"range\(21\), got \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, \.\.\.\] \(length 21\): 5 appears twice",
    ),
]


@pytest.mark.parametrize(("perm", "exc", "match"), BAD, ids=[repr(b[0])[:20] for b in BAD])
def test_bad_permutations(perm: object, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        sm.Permutation(perm)  # type: ignore[arg-type]


@pytest.mark.parametrize("perm", [[2, 0, 1], (2, 0, 1), torch.tensor([2, 0, 1]), range(3)])
def test_good_permutations(perm: object) -> None:
    op = sm.Permutation(perm)  # type: ignore[arg-type]
    expected = [[0, 0, 1], [1, 0, 0], [0, 1, 0]] if list(perm) == [2, 0, 1] else torch.eye(3).tolist()  # type: ignore[call-overload]
    assert op.dense(torch.float64).tolist() == expected
    assert all(type(p) is int for p in op.perm)


def test_transpose_is_the_inverse() -> None:
    op = sm.Permutation([3, 0, 4, 1, 2])
    eye = torch.eye(5, dtype=torch.float64)
    assert torch.equal(op.T.dense(torch.float64) @ op.dense(torch.float64), eye)
