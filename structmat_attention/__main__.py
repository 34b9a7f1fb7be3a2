"""``python -m structmat_attention``: the experiments' command line (see :mod:`structmat_attention.experiments`)."""

import sys

from .experiments._cli import main

if __name__ == "__main__":
    sys.exit(main())
