"""The checkpoint fingerprint: exact on every mesh, against a numpy reference, and no leaf gathered.

A restore compares the fingerprint bit for bit, so it must not depend on the order in which the
devices' partial sums meet (mesh, process count, device kind, XLA version). The reference below is
written from the definition alone (numpy, whole arrays on the host, Python integers modulo 2**32),
and the sharded fingerprint must equal it on every mesh; a float sum would not (test_legacy_*)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tmdm.parallel import sharding
from tmdm.training import checkpoint

MESHES = ((1, 8, 1), (8, 1, 1), (2, 2, 2), (2, 4, 1), (1, 1, 1))
SPECS = (P('fsdp', 'tensor', None), P(None, ('data', 'fsdp'), 'tensor'), P('data', None, 'fsdp'), P())


def _reference(leaves) -> np.ndarray:
  """Per leaf: sum of the uint32 words of its bit patterns, and their sum weighted by w(flat index),
  w(i) = ((h ^ (h >> 15)) * 0x85EBCA6B | 1) with h = i * 0x9E3779B1 + 1, all modulo 2**32."""
  out = []
  for x in leaves:
    x = np.asarray(x)
    words = (x.view(np.uint32) if x.dtype.itemsize == 4 else x.view(np.uint16)).astype(np.uint64).reshape(-1)
    i = np.arange(words.size, dtype=np.uint64)
    h = (i * 0x9E3779B1 + 1) % 2**32
    w = (((h ^ (h >> 15)) * 0x85EBCA6B) % 2**32) | 1
    out.append([int(words.sum()) % 2**32, int(sum(int(v) for v in (words * w) % 2**32)) % 2**32])
  return np.asarray(out, np.uint64)


def _leaves():
  rng = np.random.default_rng(0)
  return [rng.standard_normal((8, 16, 24), np.float32) * 1e3,  # Large values: float sums round.
          rng.standard_normal((16, 8, 8), np.float32).astype(jnp.bfloat16),
          rng.integers(-2**31, 2**31 - 1, (8, 24, 16), dtype=np.int64).astype(np.int32)]


def test_exact_on_every_mesh_and_equal_to_the_reference():
  leaves = _leaves()
  want = _reference(leaves)
  for mesh_shape in MESHES:
    mesh = sharding.make_mesh(mesh_shape)
    for spec in SPECS:
      placed = [jax.device_put(x, NamedSharding(mesh, spec)) for x in leaves]
      got = np.asarray(checkpoint.fingerprint({'a': placed}), np.uint64)
      np.testing.assert_array_equal(got, want, err_msg=f'mesh {mesh_shape}, {spec}')


def test_chunked_sums_equal_the_reference(monkeypatch):
  """Shards larger than the chunk are summed in a loop over row blocks: same answer."""
  monkeypatch.setattr(checkpoint, '_CHUNK_BYTES', 1024)
  checkpoint._fingerprint_program.cache_clear()  # pylint: disable=protected-access
  try:
    leaves = _leaves()
    mesh = sharding.make_mesh((2, 4, 1))
    placed = [jax.device_put(x, NamedSharding(mesh, P('data', 'fsdp'))) for x in leaves]
    np.testing.assert_array_equal(np.asarray(checkpoint.fingerprint(placed), np.uint64), _reference(leaves))
  finally:
    checkpoint._fingerprint_program.cache_clear()  # pylint: disable=protected-access


def test_one_changed_bit_or_two_swapped_values_change_it():
  x = _leaves()[0]
  base = np.asarray(checkpoint.fingerprint([x]))
  flipped = x.copy()
  flipped.view(np.uint32)[3, 5, 7] ^= 1
  swapped = x.copy()
  swapped[0, 0, 0], swapped[1, 2, 3] = x[1, 2, 3], x[0, 0, 0]
  assert not np.array_equal(np.asarray(checkpoint.fingerprint([flipped])), base)
  moved = np.asarray(checkpoint.fingerprint([swapped]))
  assert moved[0, 0] == base[0, 0] and moved[0, 1] != base[0, 1]  # Same values elsewhere: only the weighted sum sees it.


def test_legacy_float_fingerprint_moves_with_the_mesh_the_exact_one_does_not():
  """Why the float fingerprint could not be compared bitwise: summed on another mesh its last bits move."""
  x = _leaves()[0]
  floats, exact = set(), set()
  for mesh_shape in ((1, 8, 1), (8, 1, 1), (2, 2, 2), (1, 1, 1)):
    placed = jax.device_put(x, NamedSharding(sharding.make_mesh(mesh_shape), P('fsdp', 'data', 'tensor')))
    floats.add(np.asarray(checkpoint.legacy_float_fingerprint([placed])).tobytes())
    exact.add(np.asarray(checkpoint.fingerprint([placed])).tobytes())
  assert len(exact) == 1 and len(floats) > 1
  assert checkpoint.verify_fingerprint({'fingerprint': np.asarray(checkpoint.legacy_float_fingerprint([x])).tolist()},
                                       [x])  # An old checkpoint still verifies, within a tolerance.


@pytest.mark.parametrize('spec', [P(None, 'fsdp', None), P('fsdp'), P(None, None, 'fsdp')])
def test_no_leaf_is_gathered(spec):
  """The 3B preset's stacked up-projection size, 24 x 3072 x 2048 float32 over 8 devices (72 MiB a
  shard): compiled, the program has no all-gather and under twice a shard of temporaries (the float
  fingerprint needed 1.69 GiB)."""
  mesh = sharding.make_mesh((1, 8, 1))
  leaf = jax.ShapeDtypeStruct((24, 3072, 2048), jnp.float32, sharding=NamedSharding(mesh, spec))
  program, leaves = checkpoint.fingerprint_program([leaf])
  compiled = program.lower(*leaves).compile()
  shard = 24 * 3072 * 2048 * 4 // 8
  assert 'all-gather' not in compiled.as_text()
  assert compiled.memory_analysis().temp_size_in_bytes < 2 * shard
