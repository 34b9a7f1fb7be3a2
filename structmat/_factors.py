"""Deprecated: the old home of the integer checks, kept only until ``structmat_attention`` imports
:mod:`structmat.checks` (then this file is deleted). Use :func:`structmat.checks.check_int`."""

from __future__ import annotations

from .checks import check_int

__all__ = ["check_int", "check_optional_int"]


def check_optional_int(owner: str, what: str, value: object) -> int | None:
    """Deprecated: ``structmat.checks.check_int(owner, what, value, optional=True)``."""
    return check_int(owner, what, value, optional=True)
