import functools

import jax
import numpy as np

from tmdm import optim, sharding, train_state
from tmdm.diffusion import corruption, sampling
from tmdm.model import config as model_config, transformer
from tmdm.modalities import spec
from helpers import tiny_config


def _sample(mesh_shape, canvas, seed=0):
  cfg = tiny_config()
  vocab = spec.VocabSpec.from_config(cfg.vocab)
  sharder = sharding.Sharder(sharding.make_mesh(mesh_shape))
  mcfg = model_config.ModelConfig.from_config(cfg.model, vocab.size)
  model = transformer.Transformer(mcfg, sharder)
  params = train_state.create(model, optim.build(cfg.optim, 10, mcfg.group_multipliers()), sharder, 13, 0).params
  fn = jax.jit(functools.partial(sampling.ancestral, model=model, vocab=vocab, sharder=sharder, steps=6,
                                 diff_cfg=corruption.DiffusionConfig.from_config(cfg.diffusion), top_p=0.9))
  put = lambda x: jax.device_put(x, sharder.batch())
  out = fn(params, put(canvas['tokens']), put(canvas['segment_ids']), put(canvas['positions']),
           put(canvas['modality']), jax.random.PRNGKey(seed))
  return np.asarray(jax.device_get(out)), vocab


def _canvas():
  vocab = spec.VocabSpec(37, 11, 13, multiple=8)
  tokens = np.full((8, 13), vocab.mask_id, np.int32)
  tokens[:, 0] = vocab.id('<txt>')
  tokens[:, 1:3] = vocab.text_start + 4  # a given prompt
  modality = np.zeros_like(tokens)
  modality[4:, 6:] = spec.IMAGE  # second half of some rows: image positions
  return {'tokens': tokens, 'segment_ids': np.ones_like(tokens), 'positions': np.tile(np.arange(13), (8, 1)),
          'modality': modality}


def test_sampler_fills_masks_within_modality_and_keeps_given_tokens():
  canvas = _canvas()
  out, vocab = _sample((1, 1, 1), canvas)
  assert not (out == vocab.mask_id).any()
  given = canvas['tokens'] != vocab.mask_id
  np.testing.assert_array_equal(out[given], canvas['tokens'][given])
  np.testing.assert_array_equal(vocab.modality_of(out[~given]), canvas['modality'][~given])


def test_sampler_is_seeded_and_mesh_independent():
  canvas = _canvas()
  one, _ = _sample((1, 1, 1), canvas, seed=1)
  np.testing.assert_array_equal(one, _sample((1, 1, 1), canvas, seed=1)[0])
  np.testing.assert_array_equal(one, _sample((2, 2, 2), canvas, seed=1)[0])
