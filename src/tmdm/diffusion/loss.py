"""The continuous-time ELBO of absorbing-state diffusion, per token and per modality.

  ELBO per token = sum over rows b and masked positions i of w(t_b) * -log p(x0_i | x_t)
                   / (number of supervised positions in the batch)

w(t) = -alpha'(t) / (1 - alpha(t)) already divides by the expected masked share (1/t for the linear
schedule); the sum is then divided by the supervised (non-pad) token count, never by the realized
number of masked tokens, which would be a different, biased objective (docs/design.md 2.3).

Sums and counts are kept separately (`elbo_sums`) so that microbatches and log intervals add up
exactly before the one division (`finalize`).

Legend: B rows, L positions, V vocabulary (sharded over 'tensor'), M modalities.
"""

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from tmdm import vocab as vocab_lib
from tmdm.parallel import sharding as sharding_lib


def allowed_table(vocab: vocab_lib.VocabSpec, sharder: sharding_lib.Sharder):
  """Bool [M, V]: ids each modality may predict (iota comparisons, no baked-in constant)."""
  bounds = jnp.asarray([vocab.range(m) for m in range(len(vocab_lib.MODALITIES))], jnp.int32)
  ids_V = jnp.arange(vocab.size, dtype=jnp.int32)
  allowed_MV = (ids_V >= bounds[:, :1]) & (ids_V < bounds[:, 1:])
  return sharder.constrain(allowed_MV, (None, 'vocab'))


def vocab_parallel_nll(logits_BLV, targets_BL, modality_BL, allowed_MV, sharder: sharding_lib.Sharder):
  """-log softmax(logits restricted to the position's modality)[target], vocabulary sharded over
  'tensor' (Megatron-style: local max / sum-exp / target logit, combined by collectives)."""

  def local(logits, targets, modality, allowed):
    v_local = logits.shape[-1]
    offset = jax.lax.axis_index('tensor') * v_local
    logits = jnp.where(allowed[modality], logits, -1e30)
    row_max = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=-1)), 'tensor')
    sum_exp = jax.lax.psum(jnp.sum(jnp.exp(logits - row_max[..., None]), axis=-1), 'tensor')
    local_t = targets - offset
    inside = (local_t >= 0) & (local_t < v_local)
    picked = jnp.take_along_axis(logits, jnp.clip(local_t, 0, v_local - 1)[..., None], axis=-1)[..., 0]
    target_logit = jax.lax.psum(jnp.where(inside, picked, 0.0), 'tensor')
    return jnp.log(sum_exp) + row_max - target_logit

  batch = sharding_lib.BATCH_AXES
  return jax.shard_map(
      local, mesh=sharder.mesh,
      in_specs=(P(batch, None, 'tensor'), P(batch, None), P(batch, None), P(None, 'tensor')),
      out_specs=P(batch, None))(logits_BLV, targets_BL, modality_BL, allowed_MV)


def chunked_nll(unembed_fn, x_BLD, targets_BL, modality_BL, allowed_MV, sharder: sharding_lib.Sharder, chunk: int):
  """vocab_parallel_nll(unembed_fn(x_BLD), ...) computed `chunk` positions at a time, each chunk's
  logits recomputed in the backward pass (jax.checkpoint): peak logits memory is B x chunk x V
  instead of B x L x V, at the price of one more unembedding matmul. L need not divide by chunk."""
  B, L, D = x_BLD.shape
  chunk = min(chunk, L)
  n = -(-L // chunk)
  pad = n * chunk - L

  def chunks(a, axes):  # [B, L, ...] -> [n, B, chunk, ...], padded at the end of L with zeros
    a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    a = jnp.moveaxis(a.reshape((B, n, chunk) + a.shape[2:]), 1, 0)
    return sharder.constrain(a, (None,) + axes)

  @jax.checkpoint
  def one(args):
    x_BCD, t_BC, m_BC = args
    return vocab_parallel_nll(unembed_fn(x_BCD), t_BC, m_BC, allowed_MV, sharder)

  nll_NBC = jax.lax.map(one, (chunks(x_BLD, ('batch', 'length', 'act_embed')), chunks(targets_BL, ('batch', 'length')),
                              chunks(modality_BL, ('batch', 'length'))))
  nll_BL = jnp.moveaxis(nll_NBC, 0, 1).reshape(B, n * chunk)[:, :L]
  return sharder.constrain(nll_BL, ('batch', 'length'))


def elbo_sums(nll_BL, masked_BL, weight_BL, supervised_BL, modality_BL, focus_BL=None) -> dict:
  """Weighted NLL sums and supervised counts, in total and per modality (float32 scalars); with
  `focus_BL`, also those of the focus positions alone ('elbo_sum/focus', 'count/focus')."""
  term_BL = jnp.where(masked_BL, weight_BL * nll_BL, 0.0)
  out = {'elbo_sum': jnp.sum(term_BL), 'count': jnp.sum(supervised_BL, dtype=jnp.float32),
         'masked': jnp.sum(masked_BL, dtype=jnp.float32)}
  for m, name in enumerate(vocab_lib.MODALITIES):
    is_m = modality_BL == m
    out[f'elbo_sum/{name}'] = jnp.sum(jnp.where(is_m, term_BL, 0.0))
    out[f'count/{name}'] = jnp.sum(supervised_BL & is_m, dtype=jnp.float32)
  if focus_BL is not None:
    out['elbo_sum/focus'] = jnp.sum(jnp.where(focus_BL, term_BL, 0.0))
    out['count/focus'] = jnp.sum(supervised_BL & focus_BL, dtype=jnp.float32)
  return out


def finalize(sums: dict) -> dict:
  """Per-token ELBO (`loss`), per modality `loss/<m>` and the bound `ppl/<m>` = exp(ELBO per token),
  and `loss/focus` when the sums have focus terms. Modalities with no supervised token are left out.
  Works on numpy or jax scalars."""
  out = {}
  if sums['count'] > 0:
    out['loss'] = float(sums['elbo_sum'] / sums['count'])
    out['masked_frac'] = float(sums['masked'] / sums['count'])
  for name in vocab_lib.MODALITIES:
    if sums[f'count/{name}'] > 0:
      loss = float(sums[f'elbo_sum/{name}'] / sums[f'count/{name}'])
      out[f'loss/{name}'] = loss
      out[f'ppl/{name}'] = math.exp(min(loss, 80.0))
  if sums.get('count/focus', 0) > 0:
    out['loss/focus'] = float(sums['elbo_sum/focus'] / sums['count/focus'])
  return out
