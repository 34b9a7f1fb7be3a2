"""``python -m benchmarks [--size smoke|full] [--only GROUP ...] [--out DIR]``: the whole suite, see ``_suite``."""

from __future__ import annotations

from benchmarks._suite import main

if __name__ == "__main__":
    raise SystemExit(main())
