"""Scaling laws and studies: fits of L(N, D) with bootstrap intervals and compute-optimal plans (laws.py),
their plots (plots.py), sweep grids (sweeps.py), `tmdm scaling` (report.py) and `tmdm study report`
(study.py: a sweep's settings over seeds as a table and a figure). May import evaluation/ and below."""
