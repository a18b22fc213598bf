"""The forward process: absorbing-state masking of clean rows at random times.

Legend: B rows, L positions. Per-position inputs come from the data pipeline:
  tokens_BL    clean ids x0
  role_BL      spec.FIXED (never masked, never supervised), spec.TARGET, spec.CONDITION
  modality_BL  0 text, 1 image, 2 audio: selects the schedule (and the allowed output ids)

Each row draws t ~ U[t_min, 1] ('stratified': one uniform shifted by b/B across the batch, the
antithetic times of the MD4 line of work) and, for pairs, a corruption mode:
  joint        condition and target masked at rate 1 - alpha_m(t)
  conditional  condition clean, target masked
  drop         condition entirely masked (classifier-free guidance's unconditional branch),
               target masked; the condition is then neither an ELBO term nor counted.

Complementary pairs (`complementary=True`): the caller stacks the same rows twice ([x; x]); the
second copy is masked exactly where the first is not, so every supervised token is predicted once
per pair. A position clean with probability alpha_m(t) in the first copy is masked with probability
alpha_m(t) in the second, i.e. at time t' = alpha_m^{-1}(1 - alpha_m(t)), and gets weight w_m(t').
"""

import dataclasses

import jax
import jax.numpy as jnp

from tmdm.diffusion import schedules as schedules_lib
from tmdm.modalities import spec

JOINT, CONDITIONAL, DROP = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  schedules: tuple[str, str, str] = ('linear', 'cosine', 'cosine')
  poly_power: float = 2.0
  loglinear_eps: float = 1e-3
  t_min: float = 1e-3
  t_sampling: str = 'stratified'
  complementary: bool = False
  mode_probs: tuple[float, float, float] = (0.6, 0.3, 0.1)

  @classmethod
  def from_config(cls, d) -> 'DiffusionConfig':
    return cls(schedules=(d.schedule_text, d.schedule_image, d.schedule_audio), poly_power=d.poly_power,
               loglinear_eps=d.loglinear_eps, t_min=d.t_min, t_sampling=d.t_sampling,
               complementary=d.complementary, mode_probs=(d.p_joint, d.p_conditional, d.p_drop_condition))

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
  values_MB = jnp.stack([fn(cfg.schedule(m), t_B) for m in range(len(spec.MODALITIES))])
  values_BM = values_MB.T
  return jnp.take_along_axis(values_BM, jnp.clip(modality_BL, 0, len(spec.MODALITIES) - 1), axis=1)


def _complement_weight(sched, t_B, t_min):
  t_prime = sched.alpha_inv(1.0 - sched.alpha(t_B))
  return sched.weight(jnp.maximum(t_prime, t_min))


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
  w_second_BL = per_position(lambda s, t: _complement_weight(s, t, cfg.t_min), cfg, t_B, modality_BL)
  weight_BL = jnp.where(second_B[:, None], w_second_BL, w_first_BL)

  is_target = role_BL == spec.TARGET
  is_cond = role_BL == spec.CONDITION
  mode = mode_B[:, None]
  cond_noised = is_cond & (mode == JOINT)
  cond_dropped = is_cond & (mode == DROP)
  supervised_BL = is_target | cond_noised
  masked_BL = supervised_BL & hit_BL
  x_t_BL = jnp.where(masked_BL | cond_dropped, mask_id, tokens_BL)
  return {'x_t_BL': x_t_BL, 'masked_BL': masked_BL, 'weight_BL': weight_BL.astype(jnp.float32),
          'supervised_BL': supervised_BL, 't_B': t_B}
