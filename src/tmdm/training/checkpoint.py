"""Orbax checkpoints of the train state, the data-iterator state, the resolved config and a seal.

Each step folder holds four items: `state` (the sharded TrainState, restorable onto any mesh through
a target with new shardings), `data` (the Grain iterator state of every data shard, gathered from
the processes that own them), `config` (the resolved config) and `meta` (tokenizer hashes, the mesh,
and a fingerprint of the state: two weighted sums per array, computed on device at save time). Every
item is written with Orbax's standard handlers (StandardSave, JsonSave), so a plain
`ocp.CheckpointManager(dir).restore(step)` opens a checkpoint without tmdm.

Orbax writes each step into a temporary folder and renames it when complete, so a save cut short by
a crash is never listed. `restore_latest_good` sorts what goes wrong in a restore into three kinds:
  corrupt    proven damage, and only that: a file of the step is missing (FileNotFoundError,
             TensorStore NOT_FOUND), cut short (OUT_OF_RANGE, a truncated compressed stream) or
             undecodable (JSON, DATA_LOSS), or the state read does not match its fingerprint. The
             step is moved aside (never deleted) into `corrupt/` next to the checkpoints and the
             previous step is tried.
  mismatch   the files are sound but hold another train state (paths, shapes or dtypes differ from
             the target): a config change. StateMismatch; nothing moved.
  failed     anything else (permissions, I/O and network errors, memory, unknown): it proves nothing
             about the files, so RestoreFailed stops the run and nothing is moved. When an error
             chain holds both a sign of damage and any of these, it counts as failed.
When checkpoints existed and none restores, NothingRestorable; the caller decides.

With several processes each reads its own shards, collective-free, then all agree on the worst kind
any of them saw; process 0's listing names the step to try and only process 0 moves folders, so
every process restores the same step.
"""

import dataclasses
import json
import logging
import re
import time
from typing import Any

from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from tmdm import optim, storage
from tmdm.errors import CheckpointError

log = logging.getLogger('tmdm')
ITEMS = ('state', 'data', 'config', 'meta')




class StateMismatch(CheckpointError):
  """A sound checkpoint whose train state (array paths, shapes, dtypes) is not the one this run
  builds: a config change, for the caller to name. Nothing was moved."""

  def __init__(self, step: int, detail: str, saved_config: dict):
    super().__init__(f'checkpoint {step} holds another train state: {detail}')
    self.step, self.detail, self.saved_config = step, detail, saved_config


class RestoreFailed(CheckpointError):
  """A restore failed in a way that does not prove the checkpoint corrupt; nothing was moved."""


class NothingRestorable(CheckpointError):
  """Checkpoints existed, but every one was proven corrupt and moved aside."""


# Restore outcomes, ordered: when processes see different ones, the largest wins.
OK, CORRUPT, MISMATCH, FAILED = range(4)
# TensorStore status prefixes. Damage: undecodable, read past the end of a file, missing.
_DAMAGE_STATUS = ('DATA_LOSS:', 'OUT_OF_RANGE:', 'NOT_FOUND:')
# Conditions of the moment or of this machine, not of the files.
_TRANSIENT_STATUS = ('UNAVAILABLE:', 'DEADLINE_EXCEEDED:', 'RESOURCE_EXHAUSTED:', 'ABORTED:', 'CANCELLED:',
                     'PERMISSION_DENIED:', 'UNAUTHENTICATED:', 'INTERNAL:', 'UNKNOWN:')


def _causes(error):
  """The error and what it was raised from (Orbax wraps TensorStore's errors in bare Exceptions)."""
  out = []
  while error is not None and all(error is not e for e in out):
    out.append(error)
    error = error.__cause__ or error.__context__
  return out


def _maybe_transient(e) -> bool:
  if isinstance(e, MemoryError) or (isinstance(e, OSError) and not isinstance(e, FileNotFoundError)):
    return True
  return str(e).startswith(_TRANSIENT_STATUS)


def _damaged_file(e) -> bool:
  if isinstance(e, (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError)):
    return True
  text = str(e)
  # FAILED_PRECONDITION is broad in TensorStore; only its truncated-stream form proves damage.
  return text.startswith(_DAMAGE_STATUS) or (text.startswith('FAILED_PRECONDITION:') and 'Truncated' in text)


def proves_corruption(error: BaseException) -> bool:
  """True only when the error shows damaged files and nothing in its chain could be transient."""
  causes = _causes(error)
  return not any(_maybe_transient(e) for e in causes) and any(_damaged_file(e) for e in causes)


def _describe(error) -> str:
  """One line: TensorStore's own message when the chain holds one (it names the file and the
  problem; Orbax's wrapper does not), else the error's."""
  status = [e for e in _causes(error) if re.match(r'[A-Z_]+: ', str(e))]
  e = status[0] if status else error
  return f'{type(e).__name__}: {str(e).splitlines()[0][:300]}' if str(e) else type(e).__name__


def _arrays(tree) -> dict:
  """{path: 'dtype[shape]'} of the array leaves (Orbax keeps empty nodes as None)."""
  return {k: f'{np.dtype(v.dtype).name}{list(v.shape)}' for k, v in ocp.tree.to_flat_dict(tree).items()
          if v is not None}


def tree_mismatch(saved_tree, target) -> str:
  """'' when the checkpoint holds exactly the arrays of `target` (paths, shapes, dtypes), else the
  first differences. Checked before reading: Orbax refuses other paths and shapes, but casts other
  dtypes silently, and a cast state would then fail its fingerprint and pass for damage."""
  saved, want = _arrays(saved_tree), _arrays(target)
  name = lambda k: '.'.join(map(str, k))
  problems = ([f'{name(k)} is not in the checkpoint' for k in want if k not in saved] +
              [f'{name(k)} is only in the checkpoint' for k in saved if k not in want] +
              [f'{name(k)} is {saved[k]} in the checkpoint, {want[k]} now' for k in want
               if k in saved and saved[k] != want[k]])
  more = f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''
  return '; '.join(problems[:3]) + more


def _from_process_0(value: int) -> int:
  """Process 0's value on every process (folder listings may differ between hosts: its view rules)."""
  if jax.process_count() == 1:
    return value
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _worst(kind: int) -> int:
  """The worst outcome any process saw, on every process: all of them then act alike."""
  if jax.process_count() == 1:
    return kind
  return int(np.max(multihost_utils.process_allgather(np.int32(kind))))


@dataclasses.dataclass
class _Attempt:
  kind: int
  reason: str = ''
  meta: Any = None
  state: Any = None
  data: Any = None


def _seen(attempt: _Attempt, step: int) -> int:
  """attempt.kind, logged where it went wrong when other processes will only learn the kind."""
  if jax.process_count() > 1 and attempt.kind != OK:
    log.error('process %d, checkpoint %d: %s', jax.process_index(), step, attempt.reason)
  return attempt.kind


def _find(tree, key):
  """The first subtree stored under `key` in nested dicts and lists (None if there is none)."""
  if isinstance(tree, dict):
    if key in tree:
      return tree[key]
    children = tree.values()
  elif isinstance(tree, (list, tuple)):
    children = tree
  else:
    return None
  for child in children:
    found = _find(child, key)
    if found is not None:
      return found
  return None


def gather_data_states(data_state: dict, num_shards: int) -> dict:
  """The `data` item: every data shard's iterator state, from whichever process owns it (each process
  holds its own shards' states; process 0 writes the JSON item)."""
  shards = dict(data_state)
  if jax.process_count() > 1:
    blob = np.frombuffer(json.dumps(shards, sort_keys=True).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([blob.size], np.int64))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:blob.size] = blob
    every = multihost_utils.process_allgather(padded)
    shards = {}
    for row, size in zip(np.asarray(every).reshape(len(sizes.reshape(-1)), -1), sizes.reshape(-1)):
      shards.update(json.loads(row[:int(size)].tobytes().decode()))
  if len(shards) != num_shards:
    raise CheckpointError(f'data-iterator states of {len(shards)} shards gathered, expected {num_shards}')
  return {'num_shards': num_shards, 'shards': {k: shards[k] for k in sorted(shards, key=int)}}


def _owned_data_states(item: dict, shards) -> dict:
  """The iterator states of the shards this process owns, from a restored `data` item."""
  if item['num_shards'] != shards.num_shards:
    raise FileNotFoundError(f'the checkpoint holds iterator states of {item["num_shards"]} data shards, this run '
                            f'reads {shards.num_shards}; was data.num_shards changed?')
  return {str(s): item['shards'][str(s)] for s in shards.indices}


def _read_legacy_data(directory, shards) -> dict:
  """`data` items written before they were standard JSON (one shard_I-of-N.json file per shard)."""
  out = {}
  for shard in shards.indices:
    path = directory / f'shard_{shard}-of-{shards.num_shards}.json'
    if not path.exists():
      found = sorted(p.name for p in directory.iterdir())
      raise FileNotFoundError(f'no data-iterator state {path.name} in {directory} (found {found}); '
                              'was data.num_shards changed?')
    out[str(shard)] = json.loads(path.read_text())
  return out


@jax.jit
def fingerprint(tree):
  """Two sums per array leaf (plain, and weighted by a fixed cosine): [n_leaves, 2] float32."""
  def two_sums(x):
    x = x.astype(jnp.float32).reshape(-1)
    w = jnp.cos(jnp.arange(x.size, dtype=jnp.float32) * 0.6180339887)
    return jnp.stack([jnp.sum(x), jnp.sum(x * w)])
  return jnp.stack([two_sums(x) for x in jax.tree.leaves(tree)])


def _fingerprint_matches(saved, now, same_mesh: bool) -> bool:
  saved, now = np.asarray(saved, np.float64), np.asarray(now, np.float64)
  if saved.shape != now.shape:
    return False
  if same_mesh:  # Same program, same partitioning: the sums are bitwise reproducible.
    return bool(np.array_equal(saved, now))
  return bool(np.allclose(saved, now, rtol=1e-5, atol=1e-6))


def _single_process_array_writes():
  """In one process, write each array shard whole. Orbax's replica-parallel writes split every
  replicated shard among its replicas with one eager slice per piece; that only pays when the
  replicas live in different processes. On the demo's 8-device CPU mesh it was 936 slices (2.2 s
  blocked in the first save, while each slice compiled; ~0.25 s in every later one)."""
  if jax.process_count() > 1 or not getattr(ocp.type_handlers.get_type_handler(jax.Array), '_use_replica_parallel', 1):
    return
  absl_log = logging.getLogger('absl')
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)  # Orbax warns on every override of a registered type.
  try:
    ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
                                            override=True)
  finally:
    absl_log.setLevel(level)


class Checkpointer:
  """The loop's view of Orbax: save, steps, latest good restore, error checks."""

  def __init__(self, directory, *, keep: int, async_save: bool):
    self.directory = storage.absolute(directory)  # A local folder or a URL (gs://bucket/run/checkpoints).
    _single_process_array_writes()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True, cleanup_tmp_directories=True)
    try:
      self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)
    except OSError as e:
      raise CheckpointError(f'cannot use checkpoint folder {self.directory}: {e}') from None
    # Restores go to the item handlers directly: the manager's restore ends in a barrier of all
    # processes, which one that failed before it would never reach.
    self._state_handler, self._json_handler = ocp.StandardCheckpointHandler(), ocp.JsonCheckpointHandler()

  def steps(self):
    return sorted(self.manager.all_steps())

  def latest_step(self):
    return self.manager.latest_step()

  def _step_dir(self, step: int):
    return epath.Path(self.directory) / str(step)

  def corrupt_dir(self) -> str:
    return storage.join(storage.parent(self.directory), 'corrupt')

  def read_meta(self, step: int) -> dict:
    return self._json_handler.restore(self._step_dir(step) / 'meta', args=ocp.args.JsonRestore())

  def save(self, step: int, state, data_state, num_shards: int, config: dict, meta: dict):
    """Starts a (background) save; raises CheckpointError if this or an earlier save failed."""
    meta = dict(meta, step=step, time=time.time(), fingerprint=np.asarray(fingerprint(state)).tolist())
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(gather_data_states(data_state, num_shards)),
                              config=ocp.args.JsonSave(config), meta=ocp.args.JsonSave(meta))
    try:
      self.manager.check_for_errors()
      self.manager.save(step, args=args, force=True)
    except Exception as e:  # pylint: disable=broad-except  (Orbax surfaces OSError wrapped in many types)
      raise CheckpointError(f'checkpoint of step {step} to {self.directory} failed: '
                            f'{type(e).__name__}: {str(e).splitlines()[0][:300]}') from e

  def _read(self, step, abstract_state, shards) -> _Attempt:
    """This process's part of a restore, without collectives (a failure cannot strand the others)."""
    folder = self._step_dir(step)
    try:
      meta = self.read_meta(step)
      mismatch = tree_mismatch(self._state_handler.metadata(folder / 'state').tree, abstract_state)
      if mismatch:
        return _Attempt(MISMATCH, mismatch, meta)
      state = self._state_handler.restore(folder / 'state', args=ocp.args.StandardRestore(abstract_state))
      data = self._read_data(folder / 'data', shards)
      return _Attempt(OK, '', meta, state, data)
    except Exception as e:  # pylint: disable=broad-except  (sorted into corrupt / failed, never ignored)
      return _Attempt(CORRUPT if proves_corruption(e) else FAILED, _describe(e))

  def _read_data(self, directory, shards) -> dict:
    if any(p.name.startswith('shard_') for p in directory.iterdir()):
      return _read_legacy_data(directory, shards)
    return _owned_data_states(self._json_handler.restore(directory, args=ocp.args.JsonRestore()), shards)

  def _verify(self, attempt: _Attempt, mesh_shape) -> _Attempt:
    """The fingerprint check (a computation over all processes' devices)."""
    try:
      saved = attempt.meta.get('fingerprint')
      if saved is None:  # Written before fingerprints: nothing to check against, no proof of damage.
        log.warning('checkpoint meta has no fingerprint; the restored state is not verified')
        return attempt
      same_mesh = list(attempt.meta.get('mesh', [])) == list(mesh_shape)
      if _fingerprint_matches(saved, fingerprint(attempt.state), same_mesh):
        return attempt
      return _Attempt(CORRUPT, 'the state does not match the fingerprint written with it (damaged or tampered files)')
    except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory: proves nothing)
      return _Attempt(FAILED, _describe(e))

  def _attempt(self, step, abstract_state, mesh_shape, shards) -> _Attempt:
    """Reads and verifies `step`; every process ends with the same kind."""
    attempt = self._read(step, abstract_state, shards)
    kind = _worst(_seen(attempt, step))
    if kind == OK:
      attempt = self._verify(attempt, mesh_shape)
      kind = _worst(_seen(attempt, step))
    if kind != attempt.kind:
      here = f'; here: {attempt.reason}' if attempt.reason else ''
      return _Attempt(kind, f'another process failed on it (see its log){here}', attempt.meta)
    return attempt

  def restore_latest_good(self, abstract_state, mesh_shape, shards):
    """(state, data_state, meta, step) of the newest checkpoint that restores and matches its
    fingerprint, or None when there is no checkpoint. Proven-corrupt steps are moved aside, not
    deleted; StateMismatch, RestoreFailed and NothingRestorable otherwise (module docstring).
    shards: DataShards, the data shards this process reads."""
    moved = []
    step = _from_process_0(max(self.steps(), default=-1))
    while step >= 0:
      attempt = self._attempt(step, abstract_state, mesh_shape, shards)
      if attempt.kind == OK:
        return attempt.state, attempt.data, attempt.meta, step
      if attempt.kind == MISMATCH:
        raise StateMismatch(step, attempt.reason, (attempt.meta or {}).get('config', {}))
      if attempt.kind == FAILED:
        raise RestoreFailed(f'could not restore checkpoint {step} from {self.directory}: {attempt.reason}; that does '
                            'not prove it corrupt, so nothing was moved: fix the cause and run again')
      moved.append(self._quarantine(step, attempt.reason))
      step = _from_process_0(max((s for s in self.steps() if s < step), default=-1))
    if moved or _from_process_0(int(bool(self.quarantined()))):
      raise self._nothing_restorable(moved)
    return None

  def quarantined(self) -> list:
    """Names of the steps moved aside into corrupt/ (by this run or an earlier one)."""
    folder = self.corrupt_dir()
    return storage.listdir(folder)

  def _nothing_restorable(self, moved) -> NothingRestorable:
    names = self.quarantined()
    what = (f'every checkpoint in {self.directory} was corrupt' if moved else
            f'{self.directory} holds no checkpoint, but earlier runs moved checkpoints aside as corrupt')
    return NothingRestorable(f'{what}: {len(names)} in {self.corrupt_dir()} ({", ".join(names[:5])}'
                             f'{", ..." if len(names) > 5 else ""})')

  def restore_state(self, abstract_state, step=None):
    """(state, step) of the given or newest step, state only (sampling, evaluation)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return out['state'], step

  def restore_params(self, abstract_params, *, ema: bool = False, step=None):
    """(params, step, ema_used) of the given or newest step, the parameters alone (sampling,
    evaluation): no optimizer is built and its moments are not read. ema=True takes the weight EMA
    the optimizer state keeps (optim.params_ema) when the run kept one."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    folder = self._step_dir(step) / 'state'
    saved = self._state_handler.metadata(folder).tree
    want = (optim.EMA_FIELD,) if ema and _find(saved, optim.EMA_FIELD) is not None else ('params',)

    def template(node, path=()):  # The saved tree: wanted subtrees as targets, every other leaf skipped.
      if path and path[-1] in want and (path[-1] != 'params' or len(path) == 1):
        return abstract_params
      if isinstance(node, dict):
        return {k: template(v, path + (k,)) for k, v in node.items()}
      if isinstance(node, (list, tuple)):
        return type(node)(template(v, path + (i,)) for i, v in enumerate(node))
      return ocp.PLACEHOLDER
    item = template(saved)
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding) if isinstance(a, jax.ShapeDtypeStruct) else a, item)
    try:
      out = ocp.PyTreeCheckpointHandler().restore(folder, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args))
    except Exception as e:  # pylint: disable=broad-except  (a shape or structure the model does not have)
      raise CheckpointError(f'cannot restore the parameters of checkpoint {step} in {self.directory}: '
                            f'{_describe(e)}') from e
    if want == ('params',):
      return out['params'], step, False
    return _find(out, optim.EMA_FIELD), step, True

  def _quarantine(self, step, reason) -> str:
    """Process 0 moves the step into corrupt/; the others wait for it, then all re-list."""
    dst = storage.join(self.corrupt_dir(), f'{step}-{int(time.time())}')
    if jax.process_index() == 0:
      log.error('checkpoint %d is corrupt (%s); moved to %s, trying the previous one', step, reason, dst)
      storage.move(storage.join(self.directory, str(step)), dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'tmdm: checkpoint {step} moved aside')
    self.manager.reload()
    return dst

  def wait(self):
    """Blocks until background saves finish; raises CheckpointError if one failed."""
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'a checkpoint save to {self.directory} failed: {type(e).__name__}: '
                            f'{str(e).splitlines()[0][:300]}') from e

  def close(self):
    try:
      self.wait()
    finally:
      self.manager.close()
      self._state_handler.close()
