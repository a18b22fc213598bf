"""The training objective against analytic values, by Monte Carlo (not the code's formula again).

A context-free model has a fixed -log p(x0_i) = nll_i at every position, whatever it sees; its ELBO
is then exactly sum_i nll_i (docs/design.md 2.3: int_0^1 -alpha'(t) dt = 1 for every schedule). The
estimator `corruption.corrupt` + `loss.elbo_sums` averaged over many rows must reproduce it for every
schedule, with complementary pairs on and off (each copy on its own too), stratified and uniform t.
The truncations (corruption.py) cost at most 0.1% of it; the bound asserted is 1%, and each test
checks that its own standard error makes that bound a real one (>= 4 standard errors). A model whose
loss depends on how much of its canvas is masked checks what the context-free one cannot: that the
second copy's weight has the right second moment too, not only the right integral.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmdm import vocab as vocab_lib
from tmdm.diffusion import corruption, loss as loss_lib, schedules
from tmdm.parallel import sharding

L = 61
ROWS = 1 << 17
MODALITY_L = np.repeat([vocab_lib.TEXT, vocab_lib.IMAGE, vocab_lib.AUDIO], [23, 19, 19]).astype(np.int32)
NLL_L = np.random.default_rng(0).uniform(0.5, 4.0, L).astype(np.float32)
VOCAB = vocab_lib.VocabSpec(37, 11, 13, multiple=8)


@functools.partial(jax.jit, static_argnames=('cfg', 'rows'))
def _weighted_terms(rng, role_L, nll_L, context_b=0.0, *, cfg, rows):
  """Per row: sum of w * nll over masked positions, and the supervised count, for `rows` rows of
  identical content (stacked twice when the config pairs them, as train_step does). The model's
  -log p(x0_i | x_t) is nll_i + context_b * K / L, K the number of mask ids on its canvas x_t (a
  traced argument, so context_b = 0 and the context-dependent test share one compiled program)."""
  B = 2 * rows if cfg.complementary else rows
  role_BL = jnp.broadcast_to(role_L, (B, L))
  modality_BL = jnp.broadcast_to(jnp.asarray(MODALITY_L), (B, L))
  tokens_BL = jnp.full((B, L), VOCAB.text_start, jnp.int32)
  c = corruption.corrupt(rng, tokens_BL, role_BL, modality_BL, cfg, VOCAB.mask_id)
  k_B = jnp.sum(c['x_t_BL'] == VOCAB.mask_id, axis=1, dtype=jnp.float32)
  nll_BL = nll_L[None, :] + context_b * k_B[:, None] / L
  term_B = jnp.sum(jnp.where(c['masked_BL'], c['weight_BL'] * nll_BL, 0.0), axis=1)
  # The public loss path gives the same total (the per-row split is for the standard error only).
  sums = loss_lib.elbo_sums(nll_BL, c['masked_BL'], c['weight_BL'], c['supervised_BL'], modality_BL)
  return term_B, jnp.sum(c['supervised_BL'], axis=1, dtype=jnp.float32), sums


def _ratio_and_se(term_B, expected_per_row):
  """Mean of per-row terms over the analytic value, and its standard error (rows are independent
  under uniform t; stratified times are negatively correlated, so the same formula over-covers)."""
  x = np.asarray(term_B, np.float64) / expected_per_row
  return x.mean(), x.std() / np.sqrt(x.size)


@pytest.mark.parametrize('t_sampling', ['stratified', 'uniform'])
@pytest.mark.parametrize('complementary', [False, True])
@pytest.mark.parametrize('name', sorted(schedules.SCHEDULES))
def test_estimator_mean_is_the_analytic_elbo(name, complementary, t_sampling):
  cfg = corruption.DiffusionConfig(schedules=(name,) * 3, t_sampling=t_sampling, complementary=complementary)
  role_L = np.full((L,), vocab_lib.TARGET, np.int32)
  term_B, count_B, sums = jax.device_get(_weighted_terms(jax.random.PRNGKey(7), role_L, NLL_L, cfg=cfg, rows=ROWS))
  exact = float(NLL_L.sum())
  np.testing.assert_array_equal(count_B, L)
  copies = (term_B[:ROWS], term_B[ROWS:]) if complementary else (term_B,)
  for copy, part in enumerate(copies):  # Each copy of a pair is an unbiased estimator on its own.
    ratio, se = _ratio_and_se(part, exact)
    assert 4 * se < 0.01, f'too few draws for a 1% bound: standard error {se:.4f}'
    assert abs(ratio - 1) < 0.01, f'{name} copy {copy}: estimator / analytic ELBO = {ratio:.4f} (se {se:.4f})'
  per_token = float(sums['elbo_sum'] / sums['count'])
  np.testing.assert_allclose(per_token, exact / L, rtol=0.01)


# The context part of the next test's model: b (L + 1) / 2 = 124 against sum(NLL_L) = 138, so the
# weight with a wrong second moment below (an extra -b (L - 1) / 24) moves the second copy by 3.8%, far
# past the 1% bound. Not larger: the first copy's standard error grows with b, and at b = 8 it makes the
# 1% bound no longer a real one (polynomial: 0.0026).
CONTEXT_B = 4.0


@pytest.mark.parametrize('complementary', [False, True])
@pytest.mark.parametrize('name', sorted(schedules.SCHEDULES))
def test_estimator_mean_with_a_context_dependent_model(name, complementary):
  """A model whose -log p(x0_i | x_t) = a_i + b K / L, K the number of masked positions of its canvas.

  The context-free test above cannot tell weights apart that share one integral: a copy masked at
  rate r(t) with weight v(t) has mean E_t[v r] sum(a), so any v with E_t[v r] = 1 passes it. Here
  the mean is also sensitive to E_t[v r^2], which the ELBO fixes.

  Exact value, from equation (1) of corruption.py: at mask rate r, position i is masked with
  probability r, and given that, K - 1 ~ Binomial(L - 1, r), so E[K | i masked] = 1 + (L - 1) r and
    E[sum_masked nll | r] = sum_i r (a_i + b (1 + (L - 1) r) / L) = r (sum(a) + b (1 + (L - 1) r)).
  Dividing by r and integrating r over [0, 1]: ELBO = sum(a) + b (1 + (L - 1) / 2) = sum(a) + b (L + 1) / 2.
  The second copy of a pair is masked at rate alpha(t), so it is unbiased iff E_t[v alpha] = 1 and
  E_t[v alpha^2] = 1/2; v = -alpha' / alpha gives int_0^1 a da = 1/2. Weights v = 1 / alpha
  (E[v alpha^2] = int alpha dt: 2/pi for cosine) or -alpha' (1 / alpha + (2 - 3 alpha) / 2) (an extra
  int_0^1 a^2 (2 - 3 a) / 2 da = -1/24) pass the context-free test and fail this one (but 1 / alpha
  fails md4_cosine's there too, by 2%, through its cap: alpha vanishes quadratically at t = 1). With
  alpha' = -1 (linear) 1 / alpha is the right weight, and log-linear's -alpha' is 1 - eps.
  """
  cfg = corruption.DiffusionConfig(schedules=(name,) * 3, complementary=complementary)
  role_L = np.full((L,), vocab_lib.TARGET, np.int32)  # No condition: every mask id is an ELBO term.
  term_B, count_B, sums = jax.device_get(
      _weighted_terms(jax.random.PRNGKey(5), role_L, NLL_L, CONTEXT_B, cfg=cfg, rows=ROWS))
  exact = float(NLL_L.astype(np.float64).sum()) + CONTEXT_B * (L + 1) / 2
  np.testing.assert_array_equal(count_B, L)
  copies = (term_B[:ROWS], term_B[ROWS:]) if complementary else (term_B,)
  for copy, part in enumerate(copies):  # The second copy carries the pair weight: checked on its own.
    ratio, se = _ratio_and_se(part, exact)
    assert 4 * se < 0.01, f'too few draws for a 1% bound: standard error {se:.4f}'
    assert abs(ratio - 1) < 0.01, f'{name} copy {copy}: estimator / exact ELBO = {ratio:.4f} (se {se:.4f})'
  # And the public loss path (the pair's mean), per token.
  np.testing.assert_allclose(float(sums['elbo_sum'] / sums['count']), exact / L, rtol=0.01)


@pytest.mark.parametrize('name', ['cosine', 'polynomial'])
def test_conditional_modes_with_pairs(name):
  """Pair rows: a condition is an ELBO term only in joint mode, so E[sum] = sum_target nll +
  p_joint * sum_condition nll, and E[count] likewise."""
  cfg = corruption.DiffusionConfig(schedules=(name,) * 3, complementary=True, mode_probs=(0.5, 0.3, 0.2))
  role_L = np.where(np.arange(L) < 20, vocab_lib.CONDITION, vocab_lib.TARGET).astype(np.int32)
  term_B, count_B, _ = jax.device_get(_weighted_terms(jax.random.PRNGKey(11), role_L, NLL_L, cfg=cfg, rows=ROWS))
  cond = role_L == vocab_lib.CONDITION
  exact = NLL_L[~cond].sum() + 0.5 * NLL_L[cond].sum()
  ratio, se = _ratio_and_se(term_B, exact)
  assert 4 * se < 0.01 and abs(ratio - 1) < 0.01, (ratio, se)
  np.testing.assert_allclose(count_B.mean(), (~cond).sum() + 0.5 * cond.sum(), rtol=0.01)


@pytest.mark.parametrize('complementary', [False, True])
@pytest.mark.parametrize('name', sorted(schedules.SCHEDULES))
def test_uniform_logits_give_log_vocab_per_token(name, complementary):
  """A model with all-zero logits predicts each modality's ids uniformly: its ELBO per token is
  log V_modality exactly, through the real loss path (restricted softmax, finalize)."""
  sharder = sharding.Sharder(sharding.make_mesh((1, 1, 1)))
  allowed_MV = loss_lib.allowed_table(VOCAB, sharder)
  modality_1L = jnp.asarray(MODALITY_L)[None]
  targets_1L = jnp.asarray([VOCAB.range(m)[0] for m in MODALITY_L], jnp.int32)[None]
  nll_L = loss_lib.vocab_parallel_nll(jnp.zeros((1, L, VOCAB.size)), targets_1L, modality_1L, allowed_MV,
                                      sharder)[0]
  cfg = corruption.DiffusionConfig(schedules=(name,) * 3, complementary=complementary)
  _, _, sums = jax.device_get(_weighted_terms(jax.random.PRNGKey(3), np.full((L,), vocab_lib.TARGET, np.int32),
                                              nll_L, cfg=cfg, rows=ROWS // 2))
  out = loss_lib.finalize(sums)
  for m, size in zip(vocab_lib.MODALITIES, (VOCAB.text_size, VOCAB.image_size, VOCAB.audio_size)):
    np.testing.assert_allclose(out[f'loss/{m}'], np.log(size), rtol=0.01, err_msg=m)


@pytest.mark.parametrize('name', ['cosine', 'polynomial'])
def test_second_copy_truncation_costs_half_alpha_min(name):
  """The capped second-copy weight loses exactly pair_alpha_min / 2 of the ELBO (corruption.py):
  checked by quadrature of E_t[v(t) alpha(t)] against 1 - alpha_min / 2, with alpha in float64."""
  alpha_min = 0.05  # Large, so the cost is far above the quadrature error.
  sched = schedules.get(name)
  t = (np.arange(200_000) + 0.5) / 200_000
  alpha64 = {'cosine': np.cos(np.pi / 2 * t), 'polynomial': 1 - t**2}[name]
  v = np.asarray(corruption._complement_weight(sched, jnp.asarray(t, jnp.float32), alpha_min), np.float64)
  np.testing.assert_allclose((v * alpha64).mean(), 1 - alpha_min / 2, rtol=1e-3)
