"""Samplers for the masked-diffusion model (pure and jittable; sharded like the model).

`ancestral`: the reverse process on a time grid 1 = t_0 > t_1 > ... > t_S = 0. From t to s < t,
each still-masked position is revealed with probability (alpha(s) - alpha(t)) / (1 - alpha(t))
(its own modality's schedule) with a token drawn from p(x0 | x_t); given tokens never change.
Categorical draws use the Gumbel-max trick in float32.

Legend: B rows, L positions, V vocabulary.
"""

import jax
import jax.numpy as jnp

from tmdm.diffusion import corruption
from tmdm.diffusion import loss as loss_lib
from tmdm.model import transformer


def top_p_filter(logits_BLV, top_p: float):
  """Keeps the smallest set of ids whose probability reaches top_p (nucleus sampling)."""
  if top_p >= 1.0:
    return logits_BLV
  sorted_desc = jnp.sort(logits_BLV, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(sorted_desc, axis=-1)
  cum_before = jnp.cumsum(probs, axis=-1) - probs
  kept = jnp.where(cum_before < top_p, sorted_desc, jnp.inf)
  threshold = jnp.min(kept, axis=-1, keepdims=True)
  return jnp.where(logits_BLV >= threshold, logits_BLV, -jnp.inf)


def gumbel_argmax(rng, logits_BLV):
  g = jax.random.gumbel(rng, logits_BLV.shape, jnp.float32)
  return jnp.argmax(logits_BLV.astype(jnp.float32) + g, axis=-1).astype(jnp.int32)


def ancestral(params, canvas_BL, segment_ids_BL, positions_BL, modality_BL, rng, *, model, vocab, diff_cfg,
              sharder, steps: int, temperature: float = 1.0, top_p: float = 1.0):
  """Fills every [MASK] of canvas_BL; returns int32 [B, L]."""
  allowed_MV = loss_lib.allowed_table(vocab, sharder)
  times = jnp.linspace(1.0, 0.0, steps + 1)
  B = canvas_BL.shape[0]

  def body(i, carry):
    x_BL, rng = carry
    rng, k_sample, k_reveal = jax.random.split(rng, 3)
    t, s = times[i], times[i + 1]
    t_B = jnp.full((B,), t)
    logits = model.apply({'params': params}, x_BL, segment_ids_BL, positions_BL, t_B)
    logits = top_p_filter(transformer.restrict(logits, modality_BL, allowed_MV) / temperature, top_p)
    proposal_BL = gumbel_argmax(k_sample, logits)
    alpha_t = corruption.per_position(lambda sch, tt: sch.alpha(tt), diff_cfg, t_B, modality_BL)
    alpha_s = corruption.per_position(lambda sch, tt: sch.alpha(tt), diff_cfg, jnp.full((B,), s), modality_BL)
    p_reveal = jnp.where(i == steps - 1, 1.0, (alpha_s - alpha_t) / jnp.maximum(1.0 - alpha_t, 1e-12))
    reveal = (x_BL == vocab.mask_id) & (jax.random.uniform(k_reveal, x_BL.shape) < p_reveal)
    return jnp.where(reveal, proposal_BL, x_BL), rng

  out_BL, _ = jax.lax.fori_loop(0, steps, body, (canvas_BL, rng))
  return out_BL


SAMPLERS = {'ancestral': ancestral}
