"""Monte Carlo of the training objective against the analytic ELBO, for every schedule.

  python studies/objective_mc.py [--rows=65536] [--length=37]

A context-free model has fixed per-position NLLs, so its ELBO is exactly their sum. For each schedule
and t sampling this prints the mean of `corruption.corrupt` + `loss.elbo_sums` over that sum without
pairs, with complementary pairs, and each pair copy alone; `--old_pair_weight` puts back the
pre-issue-11 second-copy weight w(t') at t' = alpha^-1(1 - alpha(t)) to show its bias.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from tmdm import vocab as vocab_lib
from tmdm.diffusion import corruption, schedules


def _old_weight(sched, t_B, _):
  t_prime = sched.alpha_inv(1.0 - sched.alpha(t_B))
  return sched.weight(jnp.maximum(t_prime, 1e-3))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rows', type=int, default=1 << 16)
  parser.add_argument('--length', type=int, default=37)
  parser.add_argument('--old_pair_weight', action='store_true')
  args = parser.parse_args()
  if args.old_pair_weight:
    corruption._complement_weight = _old_weight
  n, L = args.rows, args.length
  modality = np.arange(L) * 3 // L
  nll = np.random.default_rng(0).uniform(0.5, 4.0, L).astype(np.float32)
  print(f'{"schedule":<12} {"t":<11} {"no pairs":>9} {"pairs":>9} {"copy 1":>9} {"copy 2":>9}')
  for name in schedules.SCHEDULES:
    for t_sampling in ('stratified', 'uniform'):
      out = []
      for pairs in (False, True):
        cfg = corruption.DiffusionConfig(schedules=(name,) * 3, t_sampling=t_sampling, complementary=pairs)
        B = 2 * n if pairs else n
        shape = (B, L)
        c = corruption.corrupt(jax.random.PRNGKey(0), np.zeros(shape, np.int32), np.full(shape, vocab_lib.TARGET),
                               np.broadcast_to(modality, shape), cfg, 1)
        term = np.where(np.asarray(c['masked_BL']), np.asarray(c['weight_BL']) * nll, 0).sum(1) / nll.sum()
        out += [term.mean()] if not pairs else [term.mean(), term[:n].mean(), term[n:].mean()]
      print(f'{name:<12} {t_sampling:<11} ' + ' '.join(f'{x:9.4f}' for x in out))


if __name__ == '__main__':
  main()
