"""structmat's benchmarks: scripts that check correctness, then time ours against hand-written baselines.

``python -m benchmarks`` runs every module's ``suite(size)`` (see :mod:`benchmarks._suite`); each ``bench_*.py``
also runs alone as a script.
"""
