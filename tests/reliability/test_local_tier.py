"""The local checkpoint tier in one process: a step survives a save and restore bit for bit; an
incomplete step, another mesh and another process count's folders are never restored (the caller then
uses the persistent tier). The 2-process behaviour with a bucket: tests/test_gcs.py."""

import logging
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from tmdm.parallel import sharding
from tmdm.training import local_tier


def _state(mesh_shape):
  mesh = sharding.make_mesh(mesh_shape)
  rng = np.random.default_rng(0)
  return {'w': jax.device_put(rng.standard_normal((8, 6), np.float32), NamedSharding(mesh, P('fsdp', 'tensor'))),
          'b': jax.device_put(rng.standard_normal((6,), np.float32).astype(jax.numpy.bfloat16),
                              NamedSharding(mesh, P()))}


def test_round_trip_and_what_is_never_restored(tmp_path, caplog):
  state = _state((2, 4, 1))
  tier = local_tier.LocalTier(str(tmp_path), 'gs://bucket/run', keep=2)
  for step in (2, 4, 6):
    tier.save(step, state, {'0': {'step': step}}, {})
  tier.wait()
  assert tier.steps() == [4, 6]  # Pruned to `keep`.
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored, data, _, step = tier.restore(target, persistent_step=2)
  assert step == 6 and data == {'0': {'step': 6}}
  for k in state:
    np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(state[k]))
  assert tier.restore(target, persistent_step=6) is None  # Not newer than the persistent tier.

  os.remove(os.path.join(tier.directory, '6', local_tier.COMMIT))  # Cut short: never listed.
  assert tier.steps() == [4] and tier.restore(target, persistent_step=None)[3] == 4

  other = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _state((1, 8, 1)))
  with caplog.at_level(logging.WARNING, logger='tmdm'):
    assert tier.restore(other, persistent_step=None) is None  # Another mesh: blocks laid out otherwise.
  assert 'was the mesh changed?' in caplog.text

  moved = tier.directory.replace('p0-of-1', 'p1-of-2')  # Steps of a 2-process run, and none of ours.
  os.rename(tier.directory, moved)
  os.makedirs(tier.directory)
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger='tmdm'):
    assert tier.restore(target, persistent_step=None) is None
  assert 'another number of processes' in caplog.text
