"""The local checkpoint tier: frequent saves of each process's own shards to a per-host folder.

A pod run's persistent checkpoints (checkpoint.py: the workdir, often a bucket) are large and slow,
so they are rare; `checkpoint.local_dir` (local SSD, or a RAM disk such as /dev/shm) takes a save every
`checkpoint.local_every_steps` at the cost of a host copy and a local write. Each process writes only
the shards on its own devices (one copy of each distinct shard) and the iterator states of its own
data shards, into `<local_dir>/<run id>/p<i>-of-<n>/<step>`: written under a temporary name with a
COMMIT marker, then renamed, so a step folder exists only when complete. The file write runs in a
background thread; the next local save waits for it, a persistent save never does.

Restoring from it needs the same processes on the same devices: a host that was replaced has lost
its folder, and another process count or mesh lays the shards out otherwise. So on restart every
process lists the local steps it holds complete, all agree (an all-gather) on the newest step every
process holds, and each rebuilds its arrays from its own files; the state is then checked against
the exact fingerprint saved with it. Anything short of that (a process without the step, another
mesh, a damaged file) falls back to the persistent tier, with a warning, never to a fresh start.
"""

import hashlib
import json
import logging
import os
import shutil
import threading
import time

import jax
from jax.experimental import multihost_utils
import numpy as np

from tmdm import storage
from tmdm.training import checkpoint as checkpoint_lib

log = logging.getLogger('tmdm')
COMMIT = 'COMMIT'
_NEWEST = 8  # Local steps each process reports at a restart.


def _index_key(index) -> str:
  """A device's block of a global array ((slice, ...)) as a name."""
  return '_'.join(f'{s.start or 0}-{s.stop if s.stop is not None else "end"}' for s in index) or 'scalar'


class LocalTier:

  def __init__(self, local_dir: str, workdir: str, keep: int):
    if storage.is_url(local_dir):
      raise checkpoint_lib.CheckpointError(f'checkpoint.local_dir must be a local path on each host, not {local_dir}')
    run_id = hashlib.sha256(storage.absolute(workdir).encode()).hexdigest()[:12]  # One folder may serve many runs.
    self.directory = os.path.join(os.path.abspath(local_dir), run_id,
                                  f'p{jax.process_index()}-of-{jax.process_count()}')
    os.makedirs(self.directory, exist_ok=True)
    self.keep = keep
    self._thread, self._error = None, None

  def steps(self) -> list:
    """The complete local steps of this process, oldest first."""
    out = []
    for name in os.listdir(self.directory):
      if name.isdigit() and os.path.isfile(os.path.join(self.directory, name, COMMIT)):
        out.append(int(name))
    return sorted(out)

  # Saving.

  def save(self, step: int, state, data_state: dict, meta: dict):
    """Copies this process's shards to host memory (blocking), then writes them in the background."""
    self.wait()
    leaves, _ = jax.tree_util.tree_flatten_with_path(state)
    arrays, layout = {}, []
    for i, (path, leaf) in enumerate(leaves):
      blocks = {}
      for shard in leaf.addressable_shards:
        name = f'{i}:{_index_key(shard.index)}'
        if name not in blocks:
          blocks[name] = np.asarray(shard.data)
      for name, block in blocks.items():
        arrays[name] = np.ascontiguousarray(block).reshape(-1).view(np.uint8)  # Raw bytes: any dtype (bfloat16 too) round-trips.
      layout.append({'path': jax.tree_util.keystr(path), 'shape': list(leaf.shape),
                     'dtype': np.dtype(leaf.dtype).name, 'blocks': sorted(blocks)})
    fingerprint = np.asarray(checkpoint_lib.fingerprint(state)).tolist()  # Collective: every process calls it.
    meta = dict(meta, step=step, time=time.time(), layout=layout, data=data_state,
                **{checkpoint_lib.FINGERPRINT_KEY: fingerprint})
    self._thread = threading.Thread(target=self._write, args=(step, arrays, meta), daemon=True)
    self._thread.start()

  def _write(self, step, arrays, meta):
    try:
      final = os.path.join(self.directory, str(step))
      tmp = f'{final}.tmp-{os.getpid()}'
      shutil.rmtree(tmp, ignore_errors=True)
      os.makedirs(tmp)
      np.savez(os.path.join(tmp, 'shards.npz'), **{k.replace(':', '__'): v for k, v in arrays.items()})
      with open(os.path.join(tmp, 'meta.json'), 'w', encoding='utf-8') as f:
        json.dump(meta, f)
      with open(os.path.join(tmp, COMMIT), 'w', encoding='utf-8') as f:
        f.write(str(step))
      shutil.rmtree(final, ignore_errors=True)
      os.rename(tmp, final)
      for old in self.steps()[:-self.keep]:
        shutil.rmtree(os.path.join(self.directory, str(old)), ignore_errors=True)
    except Exception as e:  # pylint: disable=broad-except  (reported by the next wait())
      self._error = e

  def wait(self):
    """Blocks until the background write is done; raises CheckpointError if it failed."""
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self._error is not None:
      e, self._error = self._error, None
      raise checkpoint_lib.CheckpointError(f'local checkpoint to {self.directory} failed: {type(e).__name__}: {e}')

  # Restoring.

  def common_step(self) -> int:
    """The newest step every process holds complete (-1: none); the same on every process."""
    mine = np.full((_NEWEST,), -1, np.int64)
    steps = self.steps()[-_NEWEST:]
    mine[:len(steps)] = steps
    if jax.process_count() == 1:
      return int(mine.max())
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
    common = set(every[0].tolist())
    for row in every[1:]:
      common &= set(row.tolist())
    common.discard(-1)
    return max(common, default=-1)

  def _read(self, step: int, abstract_state):
    """(state, data_state, meta) from this process's files; raises on anything missing or changed."""
    folder = os.path.join(self.directory, str(step))
    with open(os.path.join(folder, 'meta.json'), encoding='utf-8') as f:
      meta = json.load(f)
    stored = np.load(os.path.join(folder, 'shards.npz'))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
    if len(leaves) != len(meta['layout']):
      raise ValueError(f'{len(meta["layout"])} arrays saved, {len(leaves)} in this run\'s state')
    out = []
    for i, ((path, target), saved) in enumerate(zip(leaves, meta['layout'])):
      if (jax.tree_util.keystr(path), list(target.shape), np.dtype(target.dtype).name) != (
          saved['path'], saved['shape'], saved['dtype']):
        raise ValueError(f'{saved["path"]} is {saved["dtype"]}{saved["shape"]} locally, the state wants '
                         f'{np.dtype(target.dtype).name}{list(target.shape)}')
      per_device = []
      for device, index in target.sharding.addressable_devices_indices_map(target.shape).items():
        name = f'{i}:{_index_key(index)}'.replace(':', '__')
        if name not in stored:
          raise ValueError(f'no block {name} of {saved["path"]} here (was the mesh changed?)')
        block_shape = [len(range(*s.indices(n))) for s, n in zip(index, target.shape)]
        block = stored[name].view(np.dtype(target.dtype)).reshape(block_shape)
        per_device.append(jax.device_put(block, device))
      out.append(jax.make_array_from_single_device_arrays(target.shape, target.sharding, per_device))
    return jax.tree_util.tree_unflatten(treedef, out), meta['data'], meta

  def restore(self, abstract_state, persistent_step):
    """(state, data_state, meta, step) from the local tier when every process can restore a step newer
    than `persistent_step` (None: no persistent checkpoint) and it matches its fingerprint; else None
    after a warning (the caller restores the persistent tier). Same answer on every process."""
    step = self.common_step()
    if step < 0 or (persistent_step is not None and step <= persistent_step):
      others = [d for d in os.listdir(os.path.dirname(self.directory))
                if d != os.path.basename(self.directory) and not d.endswith(f'-of-{jax.process_count()}')]
      if others and not self.steps():
        log.warning('local checkpoint tier: %s holds steps of a run on another number of processes (%s); a local '
                    'step is laid out per process and cannot be restored on %d: using the persistent tier',
                    os.path.dirname(self.directory), ', '.join(sorted(others)[:4]), jax.process_count())
      elif self.steps():
        log.warning('local checkpoint tier: no step newer than the persistent tier\'s %s that every process holds '
                    '(here: %s); using the persistent tier', persistent_step, self.steps()[-3:])
      return None
    try:
      state, data, meta = self._read(step, abstract_state)
      ok, reason = 1, ''
    except Exception as e:  # pylint: disable=broad-except  (any failure: the persistent tier is still there)
      state, data, meta, ok, reason = None, None, None, 0, f'{type(e).__name__}: {e}'
    if jax.process_count() > 1:
      ok = int(np.min(multihost_utils.process_allgather(np.int32(ok))))
    if ok:
      matches = checkpoint_lib.verify_fingerprint(meta, state)
      if matches:
        return state, data, meta, step
      reason = 'the state does not match the fingerprint saved with it'
    log.warning('local checkpoint tier: step %d cannot be restored on every process (%s); using the persistent '
                'tier', step, reason or 'another process failed')
    return None

  def close(self):
    self.wait()
