"""Schedules, corruption and the ELBO against direct float64 implementations of docs/design.md 2.3."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmdm import vocab as vocab_lib
from tmdm.diffusion import corruption, loss as loss_lib, schedules
from tmdm.parallel import sharding
from helpers import random_batch

VOCAB = vocab_lib.VocabSpec(37, 11, 13, multiple=8)
ALPHA64 = {  # alpha(t) in float64, written independently of schedules.py
    'linear': lambda t: 1 - t,
    'cosine': lambda t: np.cos(np.pi / 2 * t),
    'md4_cosine': lambda t: 1 - np.sin(np.pi / 2 * t),
    'polynomial': lambda t: 1 - t**3.0,
    'loglinear': lambda t: 1 - (1 - 1e-3) * t,
}


def _schedule(name):
  return schedules.get(name, poly_power=3.0, loglinear_eps=1e-3)


@pytest.mark.parametrize('name', sorted(schedules.SCHEDULES))
def test_weight_matches_float64_derivative(name):
  t = np.linspace(0.02, 0.98, 49)
  h = 1e-6
  alpha = ALPHA64[name]
  dalpha = (alpha(t + h) - alpha(t - h)) / (2 * h)
  expected = -dalpha / (1 - alpha(t))
  got = np.asarray(_schedule(name).weight(jnp.asarray(t, jnp.float32)))
  np.testing.assert_allclose(got, expected, rtol=2e-4)
  # alpha_inv inverts alpha.
  back = np.asarray(_schedule(name).alpha_inv(jnp.asarray(alpha(t), jnp.float32)))
  np.testing.assert_allclose(back, t, atol=2e-4)


def _elbo64(logits, tokens, modality, masked, weight, supervised):
  """Direct float64: sum over masked positions of w * -log softmax(logits | modality range)[x0],
  divided by the number of supervised positions."""
  logits = np.asarray(logits, np.float64)
  allowed = VOCAB.allowed_table()[modality]
  z = np.where(allowed, logits, -np.inf)
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
  return np.where(masked, weight * nll, 0).sum() / supervised.sum()


@pytest.mark.parametrize('name', sorted(schedules.SCHEDULES))
@pytest.mark.parametrize('mesh_shape', [(1, 1, 1), (2, 1, 4)])
def test_elbo_matches_float64(name, mesh_shape):
  sharder = sharding.Sharder(sharding.make_mesh(mesh_shape))
  batch = random_batch(VOCAB, 8, 13, seed=1, modalities=(vocab_lib.TEXT, vocab_lib.IMAGE, vocab_lib.AUDIO))
  cfg = corruption.DiffusionConfig(schedules=(name,) * 3, poly_power=3.0, t_sampling='uniform')
  c = corruption.corrupt(jax.random.PRNGKey(0), batch['tokens'], batch['role'], batch['modality'], cfg,
                         VOCAB.mask_id)
  logits = jax.random.normal(jax.random.PRNGKey(1), (8, 13, VOCAB.size)) * 3
  logits = jax.device_put(logits, sharder.named(('batch', None, 'vocab')))
  allowed = loss_lib.allowed_table(VOCAB, sharder)
  nll = loss_lib.vocab_parallel_nll(logits, jnp.asarray(batch['tokens']), jnp.asarray(batch['modality']),
                                    allowed, sharder)
  sums = loss_lib.elbo_sums(nll, c['masked_BL'], c['weight_BL'], c['supervised_BL'], batch['modality'])
  got = float(sums['elbo_sum'] / sums['count'])
  # Weights recomputed in float64 from each row's t.
  t = np.asarray(c['t_B'], np.float64)[:, None]
  h = 1e-6
  w64 = -(ALPHA64[name](t + h) - ALPHA64[name](t - h)) / (2 * h) / (1 - ALPHA64[name](t))
  expected = _elbo64(jax.device_get(logits), batch['tokens'], batch['modality'], np.asarray(c['masked_BL']),
                     np.broadcast_to(w64, (8, 13)), np.asarray(c['supervised_BL']))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert np.asarray(c['masked_BL']).any()


def test_mask_rate_follows_schedule():
  cfg = corruption.DiffusionConfig(schedules=('cosine',) * 3, t_sampling='uniform')
  tokens = np.full((4096, 16), VOCAB.text_start, np.int32)
  ones = np.ones_like(tokens)
  c = corruption.corrupt(jax.random.PRNGKey(3), tokens, ones, np.zeros_like(tokens), cfg, VOCAB.mask_id)
  t = np.asarray(c['t_B'])
  rate = np.asarray(c['masked_BL']).mean(1)
  # Binned masking rate vs 1 - cos(pi t / 2).
  for lo in np.arange(0, 1, 0.2):
    sel = (t >= lo) & (t < lo + 0.2)
    np.testing.assert_allclose(rate[sel].mean(), (1 - np.cos(np.pi / 2 * t[sel])).mean(), atol=0.02)
  assert np.all(np.asarray(c['x_t_BL'])[np.asarray(c['masked_BL'])] == VOCAB.mask_id)


@pytest.mark.parametrize('name', ['linear', 'cosine', 'polynomial'])
def test_complementary_pairs_supervise_each_token_once(name):
  cfg = corruption.DiffusionConfig(schedules=(name,) * 3, poly_power=3.0, complementary=True)
  batch = random_batch(VOCAB, 6, 13, seed=2)
  paired = {k: np.concatenate([v, v]) for k, v in batch.items()}
  c = corruption.corrupt(jax.random.PRNGKey(4), paired['tokens'], paired['role'], paired['modality'], cfg,
                         VOCAB.mask_id)
  masked = np.asarray(c['masked_BL'])
  first, second = masked[:6], masked[6:]
  supervised = paired['role'][:6] == vocab_lib.TARGET
  assert not (first & second).any()
  np.testing.assert_array_equal(first | second, supervised)
  # The complement is masked at rate alpha(t): weight -alpha'(t) / max(alpha(t), pair_alpha_min)
  # (float64 derivative here; the Monte Carlo in test_objective.py shows it is unbiased).
  t = np.asarray(c['t_B'][:6], np.float64)
  h = 1e-6
  alpha = ALPHA64[name]
  v64 = -(alpha(t + h) - alpha(t - h)) / (2 * h) / np.maximum(alpha(t), cfg.pair_alpha_min)
  np.testing.assert_allclose(np.asarray(c['weight_BL'])[6:, 0], v64, rtol=1e-3)


def test_condition_modes():
  """Pairs: joint masks the condition at rate t, conditional keeps it clean, drop masks all of it."""
  role = np.array([[vocab_lib.FIXED] + [vocab_lib.CONDITION] * 9 + [vocab_lib.TARGET] * 10] * 512, np.int32)
  tokens = np.full_like(role, VOCAB.text_start)
  cfg = corruption.DiffusionConfig(mode_probs=(0.5, 0.3, 0.2), t_sampling='uniform')
  c = corruption.corrupt(jax.random.PRNGKey(5), tokens, role, np.zeros_like(role), cfg, VOCAB.mask_id)
  x_t = np.asarray(c['x_t_BL'])
  cond_masked = (x_t[:, 1:10] == VOCAB.mask_id).mean(1)
  sup_cond = np.asarray(c['supervised_BL'])[:, 1:10].all(1)
  dropped = (cond_masked == 1.0) & ~sup_cond
  clean = (cond_masked == 0) & ~sup_cond
  assert abs(sup_cond.mean() - 0.5) < 0.08 and abs(dropped.mean() - 0.2) < 0.06
  assert abs(clean.mean() - 0.3) < 0.07
  assert not np.asarray(c['masked_BL'])[dropped][:, 1:10].any()  # Dropped conditions are no ELBO terms.
  assert (x_t[:, 0] == VOCAB.text_start).all()  # FIXED never changes.


def test_stratified_times_cover_the_interval():
  cfg = dataclasses.replace(corruption.DiffusionConfig(), t_min=0.0)
  t = np.sort(np.asarray(corruption.sample_times(jax.random.PRNGKey(0), 64, cfg)))
  assert np.all(np.diff(np.floor(t * 64)) == 1)  # One time per 1/64 bin.
