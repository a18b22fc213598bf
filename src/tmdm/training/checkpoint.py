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
import functools
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
from jax.sharding import PartitionSpec as P

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


class DataLayoutMismatch(CheckpointError):
  """The checkpoint's data-iterator states are of another data layout (data.num_shards): a config
  change, never damage."""


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


def from_process_0(value: int) -> int:
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
  data_layout: bool = False  # A MISMATCH of the data-iterator layout, not of the train state.


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


FRESH_DATA = {'fresh': True}  # The `data` item of a checkpoint with no data position (`tmdm import`).


def _owned_data_states(item: dict, shards) -> dict | None:
  """The iterator states of the shards this process owns, from a restored `data` item (None: start
  the data from its beginning)."""
  if item.get('fresh'):
    return None
  if item['num_shards'] != shards.num_shards:
    raise DataLayoutMismatch(f'it holds the iterator states of {item["num_shards"]} data shards, this run reads '
                             f'{shards.num_shards}: set --config.data.num_shards={item["num_shards"]}')
  return {str(s): item['shards'][str(s)] for s in shards.indices}


def _read_legacy_data(directory, shards) -> dict:
  """`data` items written before they were standard JSON (one shard_I-of-N.json file per shard)."""
  out = {}
  for shard in shards.indices:
    path = directory / f'shard_{shard}-of-{shards.num_shards}.json'
    if not path.exists():
      found = sorted(p.name for p in directory.iterdir())
      other = {m.group(1) for m in map(re.compile(r'shard_\d+-of-(\d+)\.json$').match, found) if m}
      if other and str(shards.num_shards) not in other:
        raise DataLayoutMismatch(f'it holds the iterator states of {"/".join(sorted(other))} data shards, this run '
                                 f'reads {shards.num_shards}: set --config.data.num_shards={min(other, key=int)}')
      raise FileNotFoundError(f'no data-iterator state {path.name} in {directory} (found {found}); '
                              'was data.num_shards changed?')
    out[str(shard)] = json.loads(path.read_text())
  return out


# The fingerprint: two wrapping uint32 sums per leaf over its bit patterns. Integer addition modulo
# 2**32 is associative and commutative, so every reduction order (mesh, process count, device kind,
# XLA or libtpu version) gives the same bits and nothing is rounded: a restore compares them exactly.
# Each device sums its own shard under shard_map (global flat indices from its shard's offsets), in
# chunks of at most _CHUNK_BYTES, and one psum of two words per leaf over the leaf's sharded mesh axes
# follows: no leaf is gathered, and no temporary of a shard's size is made (XLA's CPU backend does not
# fuse an elementwise product into a large reduction: summed whole, it would hold a copy of the shard).
FINGERPRINT_KEY = 'fingerprint_u32'  # Meta key of the exact fingerprint ('fingerprint': the float one before it).
_GOLDEN, _MIX = 0x9E3779B1, 0x85EBCA6B  # Odd multipliers (multiplicative hashing): spread, distinct weights.
_CHUNK_BYTES = 1 << 24


def _bits(x):
  """x's bit patterns as uint32 (64-bit dtypes: a trailing axis of two words; PRNG keys: their data)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  word = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[np.dtype(x.dtype).itemsize]
  return jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32)


def index_weight(index):
  """The weight of the second sum at each flat index (uint32 in, uint32 out, wrapping)."""
  h = index * jnp.uint32(_GOLDEN) + jnp.uint32(1)
  return (h ^ (h >> 15)) * jnp.uint32(_MIX) | jnp.uint32(1)


def _spec_axes(spec, ndim) -> list:
  """Per dimension, the tuple of mesh axes it is split over."""
  entries = list(spec) + [None] * (ndim - len(spec))
  return [() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in entries]


def _shard_sums(x, axes, global_shape):
  """(sum of bits, index-weighted sum of bits) of this device's shard `x` of a leaf of `global_shape`
  split over `axes` (per dimension). Runs under shard_map."""
  bits_shape = x.shape + ((2,) if np.dtype(x.dtype).itemsize == 8 else ())
  full_shape = tuple(global_shape) + bits_shape[len(global_shape):]
  offsets = []
  for d, names in enumerate(axes):
    coord = jnp.uint32(0)
    for name in names:
      coord = coord * jnp.uint32(jax.lax.axis_size(name)) + jax.lax.axis_index(name).astype(jnp.uint32)
    offsets.append(coord * jnp.uint32(x.shape[d]))
  offsets += [jnp.uint32(0)] * (len(bits_shape) - len(offsets))
  strides = [int(np.prod(full_shape[d + 1:], dtype=np.int64)) % 2**32 for d in range(len(full_shape))]

  def sums(block, start0):  # block: rows start0.. of the shard along dimension 0.
    bits = _bits(block)
    index = jnp.zeros(bits.shape, jnp.uint32)
    for d in range(bits.ndim):
      first = offsets[d] + (start0 if d == 0 else jnp.uint32(0))
      index = index + (jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d) + first) * jnp.uint32(strides[d])
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * index_weight(index), dtype=jnp.uint32)])

  nbytes = x.size * np.dtype(x.dtype).itemsize
  if x.ndim == 0 or nbytes <= _CHUNK_BYTES:
    return sums(x, jnp.uint32(0))
  row_bytes = nbytes // x.shape[0]
  rows = max([k for k in range(1, x.shape[0] + 1) if x.shape[0] % k == 0 and k * row_bytes <= _CHUNK_BYTES],
             default=1)

  def body(i, total):
    block = jax.lax.dynamic_slice_in_dim(x, i * rows, rows, axis=0)
    return total + sums(block, (i * rows).astype(jnp.uint32))
  first = sums(jax.lax.slice_in_dim(x, 0, rows, axis=0), jnp.uint32(0))  # (Typed like the shard: varying.)
  return jax.lax.fori_loop(1, x.shape[0] // rows, body, first)


@functools.lru_cache(maxsize=16)
def _fingerprint_program(mesh, layout):
  """The jitted fingerprint of leaves with `layout`: ((shape, dtype, per-dimension axes), ...)."""
  def local(*shards):
    out = []
    for x, (shape, _, axes) in zip(shards, layout):
      s = _shard_sums(x, axes, shape)
      split = tuple(sorted({name for names in axes for name in names}))
      out.append(jax.lax.psum(s, split) if split else s)
    return jnp.stack(out)
  specs = tuple(P(*[names or None for names in axes]) for _, _, axes in layout)
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P()))


def fingerprint(tree):
  """[n_leaves, 2] uint32: per array leaf, the wrapping sum of its bit patterns and their sum
  weighted by a hash of each element's flat index. Exact, the same on every mesh, process count and
  backend. Leaves sharded by a NamedSharding are summed where they live (leaves without one are
  taken as replicated on the first leaf's mesh, or on one device)."""
  program, leaves = fingerprint_program(tree)
  return program(*leaves)


def fingerprint_program(tree):
  """(jitted program, leaves): fingerprint(tree) is program(*leaves); leaves may be ShapeDtypeStructs
  with shardings, for lowering and memory analysis."""
  leaves = jax.tree.leaves(tree)
  named = [x.sharding for x in leaves if isinstance(getattr(x, 'sharding', None), jax.sharding.NamedSharding)]
  mesh = named[0].mesh if named else jax.sharding.Mesh(np.asarray(jax.local_devices()[:1]), ('one',))
  layout = []
  for x in leaves:
    sh = getattr(x, 'sharding', None)
    spec = sh.spec if isinstance(sh, jax.sharding.NamedSharding) and sh.mesh == mesh else P()
    layout.append((tuple(x.shape), np.dtype(x.dtype).name if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                   else str(x.dtype), tuple(_spec_axes(spec, len(x.shape)))))
  return _fingerprint_program(mesh, tuple(layout)), leaves


@jax.jit
def legacy_float_fingerprint(tree):
  """The fingerprint of checkpoints written before FINGERPRINT_KEY: two float32 sums per leaf (plain,
  and weighted by a fixed cosine). Their order of summation moves the last bits, so a restore compares
  it within a tolerance; it gathers each leaf, which only restores of such old checkpoints pay."""
  def two_sums(x):
    x = x.astype(jnp.float32).reshape(-1)
    w = jnp.cos(jnp.arange(x.size, dtype=jnp.float32) * 0.6180339887)
    return jnp.stack([jnp.sum(x), jnp.sum(x * w)])
  return jnp.stack([two_sums(x) for x in jax.tree.leaves(tree)])


def verify_fingerprint(meta: dict, state) -> bool | None:
  """Whether `state` matches the fingerprint in its checkpoint's meta: the exact one bit for bit, a
  legacy float one within float32 summation noise; None when the meta holds none."""
  if FINGERPRINT_KEY in meta:
    saved = np.asarray(meta[FINGERPRINT_KEY], np.uint64)
    now = np.asarray(fingerprint(state), np.uint64)
    return saved.shape == now.shape and bool(np.array_equal(saved, now))
  if 'fingerprint' in meta:
    saved = np.asarray(meta['fingerprint'], np.float64)
    now = np.asarray(legacy_float_fingerprint(state), np.float64)
    return saved.shape == now.shape and bool(np.allclose(saved, now, rtol=1e-5, atol=1e-6))
  return None


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

  def read_config(self, step: int) -> dict:
    """The resolved config saved with `step` (the one its state was trained with)."""
    return self._json_handler.restore(self._step_dir(step) / 'config', args=ocp.args.JsonRestore())

  def save(self, step: int, state, data_state, num_shards: int, config: dict, meta: dict):
    """Starts a (background) save; raises CheckpointError if this or an earlier save failed.
    data_state None: no data position (`tmdm import`: a run from it reads its data from the start)."""
    meta = dict(meta, step=step, time=time.time(), **{FINGERPRINT_KEY: np.asarray(fingerprint(state)).tolist()})
    data = FRESH_DATA if data_state is None else gather_data_states(data_state, num_shards)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
                              config=ocp.args.JsonSave(config), meta=ocp.args.JsonSave(meta))
    try:
      self.manager.check_for_errors()
      self.manager.save(step, args=args, force=True)
    except Exception as e:  # pylint: disable=broad-except  (Orbax surfaces OSError wrapped in many types)
      raise CheckpointError(f'checkpoint of step {step} to {self.directory} failed: '
                            f'{type(e).__name__}: {str(e).splitlines()[0][:300]}') from e

  def _read(self, step, abstract_state, shards) -> _Attempt:
    """This process's part of a restore, without collectives (a failure cannot strand the others)."""
    folder, meta = self._step_dir(step), None
    try:
      meta = self.read_meta(step)
      mismatch = tree_mismatch(self._state_handler.metadata(folder / 'state').tree, abstract_state)
      if mismatch:
        return _Attempt(MISMATCH, mismatch, meta)
      state = self._state_handler.restore(folder / 'state', args=ocp.args.StandardRestore(abstract_state))
      data = self._read_data(folder / 'data', shards)
      return _Attempt(OK, '', meta, state, data)
    except DataLayoutMismatch as e:
      return _Attempt(MISMATCH, str(e), meta, data_layout=True)
    except Exception as e:  # pylint: disable=broad-except  (sorted into corrupt / failed, never ignored)
      return _Attempt(CORRUPT if proves_corruption(e) else FAILED, _describe(e))

  def _read_data(self, directory, shards) -> dict:
    if any(p.name.startswith('shard_') for p in directory.iterdir()):
      return _read_legacy_data(directory, shards)
    return _owned_data_states(self._json_handler.restore(directory, args=ocp.args.JsonRestore()), shards)

  def _verify(self, attempt: _Attempt) -> _Attempt:
    """The fingerprint check (a computation over all processes' devices)."""
    try:
      matches = verify_fingerprint(attempt.meta, attempt.state)
      if matches is None:  # Written before fingerprints: nothing to check against, no proof of damage.
        log.warning('checkpoint meta has no fingerprint; the restored state is not verified')
        return attempt
      if matches:
        return attempt
      return _Attempt(CORRUPT, 'the state does not match the fingerprint written with it (damaged or tampered files)')
    except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory: proves nothing)
      return _Attempt(FAILED, _describe(e))

  def _attempt(self, step, abstract_state, shards) -> _Attempt:
    """Reads and verifies `step`; every process ends with the same kind."""
    attempt = self._read(step, abstract_state, shards)
    kind = _worst(_seen(attempt, step))
    if kind == OK:
      attempt = self._verify(attempt)
      kind = _worst(_seen(attempt, step))
    if kind != attempt.kind:
      here = f'; here: {attempt.reason}' if attempt.reason else ''
      return _Attempt(kind, f'another process failed on it (see its log){here}', attempt.meta)
    return attempt

  def restore_latest_good(self, abstract_state, shards):
    """(state, data_state, meta, step) of the newest checkpoint that restores and matches its
    fingerprint, or None when there is no checkpoint. Proven-corrupt steps are moved aside, not
    deleted; StateMismatch, RestoreFailed and NothingRestorable otherwise (module docstring).
    shards: DataShards, the data shards this process reads."""
    moved = []
    step = from_process_0(max(self.steps(), default=-1))
    while step >= 0:
      attempt = self._attempt(step, abstract_state, shards)
      if attempt.kind == OK:
        return attempt.state, attempt.data, attempt.meta, step
      if attempt.kind == MISMATCH and attempt.data_layout:
        raise DataLayoutMismatch(f'checkpoint {step} in {self.directory} does not fit this run\'s data: '
                                 f'{attempt.reason} (nothing was moved)')
      if attempt.kind == MISMATCH:
        raise StateMismatch(step, attempt.reason, (attempt.meta or {}).get('config', {}))
      if attempt.kind == FAILED:
        raise RestoreFailed(f'could not restore checkpoint {step} from {self.directory}: {attempt.reason}; that does '
                            'not prove it corrupt, so nothing was moved: fix the cause and run again')
      moved.append(self._quarantine(step, attempt.reason))
      step = from_process_0(max((s for s in self.steps() if s < step), default=-1))
    if moved or from_process_0(int(bool(self.quarantined()))):
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
