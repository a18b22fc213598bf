"""Sharded == one device: loss and every gradient of one train step, on several mesh shapes.

Computed in float32 with 'highest' matmul precision so that only the partitioning differs. This is
also the guard against the XLA CPU partitioner bug described in BUILD_NOTES.md."""

import functools

import jax
import numpy as np
import pytest

from tmdm import optim, vocab as vocab_lib
from tmdm.diffusion import corruption
from tmdm.model import config as model_config, transformer
from tmdm.parallel import mesh as mesh_lib, sharding
from tmdm.training import state as train_state, step as train_step
from helpers import random_batch, tiny_config

MESHES = [(1, 8, 1), (2, 2, 2), (2, 1, 4), (8, 1, 1)]


def _grads(mesh_shape, microbatches=1, complementary=False, loss_chunk=0):
  cfg = tiny_config(loss_chunk=loss_chunk)
  cfg.diffusion.complementary = complementary
  vocab = vocab_lib.VocabSpec.from_config(cfg.vocab)
  sharder = sharding.Sharder(sharding.make_mesh(mesh_shape))
  mcfg = model_config.ModelConfig.from_config(cfg.model, vocab.size)
  model = transformer.Transformer(mcfg, sharder)
  tx = optim.build(cfg.optim, 10, mcfg.group_multipliers())
  state = train_state.create(model, tx, sharder, cfg.data.seq_len, seed=0)
  rows = 16 if not complementary else 8
  batch = random_batch(vocab, rows, cfg.data.seq_len, seed=3, modalities=(vocab_lib.TEXT, vocab_lib.IMAGE, vocab_lib.AUDIO))
  batch = {k: jax.device_put(v, sharder.batch()) for k, v in batch.items()}
  fn = jax.jit(functools.partial(train_step.grads_and_sums, model=model, vocab=vocab, sharder=sharder,
                                 diff_cfg=corruption.DiffusionConfig.from_config(cfg.diffusion),
                                 microbatches=microbatches))
  with jax.default_matmul_precision('highest'):
    grads, sums = fn(state.params, batch, jax.random.PRNGKey(7))
  return jax.device_get(grads), jax.device_get(sums)


@functools.lru_cache(maxsize=None)
def _reference(complementary=False):
  return _grads((1, 1, 1), complementary=complementary)


def _assert_match(got, ref):
  (g, s), (g_ref, s_ref) = got, ref
  np.testing.assert_allclose(s['elbo_sum'], s_ref['elbo_sum'], rtol=1e-5)
  flat, _ = jax.tree_util.tree_flatten_with_path(g)
  flat_ref = jax.tree.leaves(g_ref)
  assert len(flat) == len(flat_ref) > 10
  for (path, a), b in zip(flat, flat_ref):
    err = np.abs(a - b).max() / np.abs(b).max()
    assert err < 1e-5, f'{jax.tree_util.keystr(path)}: relative error {err:.2e}'


@pytest.mark.parametrize('mesh_shape', MESHES)
def test_sharded_grads_match_one_device(mesh_shape):
  _assert_match(_grads(mesh_shape), _reference())


@pytest.mark.parametrize('mesh_shape,chunk', [((1, 1, 1), 13), ((2, 2, 2), 5)])
def test_chunked_cross_entropy_matches_whole_rows(mesh_shape, chunk):
  """model.loss_chunk: the same loss and gradients, whether or not the chunk divides the row (13)."""
  _assert_match(_grads(mesh_shape, loss_chunk=chunk), _reference())


def test_microbatches_match_full_batch():
  _assert_match(_grads((2, 2, 2), microbatches=2), _reference())


def test_complementary_sharded_matches_one_device():
  _assert_match(_grads((2, 2, 2), complementary=True), _reference(complementary=True))


def test_mesh_validation_uses_devices():
  cfg = tiny_config()
  cfg.mesh.update(data=-1, fsdp=2, tensor=2)
  assert mesh_lib.resolve_mesh(cfg.mesh, 8).as_tuple() == (2, 2, 2)


def test_a_tensor_axis_spanning_processes_is_refused():
  """Rows are fed per process, so one tensor group must live on one process."""
  import types  # pylint: disable=import-outside-toplevel
  dev = lambda i, proc: types.SimpleNamespace(id=i, process_index=proc)
  within = np.array([[[dev(0, 0), dev(1, 0)], [dev(2, 1), dev(3, 1)]]])  # (1, 2, 2): each pair on one host
  sharding.check_tensor_within_process(within)
  across = np.array([[[dev(0, 0), dev(2, 1)], [dev(1, 0), dev(3, 1)]]])
  with pytest.raises(ValueError, match=r'mesh.tensor=2 spans processes \[0, 1\]'):
    sharding.check_tensor_within_process(across)
