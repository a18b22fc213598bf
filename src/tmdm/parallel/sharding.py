"""Mesh and logical-axis sharding rules.

Mesh axes: 'data' (pure data parallel), 'fsdp' (data parallel that also shards parameters and
optimizer state), 'tensor' (heads, MLP hidden units, vocabulary). Model code names tensor dims with
logical axes; RULES, a table of data, maps them to mesh axes. A 1-device mesh is the degenerate case
of the same code path.

FSDP weights are stored sharded over 'fsdp' and gathered on use (`Sharder.gather`): besides being
the usual FSDP pattern, this avoids an XLA partitioner bug on the CPU mesh that otherwise gives
silently wrong gradients (see BUILD_NOTES.md).
"""

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

RULES = (
    ('batch', BATCH_AXES),  # rows of a batch
    ('embed', 'fsdp'),  # the d_model dim of weights: stored sharded, gathered on use
    ('vocab', 'tensor'),  # joint vocabulary (embedding rows, logits)
    ('heads', 'tensor'),  # attention heads
    ('mlp', 'tensor'),  # SwiGLU hidden units
    ('kv', None),  # width of one head
    ('layers', None),  # stacked blocks under nn.scan
    ('length', None),  # sequence positions
    ('act_embed', None),  # the d_model dim of activations
    ('norm', None),  # RMSNorm scales
)


def make_mesh(shape, devices=None) -> Mesh:
  """shape: (data, fsdp, tensor)."""
  devices = jax.devices() if devices is None else devices
  n = int(np.prod(shape))
  return jax.make_mesh(tuple(shape), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices[:n])


def check_tensor_within_process(devices_DFT):
  """The devices of one `tensor` group share a batch shard: they must be fed the same rows. The
  input pipeline feeds each process its own rows, so a tensor group spanning processes would see
  different rows on its members. Raises ValueError (one line) when one does."""
  devices_DFT = np.asarray(devices_DFT)
  groups = devices_DFT.reshape(-1, devices_DFT.shape[-1])
  for group in groups:
    owners = {getattr(d, 'process_index', 0) for d in group}
    if len(owners) > 1:
      raise ValueError(f'mesh.tensor={devices_DFT.shape[-1]} spans processes {sorted(owners)} (devices '
                       f'{[getattr(d, "id", d) for d in group]}): use a tensor axis of at most the devices of '
                       'one host')


@dataclasses.dataclass(frozen=True)
class Sharder:
  """Maps logical axes to shardings on one mesh; `mesh=None` makes every call a no-op."""
  mesh: Mesh | None
  rules: tuple = RULES
  gather_on_use: bool = True

  def spec(self, logical_axes) -> P:
    table = dict(self.rules)
    return P(*(None if a is None else table[a] for a in logical_axes))

  def named(self, logical_axes) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(logical_axes))

  def constrain(self, x, logical_axes):
    if self.mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, self.named(logical_axes))

  def gather(self, w, logical_axes):
    """A weight with its fsdp sharding removed (all-gathered), tensor sharding kept."""
    if self.mesh is None or not self.gather_on_use:
      return w
    spec = [_drop(entry, 'fsdp') for entry in self.spec(logical_axes)]
    return jax.lax.with_sharding_constraint(w, NamedSharding(self.mesh, P(*spec)))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def batch(self, ndim: int = 2) -> NamedSharding:
    """Rows over the batch axes, other dims replicated."""
    return self.named(('batch',) + (None,) * (ndim - 1))


def _drop(entry, axis):
  if entry == axis:
    return None
  if isinstance(entry, tuple):
    kept = tuple(a for a in entry if a != axis)
    return kept if len(kept) > 1 else (kept[0] if kept else None)
  return entry


def tree_shardings(sharder: Sharder, logical_tree):
  """PartitionSpec-of-logical-names tree (from nn.get_partition_spec) -> NamedSharding tree."""
  return jax.tree.map(lambda spec: sharder.named(tuple(spec)), logical_tree,
                      is_leaf=lambda x: isinstance(x, P))


def fetch(tree):
  """Host numpy copies of arrays, right on several processes: an array sharded over devices of other
  processes (a batch-sharded sample) is all-gathered, so every process gets the whole array."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(one, tree)
