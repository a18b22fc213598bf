"""Fast sampling: the cached step against the full forward pass, the cached sampler refreshed every
step against the uncached one, the entropy rule against hand-computed sets, and the compiled cost of a
cached step against the active window."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmdm import optim, vocab as vocab_lib
from tmdm.diffusion import corruption, sampling
from tmdm.model import config as model_config, transformer
from tmdm.parallel import sharding
from tmdm.training import state as train_state
from helpers import tiny_config
from test_sampling import SPECS, VOCAB, _canvas, _sample

S = sampling.SamplerSpec


@functools.lru_cache(maxsize=None)
def _net(mesh_shape=(1, 1, 1), length=13, **model_overrides):
  cfg = tiny_config()
  cfg.model.update(**model_overrides)
  sharder = sharding.Sharder(sharding.make_mesh(mesh_shape))
  mcfg = model_config.ModelConfig.from_config(cfg.model, VOCAB.size)
  model = transformer.Transformer(mcfg, sharder)
  params = train_state.create(model, optim.build(cfg.optim, 10, mcfg.group_multipliers()), sharder, length, 0).params
  return model, params, sharder


def _packed(rows=4, length=13, seed=0):
  """Two documents per row (segments 1, 2; the last positions padding), random text ids."""
  rng = np.random.default_rng(seed)
  tokens = VOCAB.text_start + rng.integers(0, VOCAB.text_size, (rows, length)).astype(np.int32)
  seg = np.ones((rows, length), np.int32)
  seg[:, 6:] = 2
  seg[:, 11:] = 0
  pos = np.where(seg == 2, np.arange(length) - 6, np.arange(length)).astype(np.int32)
  return tokens, seg, pos


def _cached_logits(model, params, tokens, seg, pos, slots, cache_tokens):
  """A cached step on `tokens` at `slots` with the cache of a full pass over `cache_tokens`."""
  _, kv = model.apply({'params': params}, cache_tokens, seg, pos, return_kv=True)
  take = lambda x: jnp.take_along_axis(x, jnp.minimum(slots, x.shape[1] - 1), axis=1)
  cache = transformer.KVCache(*kv, seg, slots)
  return model.apply({'params': params}, take(tokens), take(seg), take(pos), cache=cache)


@pytest.mark.parametrize('mesh,scan', [((1, 1, 1), False), ((2, 2, 2), True)])
def test_cached_step_equals_the_full_pass_at_its_positions(mesh, scan):
  """Every layer's cache plumbed (scanned and unrolled, sharded): with a cache of the same canvas,
  the W positions' logits are the full pass's there; slot L (padding) is ignored."""
  model, params, _ = _net(mesh, scan_layers=scan)
  tokens, seg, pos = _packed()
  slots = np.array([[0, 3, 7, 13], [2, 6, 12, 13], [1, 4, 9, 10], [5, 8, 11, 13]], np.int32)
  full = np.asarray(model.apply({'params': params}, tokens, seg, pos))
  got = np.asarray(_cached_logits(model, params, tokens, seg, pos, slots, tokens))
  for r in range(len(slots)):
    for w, p in enumerate(slots[r]):
      if p < 13:
        np.testing.assert_allclose(got[r, w], full[r, p], rtol=2e-5, atol=2e-5)


def test_cached_step_uses_its_own_fresh_keys_and_the_cached_ones_of_others():
  """One layer, so the other positions' keys depend on their own tokens only: a cache built while the
  slots held other tokens must still give the full pass of the new canvas exactly (a step that took
  the slots' keys from the cache, or ignored the cache, would not)."""
  model, params, _ = _net(n_layers=1)
  tokens, seg, pos = _packed(seed=1)
  slots = np.array([[1, 2, 8, 13]] * 4, np.int32)
  stale = tokens.copy()
  stale[:, [1, 2, 8]] = VOCAB.mask_id
  full = np.asarray(model.apply({'params': params}, tokens, seg, pos))
  got = np.asarray(_cached_logits(model, params, tokens, seg, pos, slots, stale))
  np.testing.assert_allclose(got[:, :3], full[:, [1, 2, 8]], rtol=2e-5, atol=2e-5)
  # The reference is not blind: the full pass over the stale canvas differs there.
  stale_full = np.asarray(model.apply({'params': params}, stale, seg, pos))
  assert np.abs(stale_full[:, [1, 2, 8]] - full[:, [1, 2, 8]]).max() > 1e-3


CACHED = {name: dataclasses.replace(SPECS[name], cache=True) for name in SPECS}
CACHED['entropy'] = S(sampler='entropy', cache=True, block_len=5)


@pytest.mark.parametrize('name', sorted(CACHED))
def test_cache_refreshed_every_step_is_the_uncached_sampler(name):
  """Guided and not, blocks and not, every reveal rule, on the 8-device mesh: same tokens and passes."""
  canvas = _canvas()
  spec_ = sampling.fit_window(CACHED[name], canvas['tokens'], VOCAB.mask_id, multiple=1)
  assert spec_.window == (5 if spec_.block_len else 10)
  knobs = sampling.Knobs(steps=6, guidance=2.0 if spec_.guided else 0.0, threshold=0.5, entropy_budget=0.5)
  plain, p_plain = _sample((2, 2, 2), dataclasses.replace(spec_, cache=False, window=0), knobs, canvas, seed=5)
  every, p_every = _sample((2, 2, 2), spec_, knobs._replace(refresh=1), canvas, seed=5)
  np.testing.assert_array_equal(every, plain)
  assert p_every == p_plain
  cached, p_cached = _sample((2, 2, 2), spec_, knobs, canvas, seed=5)  # refresh at block starts only
  assert not (cached == VOCAB.mask_id).any()
  assert p_cached < p_plain  # cached steps count W / L of a pass


def test_cached_sampler_on_the_8_device_mesh_matches_one_device():
  """The cached steps (refreshed at block starts only), guided, with blocks: sharded like the model."""
  canvas = _canvas()
  spec_ = sampling.fit_window(CACHED['guided_blocks'], canvas['tokens'], VOCAB.mask_id, multiple=1)
  knobs = sampling.Knobs(steps=6, guidance=2.0)
  one, p_one = _sample((1, 1, 1), spec_, knobs, canvas, seed=5)
  eight, p_eight = _sample((2, 2, 2), spec_, knobs, canvas, seed=5)
  np.testing.assert_array_equal(one, eight)
  assert p_one == p_eight


def test_cached_sampler_with_splash_attention_matches_dense():
  """The full passes through the splash kernel (interpret mode), the cached steps through XLA."""
  canvas = _canvas()
  spec_ = sampling.fit_window(S(sampler='confidence', cache=True, guided=True), canvas['tokens'], VOCAB.mask_id)
  knobs = sampling.Knobs(steps=4, guidance=1.0).as_arrays()
  outs = []
  for impl in ('xla', 'splash'):
    model, params, sharder = _net(attention_impl=impl)
    fn = sampling.jit_sampler(model=model, vocab=VOCAB, diff_cfg=corruption.DiffusionConfig(), sharder=sharder,
                              spec=spec_)
    outs.append(np.asarray(fn(params, canvas, jax.random.PRNGKey(0), knobs)[0]))
  np.testing.assert_array_equal(outs[0], outs[1])


def _step(entropy, open_=None, budget=0.4):
  entropy = jnp.asarray([entropy], jnp.float32)
  open_ = jnp.ones_like(entropy, bool) if open_ is None else jnp.asarray([open_])
  st = sampling.Step(i=jnp.int32(0), steps=jnp.int32(4), open_BL=open_, n0_B=jnp.sum(open_, -1),
                     conf_BL=jnp.zeros_like(entropy), entropy_BL=entropy, t_B=jnp.ones(1), s_B=jnp.ones(1),
                     modality_BL=jnp.zeros(entropy.shape, jnp.int32), row_modality_B=jnp.zeros(1, jnp.int32),
                     rng=jax.random.PRNGKey(0))
  return np.asarray(sampling.SAMPLERS['entropy'](st, None, sampling.Knobs(entropy_budget=budget)))[0].tolist()


def test_entropy_rule_reveals_the_set_its_definition_gives():
  # Lowest entropy first: 0.05 (pos 4), 0.1 (0), 0.2 (2), 0.5 (1), 2.0 (3); entropy ranked ahead of each:
  # 0, 0.05, 0.15, 0.35, 0.85.
  h = [0.1, 0.5, 0.2, 2.0, 0.05]
  assert _step(h, budget=0.4) == [True, True, True, False, True]
  assert _step(h, budget=0.1) == [True, False, False, False, True]
  assert _step(h, budget=0.0) == [False, False, False, False, True]  # always at least one
  assert _step(h, budget=10.0) == [True] * 5
  # Closed positions neither count nor get revealed.
  assert _step(h, open_=[True, True, True, True, False], budget=0.2) == [True, False, True, False, False]


def test_entropy_of_restricted_logits():
  logits = jnp.asarray([[[0.0, 0.0, -jnp.inf, -jnp.inf], [5.0, -jnp.inf, -jnp.inf, -jnp.inf],
                         [0.0, 0.0, 0.0, 0.0]]])
  np.testing.assert_allclose(np.asarray(sampling.entropy(logits))[0], [np.log(2), 0.0, np.log(4)], rtol=1e-6)


def test_fit_window_takes_the_fullest_block():
  tokens = np.zeros((2, 20), np.int32)
  tokens[0, 2:9] = 1  # 7 masked (mask id 1)
  tokens[1, 10:13] = 1
  assert sampling.fit_window(S(cache=True), tokens, 1, multiple=1).window == 7
  assert sampling.fit_window(S(cache=True), tokens, 1).window == 8
  # Blocks of 5: row 0 holds 3 (positions 2-4) and 4 (5-8), row 1 holds 3 (10-12).
  assert sampling.fit_window(S(cache=True, block_len=5), tokens, 1, multiple=1).window == 4
  # Blocks of 6: row 0 holds 4 (2-5) and 3 (6-8), row 1 holds 2 (10-11) and 1 (12).
  assert sampling.fit_window(S(cache=True, block_len=6), tokens, 1, multiple=1).window == 4
  assert sampling.fit_window(S(cache=True, block_len=6), tokens, 1).window == 6  # rounded up, capped at the block
  assert sampling.fit_window(S(), tokens, 1).window == 0


def test_cached_step_flops_scale_with_the_window_not_the_canvas():
  """From XLA's compiled cost: a cached step over W of L = 128 positions costs about W / L of a full
  pass (the W x L attention scores are the only term that sees L)."""
  length = 128
  model, params, _ = _net(length=length)
  tokens = VOCAB.text_start + np.zeros((2, length), np.int32)
  seg, pos = np.ones_like(tokens), np.tile(np.arange(length, dtype=np.int32), (2, 1))

  def flops(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)['flops']

  full = flops(lambda p, t: model.apply({'params': p}, t, seg, pos), params, tokens)
  kv = model.apply({'params': params}, tokens, seg, pos, return_kv=True)[1]
  cached = {}
  for w in (8, 16, 32):
    slots = np.tile(np.arange(w, dtype=np.int32), (2, 1))
    cache = transformer.KVCache(*kv, seg, slots)
    cached[w] = flops(lambda p, t, c: model.apply({'params': p}, t, seg[:, :w], pos[:, :w], cache=c), params,
                      tokens[:, :w], cache)
  for w in (8, 16, 32):
    assert cached[w] < 1.5 * full * w / length, (w, cached[w], full)
  assert 1.7 < cached[16] / cached[8] < 2.3 and 1.7 < cached[32] / cached[16] < 2.3, cached
