"""Scaling laws: fits of L(N, D) with bootstrap intervals and compute-optimal plans (laws.py), their
plots (plots.py), sweep grids (sweeps.py) and `tmdm scaling` (report.py). May import evaluation/ and
below."""
