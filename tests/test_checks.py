"""structmat.checks: the one integer check (TypeError for a non-int, ValueError out of range, the caller named)."""

import numpy as np
import pytest
import torch

from structmat.checks import check_int, shown


@pytest.mark.parametrize("value", [3, np.int64(3), torch.tensor(3).item(), np.int32(3)])
def test_check_int_accepts_integers(value):
    out = check_int("Op(3)", "n", value)
    assert out == 3 and type(out) is int


@pytest.mark.parametrize(
    "value, got",
    [
        (True, "bool True"),
        (2.0, "float 2.0"),
        ("3", "str '3'"),
        (None, "NoneType None"),
        (torch.zeros(2, 3), "Tensor of shape \\(2, 3\\)"),
    ],
)
def test_check_int_type_error(value, got):
    with pytest.raises(TypeError, match=rf"^Op\(3\): n must be an int, got {got}$"):
        check_int("Op(3)", "n", value)


def test_check_int_range():
    with pytest.raises(ValueError, match=r"^Op: batch must be >= 1, got 0$"):
        check_int("Op", "batch", 0)
    with pytest.raises(ValueError, match=r"^Op: past must be >= 0, got -1$"):
        check_int("Op", "past", -1, 0)
    with pytest.raises(ValueError, match=r"^Op: k must be <= 4, got 5$"):
        check_int("Op", "k", 5, 0, 4)
    assert check_int("Op", "k", -7, None) == -7
    assert check_int("Op", "k", 4, 0, 4) == 4


def test_check_int_optional():
    assert check_int("Op", "heads", None, optional=True) is None
    assert check_int("Op", "heads", 2, optional=True) == 2
    with pytest.raises(TypeError, match=r"^Op: heads must be None or an int >= 1, got float 2.5$"):
        check_int("Op", "heads", 2.5, optional=True)
    with pytest.raises(ValueError, match=r"^Op: heads must be None or an int >= 1, got 0$"):
        check_int("Op", "heads", 0, optional=True)
    with pytest.raises(ValueError, match=r"^Op: w must be None or an int >= 0 and <= 3, got 4$"):
        check_int("Op", "w", 4, 0, 3, optional=True)
    with pytest.raises(TypeError, match=r"^Op: heads must be an int, got NoneType None$"):
        check_int("Op", "heads", None)


def test_shown_never_prints_tensor_values():
    assert shown(torch.arange(6.0).reshape(2, 3)) == "Tensor of shape (2, 3)"
    assert shown(np.zeros((4,))) == "ndarray of shape (4,)"
    assert shown([1, 2]) == "list [1, 2]"


def test_no_other_integer_checks_in_structmat():
    # The one integer check lives in structmat/checks.py: no other structmat module spells out the bool-excluding
    # integer test and raises with it (type dispatch such as "an int or a sequence" is allowed: it does not raise).
    import pathlib
    import re

    import structmat

    root = pathlib.Path(structmat.__file__).parent
    pattern = re.compile(r"isinstance\(\w+, bool\) or not isinstance\(\w+, numbers\.Integral\)\):\n\s+raise")
    offenders = [
        str(p.relative_to(root)) for p in root.rglob("*.py") if p.name != "checks.py" and pattern.search(p.read_text())
    ]
    assert offenders == [], offenders
