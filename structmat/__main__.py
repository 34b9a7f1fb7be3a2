"""``python -m structmat`` and the ``structmat`` console script: see :mod:`structmat.cli`."""

from __future__ import annotations

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
