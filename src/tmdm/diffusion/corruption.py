"""The forward process: absorbing-state masking of clean rows at random times.

Legend: B rows, L positions. Per-position inputs come from the data pipeline:
  tokens_BL    clean ids x0
  role_BL      vocab_lib.FIXED (never masked, never supervised), vocab_lib.TARGET, vocab_lib.CONDITION
  modality_BL  0 text, 1 image, 2 audio: selects the schedule (and the allowed output ids)

Each row draws t ~ U[t_min, 1] ('stratified': one uniform shifted by b/B across the batch, the
antithetic times of the MD4 line of work) and, for pairs, a corruption mode:
  joint        condition and target masked at rate 1 - alpha_m(t)
  conditional  condition clean, target masked
  drop         condition entirely masked (classifier-free guidance's unconditional branch),
               target masked; the condition is then neither an ELBO term nor counted.
Validation fixes the mode of every row (`for_eval`): 'joint' is the ELBO of the whole row,
'conditional' a bound on -log p(target | condition).

The estimator. Write r = 1 - alpha(t) for the mask rate. The ELBO of a row is
  ELBO = int_0^1 E_{mask at rate r}[ sum_{masked i} -log p(x0_i | x_r) ] dr / r        (1)
and t ~ U[0, 1] with dr = -alpha'(t) dt turns (1) into E_t[ w(t) sum_masked nll ] with
w(t) = -alpha'(t) / (1 - alpha(t)) (docs/design.md 2.3). That is the first copy of every row.

Complementary pairs (`complementary=True`): the caller stacks the same rows twice ([x; x]); the
second copy is masked exactly where the first is not, so every supervised token is predicted once
per pair. Its mask rate is r2 = alpha(t). As t ~ U[0, 1], r2 is not uniform; the change of variables
dr2 = -alpha'(t) dt in (1) gives the second copy's weight
  v(t) = -alpha'(t) / alpha(t)                                                         (2)
which makes E_t[v(t) sum_masked nll] equal (1) exactly, context included (the second copy's canvas
is a mask at rate alpha(t), the same law (1) integrates over). Weighting the second copy as a draw at
t' = alpha^-1(1 - alpha(t)) with w(t') is the same only when alpha' is constant (linear, log-linear);
for cosine it overstates the ELBO by 34% in the second copy (measured: tests/test_objective.py).

Truncations, both at the ends of (1) where the weights explode:
  first copy   t >= t_min: the integral over [0, t_min) is dropped and t's density is 1/(1 - t_min),
               so a context-free model gets alpha(t_min) / (1 - t_min) x ELBO (exactly 1 for linear;
               1 + t_min - O(t_min^2) for the others: 1.001 at t_min = 1e-3).
  second copy  v(t) = -alpha'(t) / max(alpha(t), pair_alpha_min): near t = 1, alpha -> 0 and v has a
               1/alpha tail whose second moment diverges like log(1 / alpha). Capping the denominator
               bounds v by max|alpha'| / pair_alpha_min and biases the copy by exactly
               -pair_alpha_min / 2 (relative, for any schedule with alpha(1) = 0: the capped part is
               int_0^a_min (1 - a / a_min) da); -0.05% at the default 1e-3. Log-linear never goes
               below its eps, so with eps >= pair_alpha_min it is not truncated at all.
The pair's loss divides by both copies' supervised counts, so it is the mean of the two copies.
"""

import dataclasses

import jax
import jax.numpy as jnp

from tmdm import vocab as vocab_lib
from tmdm.diffusion import schedules as schedules_lib

JOINT, CONDITIONAL, DROP = 0, 1, 2
EVAL_MODES = ('joint', 'conditional')
T_SAMPLING = ('uniform', 'stratified')


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  schedules: tuple[str, str, str] = ('linear', 'cosine', 'cosine')
  poly_power: float = 2.0
  loglinear_eps: float = 1e-3
  t_min: float = 1e-3
  t_sampling: str = 'stratified'
  complementary: bool = False
  pair_alpha_min: float = 1e-3
  mode_probs: tuple[float, float, float] = (0.6, 0.3, 0.1)

  @classmethod
  def from_config(cls, d) -> 'DiffusionConfig':
    return cls(schedules=(d.schedule_text, d.schedule_image, d.schedule_audio), poly_power=d.poly_power,
               loglinear_eps=d.loglinear_eps, t_min=d.t_min, t_sampling=d.t_sampling,
               complementary=d.complementary, pair_alpha_min=d.pair_alpha_min,
               mode_probs=(d.p_joint, d.p_conditional, d.p_drop_condition))

  def for_eval(self, mode: str) -> 'DiffusionConfig':
    """Validation: every row in one corruption mode ('joint' or 'conditional'), no pairs."""
    probs = dict(zip(EVAL_MODES, ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))))[mode]
    return dataclasses.replace(self, complementary=False, mode_probs=probs)

  def schedule(self, modality: int) -> schedules_lib.Schedule:
    return schedules_lib.get(self.schedules[modality], poly_power=self.poly_power,
                             loglinear_eps=self.loglinear_eps)


def sample_times(rng, n: int, cfg: DiffusionConfig):
  """t_n in [t_min, 1)."""
  if cfg.t_sampling == 'stratified':
    u = (jax.random.uniform(rng, ()) + jnp.arange(n) / n) % 1.0
  else:
    u = jax.random.uniform(rng, (n,))
  return cfg.t_min + (1.0 - cfg.t_min) * u


def per_position(fn, cfg, t_B, modality_BL):
  """Evaluates fn(schedule_m, t_B) for each modality and picks each position's value: [B, L]."""
  values_MB = jnp.stack([fn(cfg.schedule(m), t_B) for m in range(len(vocab_lib.MODALITIES))])
  values_BM = values_MB.T
  return jnp.take_along_axis(values_BM, jnp.clip(modality_BL, 0, len(vocab_lib.MODALITIES) - 1), axis=1)


def _complement_weight(sched, t_B, alpha_min):
  """v(t) of equation (2), its denominator capped at alpha_min."""
  return -sched.dalpha(t_B) / jnp.maximum(sched.alpha(t_B), alpha_min)


def corrupt(rng, tokens_BL, role_BL, modality_BL, cfg: DiffusionConfig, mask_id: int):
  """Returns dict: x_t_BL (corrupted ids), masked_BL (masked ELBO terms), weight_BL (w per position),
  supervised_BL (positions that count in the per-token normalization), t_B."""
  B, L = tokens_BL.shape
  n = B // 2 if cfg.complementary else B
  rng_t, rng_u, rng_mode = jax.random.split(rng, 3)
  t_n = sample_times(rng_t, n, cfg)
  u_nL = jax.random.uniform(rng_u, (n, L))
  mode_n = jax.random.choice(rng_mode, 3, (n,), p=jnp.asarray(cfg.mode_probs))
  if cfg.complementary:
    t_B = jnp.concatenate([t_n, t_n])
    mode_B = jnp.concatenate([mode_n, mode_n])
    u_BL = jnp.concatenate([u_nL, u_nL])
    second_B = jnp.arange(B) >= n
  else:
    t_B, mode_B, u_BL, second_B = t_n, mode_n, u_nL, jnp.zeros((B,), bool)

  p_mask_BL = per_position(lambda s, t: s.mask_prob(t), cfg, t_B, modality_BL)
  hit_BL = u_BL < p_mask_BL
  hit_BL = jnp.where(second_B[:, None], ~hit_BL, hit_BL)
  w_first_BL = per_position(lambda s, t: s.weight(t), cfg, t_B, modality_BL)
  w_second_BL = per_position(lambda s, t: _complement_weight(s, t, cfg.pair_alpha_min), cfg, t_B, modality_BL)
  weight_BL = jnp.where(second_B[:, None], w_second_BL, w_first_BL)

  is_target = role_BL == vocab_lib.TARGET
  is_cond = role_BL == vocab_lib.CONDITION
  mode = mode_B[:, None]
  cond_noised = is_cond & (mode == JOINT)
  cond_dropped = is_cond & (mode == DROP)
  supervised_BL = is_target | cond_noised
  masked_BL = supervised_BL & hit_BL
  x_t_BL = jnp.where(masked_BL | cond_dropped, mask_id, tokens_BL)
  return {'x_t_BL': x_t_BL, 'masked_BL': masked_BL, 'weight_BL': weight_BL.astype(jnp.float32),
          'supervised_BL': supervised_BL, 't_B': t_B}
