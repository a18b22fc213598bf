"""Samplers: complete, in range, given tokens kept, seeded, guidance w = 0 exact, mesh-independent."""

import dataclasses
import functools
import types

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

VOCAB = vocab_lib.VocabSpec(37, 11, 13, multiple=8)
S = sampling.SamplerSpec


@functools.lru_cache(maxsize=None)
def _model(mesh_shape):
  cfg = tiny_config()
  sharder = sharding.Sharder(sharding.make_mesh(mesh_shape))
  mcfg = model_config.ModelConfig.from_config(cfg.model, VOCAB.size)
  model = transformer.Transformer(mcfg, sharder)
  params = train_state.create(model, optim.build(cfg.optim, 10, mcfg.group_multipliers()), sharder, 13, 0).params
  return model, params, sharder, corruption.DiffusionConfig.from_config(cfg.diffusion)


@functools.lru_cache(maxsize=None)
def _compiled(mesh_shape, spec_):
  model, _, sharder, diff = _model(mesh_shape)
  return sampling.jit_sampler(model=model, vocab=VOCAB, diff_cfg=diff, sharder=sharder, spec=spec_)


def _sample(mesh_shape, spec_, knobs, canvas, seed=0):
  _, params, sharder, _ = _model(mesh_shape)
  batch = {k: jax.device_put(v, sharder.batch()) for k, v in canvas.items()}
  out, passes = _compiled(mesh_shape, spec_)(params, batch, jax.random.PRNGKey(seed), knobs)
  return np.asarray(jax.device_get(out)), float(passes)


def _canvas():
  """8 rows of 13: a 2-token text prompt, then text or (rows 4..7) image positions to fill; the
  prompt is the condition that guidance masks."""
  tokens = np.full((8, 13), VOCAB.mask_id, np.int32)
  tokens[:, 0] = VOCAB.id('<txt>')
  tokens[:, 1:3] = VOCAB.text_start + np.arange(8)[:, None] % 5 + np.array([4, 9])
  modality = np.zeros_like(tokens)
  modality[4:, 6:] = vocab_lib.IMAGE
  cond = np.zeros_like(tokens)
  cond[:, 1:3] = 1
  return {'tokens': tokens, 'segment_ids': np.ones_like(tokens), 'positions': np.tile(np.arange(13), (8, 1)),
          'modality': modality, 'cond': cond}


SPECS = {
    'ancestral': S(sampler='ancestral', top_p=0.9),
    'confidence': S(sampler='confidence', schedule='cosine'),
    'threshold': S(sampler='threshold'),
    'guided_blocks': S(sampler='confidence', schedule='noise', block_len=5, guided=True,
                       guidance_schedule='increasing'),
}


@pytest.mark.parametrize('name', sorted(SPECS))
def test_samplers_fill_every_mask_in_range_and_keep_given_tokens(name):
  canvas = _canvas()
  out, passes = _sample((1, 1, 1), SPECS[name], sampling.Knobs(steps=6, guidance=1.5, threshold=0.5), canvas)
  assert not (out == VOCAB.mask_id).any()
  given = canvas['tokens'] != VOCAB.mask_id
  np.testing.assert_array_equal(out[given], canvas['tokens'][given])
  np.testing.assert_array_equal(VOCAB.modality_of(out[~given]), canvas['modality'][~given])
  assert 1 <= passes <= 6 * (3 if name == 'guided_blocks' else 1) * (2 if name == 'guided_blocks' else 1)


def test_fixed_seed_gives_identical_samples_and_seeds_differ():
  canvas, knobs = _canvas(), sampling.Knobs(steps=6)
  a, _ = _sample((1, 1, 1), SPECS['confidence'], knobs, canvas, seed=3)
  np.testing.assert_array_equal(a, _sample((1, 1, 1), SPECS['confidence'], knobs, canvas, seed=3)[0])
  assert (a != _sample((1, 1, 1), SPECS['confidence'], knobs, canvas, seed=4)[0]).any()


def test_guidance_weight_zero_equals_the_unguided_sampler():
  canvas = _canvas()
  plain = dataclasses.replace(SPECS['guided_blocks'], guided=False)
  a, pa = _sample((1, 1, 1), plain, sampling.Knobs(steps=6, guidance=0.0), canvas, seed=1)
  b, pb = _sample((1, 1, 1), SPECS['guided_blocks'], sampling.Knobs(steps=6, guidance=0.0), canvas, seed=1)
  np.testing.assert_array_equal(a, b)
  assert pb == 2 * pa  # the guided sampler did run its unconditional branch
  c, _ = _sample((1, 1, 1), SPECS['guided_blocks'], sampling.Knobs(steps=6, guidance=3.0), canvas, seed=1)
  assert (a != c).any()


@pytest.mark.parametrize('name', ['ancestral', 'guided_blocks'])
def test_samplers_on_the_8_device_mesh_match_one_device(name):
  canvas, knobs = _canvas(), sampling.Knobs(steps=6, guidance=1.0)
  np.testing.assert_array_equal(_sample((1, 1, 1), SPECS[name], knobs, canvas, seed=2)[0],
                                _sample((2, 2, 2), SPECS[name], knobs, canvas, seed=2)[0])


def test_reuse_skips_forward_passes_when_nothing_was_revealed():
  canvas = _canvas()
  out, passes = _sample((1, 1, 1), SPECS['ancestral'], sampling.Knobs(steps=200), canvas)
  assert not (out == VOCAB.mask_id).any()
  # A pass follows only a step that revealed something: never more passes than tokens to fill.
  assert passes <= int((canvas['tokens'] == VOCAB.mask_id).sum()) < 200


class _Adversary:
  """A stand-in model whose logits strongly prefer ids no position may take ([MASK], [PAD], the
  other modalities, the vocabulary padding)."""
  cfg = types.SimpleNamespace(time_conditioning=False)

  def apply(self, variables, tokens_BL, segment_ids_BL, positions_BL, t_B):
    del variables, segment_ids_BL, positions_BL, t_B
    ids_V = jnp.arange(VOCAB.size)
    bad_V = (ids_V < VOCAB.text_start) | (ids_V >= VOCAB.used) | (ids_V % 2 == 0)
    return jnp.broadcast_to(jnp.where(bad_V, 50.0, 0.0), tokens_BL.shape + (VOCAB.size,))


@pytest.mark.parametrize('name', ['ancestral', 'threshold'])
def test_out_of_range_tokens_are_impossible(name):
  canvas = _canvas()
  diff = corruption.DiffusionConfig()
  fn = jax.jit(functools.partial(sampling.sample, model=_Adversary(), vocab=VOCAB, diff_cfg=diff,
                                 sharder=sharding.Sharder(None), spec=dataclasses.replace(SPECS[name], top_p=0.5)))
  out, _ = fn({}, canvas, jax.random.PRNGKey(0), sampling.Knobs(steps=4, temperature=30.0))
  out = np.asarray(out)
  free = canvas['tokens'] == VOCAB.mask_id
  np.testing.assert_array_equal(VOCAB.modality_of(out[free]), canvas['modality'][free])


def test_count_schedules_start_full_and_end_empty():
  sched = corruption.DiffusionConfig().schedule(vocab_lib.TEXT)
  for fn in sampling.COUNT_SCHEDULES.values():
    assert abs(float(fn(jnp.float32(0.0), sched)) - 1) < 1e-6 and abs(float(fn(jnp.float32(1.0), sched))) < 1e-6
  for fn in sampling.GUIDANCE_SCHEDULES.values():  # each averages to 1 over t
    assert abs(float(jnp.mean(fn(jnp.linspace(0, 1, 1001)))) - 1) < 1e-3
