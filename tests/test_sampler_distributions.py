"""Samplers as distributions: ancestral reveal rates, nucleus sets, tempered draws, guided logits.

Every reference is computed independently in float64 numpy (schedules written out by hand, not via
diffusion/schedules.py); every random check has a fixed seed and a tolerance a wrong formula fails.
"""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from tmdm import optim, vocab as vocab_lib
from tmdm.diffusion import corruption, sampling
from tmdm.model import config as model_config, transformer
from tmdm.parallel import sharding
from tmdm.training import state as train_state
from helpers import tiny_config

VOCAB = vocab_lib.VocabSpec(37, 11, 13, multiple=8)
STARTS = np.array([VOCAB.range(m)[0] for m in range(3)])

# Reference alpha(t) = P(clean at t), per schedule name: (name, parameter) -> float64 function.
ALPHA = {
    'linear': lambda t, _: 1.0 - t,
    'cosine': lambda t, _: np.cos(0.5 * np.pi * t),
    'polynomial': lambda t, p: 1.0 - t**p,
    'loglinear': lambda t, eps: 1.0 - (1.0 - eps) * t,
}
# Two configs cover the four schedules. Loglinear's per-step rate equals linear's ((1 - eps) cancels),
# so there it checks the wiring; polynomial with p = 3 and p = 0.5 bends the rate both ways.
CONFIGS = [
    (('linear', 'cosine', 'polynomial'), dict(poly_power=3.0), (None, None, 3.0)),
    (('loglinear', 'polynomial', 'cosine'), dict(poly_power=0.5, loglinear_eps=0.25), (0.25, 0.5, None)),
]


def _ref_alpha(config, modality, t):
  names, _, params = config
  return ALPHA[names[modality]](np.asarray(t, np.float64), params[modality])


def _diff_cfg(config):
  return corruption.DiffusionConfig(schedules=config[0], **config[1])


def _z(k, n, p):
  """Binomial z-score of k successes in n trials at rate p."""
  return (k - n * p) / np.sqrt(n * p * (1 - p))


# ---- 1. Ancestral reveal probability ----------------------------------------------------------------

@pytest.mark.parametrize('config', CONFIGS, ids=['lin-cos-poly3', 'loglin-poly.5-cos'])
def test_ancestral_rule_reveals_at_the_schedule_rate(config):
  """`_ancestral` on 6 (t, s) pairs x 3 modalities x 2003 positions each: the revealed share of each
  cell matches (alpha(s) - alpha(t)) / (1 - alpha(t)) within 5 binomial standard errors."""
  ts, n = np.array([[1.0, 0.9], [1.0, 0.5], [0.8, 0.3], [0.6, 0.55], [0.4, 0.1], [0.2, 0.0]]), 2003
  modality_BL = np.tile(np.repeat(np.arange(3), n), (len(ts), 1)).astype(np.int32)
  st = sampling.Step(i=jnp.int32(0), steps=jnp.int32(1), open_BL=jnp.ones(modality_BL.shape, bool),
                     n0_B=None, conf_BL=None, t_B=jnp.asarray(ts[:, 0], jnp.float32),
                     s_B=jnp.asarray(ts[:, 1], jnp.float32), modality_BL=jnp.asarray(modality_BL),
                     row_modality_B=None, rng=jax.random.PRNGKey(11))
  revealed = np.asarray(sampling._ancestral(st, _diff_cfg(config), None))  # pylint: disable=protected-access
  for m in range(3):
    k = revealed[:, modality_BL[0] == m].sum(axis=1)
    a_t, a_s = _ref_alpha(config, m, ts[:, 0]), _ref_alpha(config, m, ts[:, 1])
    p = (a_s - a_t) / (1 - a_t)  # reference: the reverse process's per-step reveal probability
    exact = (p <= 0) | (p >= 1)
    np.testing.assert_array_equal(k[exact], np.round(p[exact] * n))  # p = 0 or 1: no randomness
    z = _z(k[~exact], n, p[~exact])
    assert np.all(np.abs(z) < 5), (m, k / n, p, z)


class _StepClock:
  """A time-conditioned stand-in model whose greedy prediction at time t = 1 - i / S is id
  range_start(modality) + i: the sampled token records the step that revealed each position."""
  cfg = types.SimpleNamespace(time_conditioning=True)

  def __init__(self, steps):
    self.steps = steps

  def apply(self, variables, tokens_BL, segment_ids_BL, positions_BL, t_B):
    del variables, segment_ids_BL, positions_BL
    i_B = jnp.round((1.0 - t_B) * self.steps).astype(jnp.int32)
    hit_BV = (jnp.arange(VOCAB.size)[None, :, None] == (jnp.asarray(STARTS)[None, None, :] + i_B[:, None, None]))
    return jnp.broadcast_to(30.0 * hit_BV.any(-1)[:, None, :], tokens_BL.shape + (VOCAB.size,))


@pytest.mark.parametrize('config', CONFIGS, ids=['lin-cos-poly3', 'loglin-poly.5-cos'])
def test_ancestral_sampler_reveal_steps_follow_the_schedules(config):
  """Whole `sample` (ancestral, 8 steps, greedy), 4096 positions per modality in one canvas: at each
  step from t = 1 - i/8 to s = t - 1/8 the share of still-masked positions revealed matches
  (alpha(s) - alpha(t)) / (1 - alpha(t)) of the position's own schedule; the last step reveals the rest."""
  steps, B, L = 8, 256, 48
  modality = np.tile(np.arange(L) % 3, (B, 1)).astype(np.int32)
  canvas = {'tokens': np.full((B, L), VOCAB.mask_id, np.int32), 'segment_ids': np.ones((B, L), np.int32),
            'positions': np.tile(np.arange(L, dtype=np.int32), (B, 1)), 'modality': modality,
            'cond': np.zeros((B, L), np.int32)}
  fn = jax.jit(functools.partial(sampling.sample, model=_StepClock(steps), vocab=VOCAB, diff_cfg=_diff_cfg(config),
                                 sharder=sharding.Sharder(None), spec=sampling.SamplerSpec(sampler='ancestral')))
  out, passes = fn({}, canvas, jax.random.PRNGKey(5), sampling.Knobs(steps=steps, temperature=0.0).as_arrays())
  assert int(passes) == steps  # time-conditioned: no reuse, one forward pass per step
  step_of = np.asarray(out) - STARTS[modality]
  assert step_of.min() >= 0 and step_of.max() < steps
  for m in range(3):
    s_m = step_of[modality == m]
    for i in range(steps):
      t, s = 1.0 - i / steps, 1.0 - (i + 1) / steps
      a_t, a_s = _ref_alpha(config, m, t), _ref_alpha(config, m, s)
      p = (a_s - a_t) / (1 - a_t)  # reference
      n, k = int((s_m >= i).sum()), int((s_m == i).sum())
      if i == steps - 1:
        assert k == n  # alpha(0) = 1: p = 1, and the last step reveals whatever is left anyway
      else:
        assert abs(_z(k, n, p)) < 5, (m, i, k / n, p)


# ---- 2. Nucleus (top-p) filter ----------------------------------------------------------------------

def _ref_nucleus(logits_V, p):
  """The smallest set of ids, taken in descending probability, whose mass reaches p (float64)."""
  probs = special.softmax(np.asarray(logits_V, np.float64))
  order = np.argsort(-probs)
  k = int(np.searchsorted(np.cumsum(probs[order]), p)) + 1  # first prefix with cum >= p
  keep = np.zeros(len(logits_V), bool)
  keep[order[:min(k, len(logits_V))]] = True
  return keep, np.cumsum(probs[order])


def test_top_p_filter_keeps_the_smallest_set_reaching_p():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 2, (23, 37)).astype(np.float32)
  for p in (0.3, 0.5, 0.9, 0.99):  # one p for all rows at once, [R, 1, V]
    got = np.asarray(sampling.top_p_filter(jnp.asarray(logits[:, None]), p))[:, 0]
    for r in range(len(logits)):
      keep, _ = _ref_nucleus(logits[r], p)
      np.testing.assert_array_equal(np.isfinite(got[r]), keep, err_msg=f'row {r} p {p}')
      np.testing.assert_array_equal(got[r][keep], logits[r][keep])  # kept logits untouched
  for r in range(5):  # edge cases around each row's own cumulative boundaries
    _, cum = _ref_nucleus(logits[r], 1.0)
    order = np.argsort(-logits[r])
    cases = [(cum[0] * 0.5, 1)]  # p below the top probability: the argmax alone
    for k in (1, 2, 5):
      cases += [(cum[k - 1] - 1e-4, k), (cum[k - 1] + 1e-4, k + 1)]  # just below / just above a boundary
    for p, size in cases:
      got = np.isfinite(np.asarray(sampling.top_p_filter(jnp.asarray(logits[r][None, None]), float(p)))[0, 0])
      np.testing.assert_array_equal(np.flatnonzero(got), np.sort(order[:size]), err_msg=f'row {r} p {p}')
  np.testing.assert_array_equal(np.asarray(sampling.top_p_filter(jnp.asarray(logits), 1.0)), logits)  # p = 1: all


# ---- 3. Temperature -------------------------------------------------------------------------------

LOGITS7 = np.array([1.3, 0.4, -0.2, 0.9, -1.5, 0.0, -0.7])


def _chi2_pvalue(counts, probs):
  expected = counts.sum() * probs
  return stats.chi2.sf(np.sum((counts - expected)**2 / expected), len(probs) - 1)


@functools.lru_cache(maxsize=None)
def _jit_draw(top_p):
  return jax.jit(lambda rng, logits, temp: sampling.draw(rng, logits, temp, top_p))


@pytest.mark.parametrize('temp,top_p', [(0.5, 1.0), (1.0, 1.0), (2.0, 1.0), (2.0, 0.8)])
def test_draw_matches_the_tempered_categorical(temp, top_p):
  """20000 draws from one categorical over 7 ids: chi-square p-value > 1e-4 against softmax(logits / T)
  (restricted to its nucleus and renormalized when top_p < 1), and < 1e-4 against the untempered T = 1
  distribution (or the unfiltered one), so the test can fail; log-probabilities are exact."""
  logits = jnp.asarray(np.broadcast_to(LOGITS7, (125, 160, 7)), jnp.float32)
  seed = int(temp * 10) + int(top_p * 100)
  tokens, logp = _jit_draw(top_p)(jax.random.PRNGKey(seed), logits, jnp.float32(temp))
  tokens, logp = np.asarray(tokens).ravel(), np.asarray(logp).ravel()
  ref = special.softmax(LOGITS7 / temp)  # reference: the tempered distribution, float64
  keep, _ = _ref_nucleus(LOGITS7 / temp, top_p)
  ref = np.where(keep, ref, 0.0) / ref[keep].sum()
  counts = np.bincount(tokens, minlength=7)
  assert counts[~keep].sum() == 0  # nothing outside the nucleus
  assert _chi2_pvalue(counts[keep], ref[keep]) > 1e-4, (counts / counts.sum(), ref)
  wrong = special.softmax(LOGITS7) if temp != 1.0 else special.softmax(LOGITS7 / 0.8)  # T = 1 (or T = 0.8) instead
  assert _chi2_pvalue(counts, wrong) < 1e-4
  np.testing.assert_allclose(logp, np.log(ref[tokens]), rtol=0, atol=2e-5)  # log of the drawn id's mass


def test_temperature_zero_is_argmax():
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 1, (29, 31, 7)).astype(np.float32)
  tokens, logp = _jit_draw(1.0)(jax.random.PRNGKey(0), jnp.asarray(logits), jnp.float32(0.0))
  np.testing.assert_array_equal(np.asarray(tokens), logits.argmax(-1))
  # Confidence of a greedy draw: log softmax of the untempered logits at the argmax (float64 reference).
  ref = special.log_softmax(logits.astype(np.float64), axis=-1).max(-1)
  np.testing.assert_allclose(np.asarray(logp), ref, rtol=0, atol=2e-5)


# ---- 4. Classifier-free guidance, end to end --------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _model():
  cfg = tiny_config()
  sharder = sharding.Sharder(sharding.make_mesh((1, 1, 1)))
  mcfg = model_config.ModelConfig.from_config(cfg.model, VOCAB.size)
  model = transformer.Transformer(mcfg, sharder)
  params = train_state.create(model, optim.build(cfg.optim, 10, mcfg.group_multipliers()), sharder, 13, 0).params
  forward = jax.jit(lambda params, x, seg, pos: model.apply({'params': params}, x, seg, pos, jnp.ones(x.shape[:1])))
  return model, params, sharder, corruption.DiffusionConfig.from_config(cfg.diffusion), forward


def _guidance_canvas():
  """8 rows of 13: <txt>, a 3-token text prompt (the condition), then text or (rows 4..7, from column 7)
  image positions to fill."""
  rng = np.random.default_rng(3)
  tokens = np.full((8, 13), VOCAB.mask_id, np.int32)
  tokens[:, 0] = VOCAB.id('<txt>')
  tokens[:, 1:4] = rng.integers(*VOCAB.range(vocab_lib.TEXT), (8, 3))
  modality = np.zeros_like(tokens)
  modality[4:, 7:] = vocab_lib.IMAGE
  cond = np.zeros_like(tokens)
  cond[:, 1:4] = 1
  return {'tokens': tokens, 'segment_ids': np.ones_like(tokens), 'positions': np.tile(np.arange(13), (8, 1)),
          'modality': modality, 'cond': cond}


@functools.lru_cache(maxsize=None)
def _guided_sampler(guidance_schedule):
  model, _, sharder, diff, _ = _model()
  return sampling.jit_sampler(model=model, vocab=VOCAB, diff_cfg=diff, sharder=sharder,
                              spec=sampling.SamplerSpec(guided=True, guidance_schedule=guidance_schedule))


@pytest.mark.parametrize('schedule,w,w_eff', [('constant', 1.5, 1.5), ('constant', 3.0, 3.0),
                                              ('decreasing', 1.5, 3.0)])
def test_one_greedy_guided_step_is_the_argmax_of_hand_guided_logits(schedule, w, w_eff):
  """steps = 1, T = 0: every masked position becomes argmax over its modality of (1 + w) cond - w uncond,
  cond = the model on the canvas, uncond = the model on the canvas with the condition set to [MASK];
  the one step runs at t = 1, where the 'decreasing' shape 2t doubles w."""
  _, params, _, _, forward = _model()
  canvas = _guidance_canvas()
  seg, pos = canvas['segment_ids'], canvas['positions']
  cond = np.asarray(forward(params, canvas['tokens'], seg, pos), np.float64)
  uncond_tokens = np.where(canvas['cond'] == 1, VOCAB.mask_id, canvas['tokens'])
  uncond = np.asarray(forward(params, uncond_tokens, seg, pos), np.float64)
  ids, m = np.arange(VOCAB.size), canvas['modality'][..., None]
  outside = (ids < STARTS[m]) | (ids >= STARTS[m] + np.array([37, 11, 13])[m])  # other modalities' ids
  guided = np.where(outside, -np.inf, (1 + w_eff) * cond - w_eff * uncond)  # reference, float64
  plain = np.where(outside, -np.inf, cond)
  out, passes = _guided_sampler(schedule)(params, canvas, jax.random.PRNGKey(0),
                                          sampling.Knobs(steps=1, temperature=0.0, guidance=w).as_arrays())
  out = np.asarray(out)
  assert int(passes) == 2
  free = canvas['tokens'] == VOCAB.mask_id
  top2 = np.sort(guided[free], axis=-1)[:, -2:]
  assert np.min(top2[:, 1] - top2[:, 0]) > 1e-4  # no near-ties: float noise cannot flip an argmax
  np.testing.assert_array_equal(out[free], guided.argmax(-1)[free])
  np.testing.assert_array_equal(out[~free], canvas['tokens'][~free])
  assert (guided.argmax(-1)[free] != plain.argmax(-1)[free]).sum() >= 3  # guidance changed the answer
