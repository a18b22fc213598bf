import jax
import jax.numpy as jnp
import numpy as np

from tmdm import optim, vocab as vocab_lib
from tmdm.model import config as model_config, transformer
from tmdm.parallel import sharding
from tmdm.training import state as train_state
from helpers import random_batch, tiny_config


def _model(**overrides):
  cfg = tiny_config(**overrides)
  vocab = vocab_lib.VocabSpec.from_config(cfg.vocab)
  mcfg = model_config.ModelConfig.from_config(cfg.model, vocab.size)
  sharder = sharding.Sharder(sharding.make_mesh((2, 2, 2)))
  model = transformer.Transformer(mcfg, sharder)
  tx = optim.build(cfg.optim, 10, mcfg.group_multipliers())
  params = train_state.create(model, tx, sharder, 13, seed=0).params
  return model, params, vocab, sharder


def test_packed_documents_do_not_attend_to_each_other():
  model, params, vocab, sharder = _model()
  b = random_batch(vocab, 8, 13, seed=0)
  b['segment_ids'][:, :6], b['segment_ids'][:, 6:] = 1, 2
  b['positions'][:, 6:] = np.arange(7)
  apply = jax.jit(lambda p, x: model.apply({'params': p}, x, b['segment_ids'], b['positions']))
  base = apply(params, b['tokens'])
  changed = b['tokens'].copy()
  changed[:, 6:] = vocab.text_start + (changed[:, 6:] - vocab.text_start + 5) % vocab.text_size
  out = apply(params, changed)
  np.testing.assert_allclose(out[:, :6], base[:, :6], atol=1e-6)  # Document 1 is unaffected ...
  assert np.abs(out[:, 6:] - base[:, 6:]).max() > 1e-4  # ... document 2 sees its own change.


def test_restrict_keeps_each_modality_in_range():
  vocab = vocab_lib.VocabSpec(37, 11, 13, multiple=8)
  logits = jnp.zeros((1, 3, vocab.size))
  out = vocab_lib.restrict(logits, jnp.array([[0, 1, 2]]), jnp.asarray(vocab.allowed_table()))
  for m in range(3):
    lo, hi = vocab.range(m)
    finite = np.flatnonzero(np.isfinite(out[0, m]))
    assert finite.min() == lo and finite.max() == hi - 1 and len(finite) == hi - lo


def test_vocab_layout_is_contiguous_and_padded():
  vocab = vocab_lib.VocabSpec(4000, 1000, 1000, multiple=128)
  assert vocab.text_start == 16 and vocab.image_start == 4016 and vocab.audio_start == 5016
  assert vocab.size == 6016 + (-6016 % 128) and vocab.size % 128 == 0
  assert vocab.id('[MASK]') == vocab.mask_id == 1 and vocab.pad_id == 0
  ids = np.array([0, 16, 4015, 4016, 5016, 6015])
  np.testing.assert_array_equal(vocab.modality_of(ids), [-1, 0, 0, 1, 2, 2])


def test_completep_multipliers():
  base = model_config.ModelConfig(vocab_size=128, d_model=256, n_layers=4, base_width=256, base_depth=4)
  wide = model_config.ModelConfig(vocab_size=128, d_model=1024, n_layers=16, base_width=256, base_depth=4)
  m = wide.group_multipliers()
  assert m['hidden']['lr'] == 0.25 and m['hidden']['eps'] == 0.25 / 4 and m['hidden']['wd'] == 4
  assert m['norm'] == {'lr': 1.0, 'eps': 0.25, 'wd': 0.0} and m['embed'] == m['unembed'] == {'lr': 1, 'eps': 1, 'wd': 1}
  assert wide.residual_mult == 0.25 and wide.output_mult == 0.25 and wide.attn_scale == 1 / 64
  assert base.group_multipliers()['hidden'] == {'lr': 1.0, 'eps': 1.0, 'wd': 1.0}
  std = model_config.ModelConfig(vocab_size=128, parameterization='standard')
  assert std.group_multipliers()['hidden'] == {'lr': 1.0, 'eps': 1.0, 'wd': 1.0} and std.residual_mult == 1


def test_param_groups_and_flops():
  model, params, vocab, _ = _model()
  groups = model_config.param_groups(params)
  assert groups['embed'] == 'embed' and groups['unembed'] == 'unembed'
  assert groups['blocks']['block']['attn']['wq'] == 'hidden' and groups['final_norm']['scale'] == 'norm'
  cfg = model.cfg
  n = sum(x.size for x in jax.tree.leaves(params))
  assert n == cfg.num_params
  assert cfg.flops_per_token(13) == 6 * cfg.matmul_params + 12 * cfg.n_layers * 13 * cfg.n_heads * cfg.d_head
