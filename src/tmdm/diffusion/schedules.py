"""Noise schedules alpha(t): the probability that a token is still clean at time t in [0, 1].

The continuous-time ELBO weight is w(t) = -alpha'(t) / (1 - alpha(t)) (docs/design.md 2.3). In continuous
time the ELBO itself does not depend on the schedule; the schedule changes which noise levels the
Monte Carlo estimate visits and so its variance. Each modality picks its own schedule.

`alpha_inv` maps a clean probability back to a time (the samplers use it to find the time of a
canvas's masked share).

"cosine" means different things across the field: here (as in MDLM) it is alpha = cos(pi t / 2);
md4's "cosine" is alpha = 1 - sin(pi t / 2), offered as 'md4_cosine'. Their mask rates differ by up to
0.41 (at t = 0.5), so settings and per-t diagnostics do not carry over between the two names.
"""

import dataclasses
import math
from typing import Callable

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Schedule:
  name: str
  mask_prob: Callable  # t -> 1 - alpha(t), written to stay accurate near t = 0
  dalpha: Callable  # t -> alpha'(t)
  alpha_inv: Callable  # alpha -> t

  def alpha(self, t):
    return 1.0 - self.mask_prob(t)

  def weight(self, t):
    """w(t) = -alpha'(t) / (1 - alpha(t)); t must be > 0."""
    return -self.dalpha(t) / self.mask_prob(t)


def linear(**_):
  return Schedule('linear', lambda t: t, lambda t: -jnp.ones_like(t), lambda a: 1.0 - a)


def cosine(**_):
  half_pi = math.pi / 2
  # 1 - cos(x) = 2 sin(x / 2)^2 keeps precision for small t.
  return Schedule('cosine', lambda t: 2.0 * jnp.sin(half_pi * t / 2)**2, lambda t: -half_pi * jnp.sin(half_pi * t),
                  lambda a: jnp.arccos(jnp.clip(a, 0.0, 1.0)) / half_pi)


def md4_cosine(**_):
  half_pi = math.pi / 2
  # alpha = 1 - sin(pi t / 2): md4's "cosine"; 1 - alpha = sin(pi t / 2) is exact at small t.
  return Schedule('md4_cosine', lambda t: jnp.sin(half_pi * t), lambda t: -half_pi * jnp.cos(half_pi * t),
                  lambda a: jnp.arcsin(jnp.clip(1.0 - a, 0.0, 1.0)) / half_pi)


def polynomial(*, poly_power, **_):
  p = poly_power
  return Schedule('polynomial', lambda t: t**p, lambda t: -p * t**(p - 1),
                  lambda a: jnp.clip(1.0 - a, 0.0, 1.0)**(1.0 / p))


def loglinear(*, loglinear_eps, **_):
  # Total noise sigma(t) = -log(1 - (1 - eps) t), alpha = exp(-sigma): never fully masked at t = 1.
  c = 1.0 - loglinear_eps
  return Schedule('loglinear', lambda t: c * t, lambda t: -c * jnp.ones_like(t),
                  lambda a: jnp.clip((1.0 - a) / c, 0.0, 1.0))


SCHEDULES = {'linear': linear, 'cosine': cosine, 'md4_cosine': md4_cosine, 'polynomial': polynomial,
             'loglinear': loglinear}


def get(name: str, *, poly_power: float = 2.0, loglinear_eps: float = 1e-3) -> Schedule:
  return SCHEDULES[name](poly_power=poly_power, loglinear_eps=loglinear_eps)
