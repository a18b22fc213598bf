"""Restores that never lose a run: only proven damage moves a checkpoint aside; a config change, a
read error or a memory error stops the run with one line and moves nothing; a run whose every
checkpoint is corrupt stops instead of starting over (unless checkpoint.allow_fresh_start).

The end-to-end tests start from copies of one 4-step run with checkpoints at steps 2 and 4, and
assert the step each resume started from (metrics.jsonl: the first row a run writes is step + 1).
A truncated array file falling back to the previous step: test_faults.py."""

import errno
import json
import os
import shutil

import orbax.checkpoint as ocp
import pytest

from tmdm import errors
from tmdm.config import checks as config_checks, loader as config_loader
from tmdm.data import shards as shards_lib
from tmdm.generation import generate
from tmdm.training import checkpoint, loop as train, metrics
from helpers import run_and_resumed_step
from test_faults import SMOKE, _cfg, _largest_file

BASE = {'train.num_steps': 4, 'train.log_every_steps': 1, 'checkpoint.every_steps': 2, 'checkpoint.keep': 3,
        'train.eval_batches': 0}


@pytest.fixture(scope='module')
def two_checkpoints(text_data, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('base') / 'run')
  train.run(_cfg(text_data, **BASE), workdir)
  return workdir


@pytest.fixture
def run_dir(two_checkpoints, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(two_checkpoints, workdir)
  return workdir


def _resume(text_data, workdir, **kv):
  """Runs on in `workdir`; returns the step it started from (0: from scratch)."""
  return run_and_resumed_step(lambda: train.run(_cfg(text_data, **dict(BASE, **kv)), workdir))


def _checkpoints(workdir):
  return sorted(os.listdir(os.path.join(workdir, 'checkpoints')))


def _quarantined(workdir):
  folder = os.path.join(workdir, 'corrupt')
  return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def _truncate(path):
  with open(path, 'rb+') as f:
    f.truncate(os.path.getsize(path) // 2)


def _wrapped(e):
  """As Orbax raises TensorStore errors: a bare Exception caused by them."""
  wrapped = Exception('Encountered error while reading array index')
  wrapped.__cause__ = e
  return wrapped


@pytest.mark.parametrize('error, corrupt', [
    (_wrapped(ValueError('OUT_OF_RANGE: Error reading "params.w/0.0": Requested byte range [0, 9) is not valid')), True),
    (ValueError('DATA_LOSS: Error decoding manifest'), True),
    (ValueError('NOT_FOUND: Metadata at "step/.zarray" does not exist'), True),
    (ValueError('FAILED_PRECONDITION: Error reading "params.w/0.0": Truncated Zstd-compressed stream'), True),
    (FileNotFoundError('Metadata file (named _METADATA) does not exist'), True),
    (json.JSONDecodeError('Expecting value', '{', 0), True),
    (OSError(errno.EIO, 'Input/output error'), False),
    (PermissionError(errno.EACCES, 'Permission denied'), False),
    (MemoryError(), False),
    (_wrapped(ValueError('RESOURCE_EXHAUSTED: Out of memory allocating 4GiB')), False),
    (ValueError('UNAVAILABLE: connection reset'), False),
    (ValueError('FAILED_PRECONDITION: generation mismatch'), False),
    (ValueError('something Orbax did not expect'), False),
    (KeyError('state'), False),
])
def test_only_proven_damage_counts_as_corruption(error, corrupt):
  assert checkpoint.proves_corruption(error) == corrupt


def test_damage_next_to_a_transient_error_is_not_proof():
  error = _wrapped(FileNotFoundError('shard missing'))
  error.__cause__.__context__ = OSError(errno.ETIMEDOUT, 'Connection timed out')
  assert not checkpoint.proves_corruption(error)


def test_execution_only_keys_do_not_block_a_resume():
  cfg = _cfg('unused', **{'model.remat': 'full', 'model.loss_chunk': 16, 'model.attention_impl': 'xla'})
  saved = config_loader.load(SMOKE, num_devices=8).to_dict()
  shards = shards_lib.DataShards((0,), 1)
  train._check_resumable({'config': saved}, cfg, {}, shards, 'ckpt')  # pylint: disable=protected-access
  assert config_checks.changed_keys(saved, cfg, config_checks.STATE_SECTIONS) == []
  cfg.model.scan_layers = True  # Not execution-only: nn.scan stacks the parameters.
  with pytest.raises(errors.ConfigError, match='model.scan_layers=False'):
    train._check_resumable({'config': saved}, cfg, {}, shards, 'ckpt')  # pylint: disable=protected-access


@pytest.mark.slow
def test_changed_optimizer_state_is_one_config_line_and_moves_nothing(text_data, run_dir):
  with pytest.raises(errors.ConfigError, match=r'optim\.ema \(0\.0 in the checkpoint, 0\.999 now\)') as e:
    train.run(_cfg(text_data, **dict(BASE, **{'train.num_steps': 6, 'optim.ema': 0.999})), run_dir)
  assert '\n' not in str(e.value) and 'nothing was moved' in str(e.value)
  assert 'optim.lr' not in str(e.value)  # Only the keys that differ are named.
  assert _checkpoints(run_dir) == ['2', '4'] and _quarantined(run_dir) == []


@pytest.mark.slow
def test_read_error_fails_the_run_and_moves_nothing(text_data, run_dir, monkeypatch):
  real_restore, calls = ocp.StandardCheckpointHandler.restore, []

  def eio_once(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 1:
      raise OSError(errno.EIO, 'Input/output error')
    return real_restore(self, *args, **kwargs)

  monkeypatch.setattr(ocp.StandardCheckpointHandler, 'restore', eio_once)
  with pytest.raises(checkpoint.RestoreFailed) as e:
    train.run(_cfg(text_data, **dict(BASE, **{'train.num_steps': 6})), run_dir)
  message = str(e.value)
  assert 'checkpoint 4' in message and os.path.join(run_dir, 'checkpoints') in message
  assert 'Input/output error' in message and 'nothing was moved' in message and '\n' not in message
  assert _checkpoints(run_dir) == ['2', '4'] and _quarantined(run_dir) == []
  assert _resume(text_data, run_dir, **{'train.num_steps': 6}) == 4  # The error has passed: nothing was lost.


@pytest.mark.slow
def test_all_checkpoints_corrupt_stops_unless_fresh_start_is_allowed(text_data, run_dir):
  for step in ('2', '4'):
    _truncate(_largest_file(os.path.join(run_dir, 'checkpoints', step, 'state')))
  for attempt in range(2):  # The second run finds no checkpoint, only the quarantined ones: it stops too.
    with pytest.raises(checkpoint.NothingRestorable, match='allow_fresh_start=true') as e:
      train.run(_cfg(text_data, **BASE), run_dir)
    assert '\n' not in str(e.value)
    assert [q.split('-')[0] for q in _quarantined(run_dir)] == ['2', '4'] and _checkpoints(run_dir) == []
  assert _resume(text_data, run_dir, **{'checkpoint.allow_fresh_start': 'true'}) == 0
  assert _checkpoints(run_dir) == ['2', '4']


@pytest.mark.slow
def test_execution_only_changes_resume(text_data, run_dir):
  assert _resume(text_data, run_dir, **{'train.num_steps': 6, 'model.remat': 'full'}) == 4
  assert _resume(text_data, run_dir, **{'train.num_steps': 8, 'train.microbatches': 2}) == 6
  assert _quarantined(run_dir) == []


@pytest.mark.slow
def test_two_processes_restore_the_same_step_when_only_one_sees_damage(text_data, tmp_path):
  from test_multiprocess import _two_processes  # pylint: disable=import-outside-toplevel  (tests/, not this folder)
  workdir = str(tmp_path / 'multi')
  _two_processes(workdir, text_data)  # 6 steps, checkpoints at 3 and 6, data.num_shards=2
  # Hosts read different files only in the legacy data layout (one file per data shard; the standard
  # item is one JSON file every process reads, and OCDBT array files are shared too): rewrite
  # checkpoint 6's data item into it, and damage the file only process 1 reads.
  data_dir = os.path.join(workdir, 'checkpoints', '6', 'data')
  _to_legacy_data(data_dir)
  with open(os.path.join(data_dir, 'shard_1-of-2.json'), 'w', encoding='utf-8') as f:
    f.write('{"cut short')
  outs = _two_processes(workdir, text_data)
  assert all('resumed from step 3' in out for out in outs), outs[1][-3000:]
  assert [q.split('-')[0] for q in _quarantined(workdir)] == ['6']
  assert 'process 1, checkpoint 6: JSONDecodeError' in outs[1] and 'process 0, checkpoint 6:' not in outs[0]  # Seen
  # by process 1 alone,
  assert 'checkpoint 6 is corrupt' in outs[0] and 'moved to' not in outs[1]  # and process 0 alone moves it.


def _to_legacy_data(data_dir):
  """Rewrites a checkpoint's standard JSON data item as the legacy shard_I-of-N.json files."""
  with open(os.path.join(data_dir, 'metadata'), encoding='utf-8') as f:
    item = json.load(f)
  os.remove(os.path.join(data_dir, 'metadata'))
  for shard, state in item['shards'].items():
    with open(os.path.join(data_dir, f'shard_{shard}-of-{item["num_shards"]}.json'), 'w', encoding='utf-8') as f:
      json.dump(state, f)
  return item['num_shards']


def _metric_rows(workdir, after):
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8')]
  return [(r['step'], r['loss']) for r in rows if r.get('step', 0) > after and 'loss' in r]


@pytest.mark.slow
def test_legacy_per_shard_data_item_resumes_like_the_standard_one(text_data, run_dir, tmp_path):
  """Checkpoints written before the data item was standard JSON held one shard_I-of-N.json per data
  shard: rewritten into that layout, checkpoint 4 resumes from step 4 with the same data order (the
  same losses at steps 5 and 6) as the untouched copy."""
  standard = str(tmp_path / 'standard')
  shutil.copytree(run_dir, standard)
  assert _to_legacy_data(os.path.join(run_dir, 'checkpoints', '4', 'data')) == 1
  assert _resume(text_data, run_dir, **{'train.num_steps': 6}) == 4
  assert _resume(text_data, standard, **{'train.num_steps': 6}) == 4
  legacy, want = _metric_rows(run_dir, 4), _metric_rows(standard, 4)
  assert [s for s, _ in want] == [5, 6] and legacy == want
  assert _quarantined(run_dir) == []


@pytest.mark.slow
def test_a_writer_that_fails_to_close_does_not_lose_the_last_checkpoint(text_data, tmp_path, monkeypatch):
  """The metric writer's close raises (a TensorBoard upload that times out): the saver still waits
  for the background save of the last step, which is committed and restorable; the error is raised
  after that."""
  def timed_out(self):
    raise OSError(errno.ETIMEDOUT, 'upload timed out')
  monkeypatch.setattr(metrics.MetricWriter, 'close', timed_out)
  workdir = str(tmp_path / 'run')
  with pytest.raises(OSError, match='upload timed out'):
    train.run(_cfg(text_data, **dict(BASE, **{'train.num_steps': 3, 'checkpoint.every_steps': 3,
                                              'checkpoint.async_save': 'true'})), workdir)
  assert _checkpoints(workdir) == ['3']  # Committed: no temporary folder left.
  monkeypatch.undo()
  assert _resume(text_data, workdir, **{'train.num_steps': 4}) == 3


@pytest.mark.slow
def test_a_refused_resume_leaves_the_run_as_it_was(text_data, run_dir):
  """A resume refused for a changed model rewrites nothing: config.json keeps its bytes, and sampling
  and evaluation (which read the config saved with the checkpoint) still open the run."""
  with open(os.path.join(run_dir, 'config.json'), 'rb') as f:
    before = f.read()
  with pytest.raises(errors.ConfigError, match='model.d_model=64 but the config says 32'):
    train.run(_cfg(text_data, **dict(BASE, **{'model.d_model': 32})), run_dir)
  with open(os.path.join(run_dir, 'config.json'), 'rb') as f:
    assert f.read() == before
  ctx = generate.Context.from_workdir(run_dir, ['--config.mesh.data=-1'])
  assert ctx.step == 4 and ctx.cfg.model.d_model == 64
  # Even a config.json edited by hand cannot make the checkpoint unreadable: its own config rules.
  edited = json.loads(before)
  edited['model']['d_model'] = 32
  with open(os.path.join(run_dir, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(edited, f)
  assert generate.Context.from_workdir(run_dir).cfg.model.d_model == 64
  assert _quarantined(run_dir) == []


@pytest.mark.slow
@pytest.mark.parametrize('newest_meta', ['readable', 'unreadable'])
def test_changed_num_shards_is_one_line_and_moves_nothing(text_data, run_dir, newest_meta):
  """data.num_shards changed: one line naming the key, nothing moved, also when the newest step's
  meta cannot be read (then the older step's meta names it; its data item must not pass for damage)."""
  if newest_meta == 'unreadable':
    with open(os.path.join(run_dir, 'checkpoints', '4', 'meta', 'metadata'), 'w', encoding='utf-8') as f:
      f.write('{"cut short')
  with pytest.raises(errors.ConfigError, match=r'data shards, this run has 2: set --config.data.num_shards=1') as e:
    train.run(_cfg(text_data, **dict(BASE, **{'data.num_shards': 2})), run_dir)
  assert '\n' not in str(e.value)
  assert _checkpoints(run_dir) == ['2', '4'] and _quarantined(run_dir) == []


def test_data_layout_change_is_a_mismatch_not_damage():
  """Below the config check: a data item of another shard count raises DataLayoutMismatch, which no
  restore counts as proof of damage."""
  item = {'num_shards': 1, 'shards': {'0': {'x': 1}}}
  with pytest.raises(checkpoint.DataLayoutMismatch, match='set --config.data.num_shards=1') as e:
    checkpoint._owned_data_states(item, shards_lib.DataShards((0,), 2))  # pylint: disable=protected-access
  assert not checkpoint.proves_corruption(e.value)


def test_changed_mixture_components_are_one_config_line():
  saved = config_loader.load(SMOKE, num_devices=8).to_dict()
  cfg = _cfg('unused')
  cfg.data.mix_image = 0.3
  with pytest.raises(errors.ConfigError, match=r'data.mix_image \(0.0 in the checkpoint, 0.3 now\)'):
    train._check_resumable({'config': saved}, cfg, {}, shards_lib.DataShards((0,), 1), 'ckpt')  # pylint: disable=protected-access
  cfg.data.mix_image, cfg.data.mix_text = 0.0, 0.5  # Weights of the same components may change.
  train._check_resumable({'config': saved}, cfg, {}, shards_lib.DataShards((0,), 1), 'ckpt')  # pylint: disable=protected-access


@pytest.mark.slow
def test_a_checkpoint_steps_metrics_row_is_on_file_before_its_save(text_data, tmp_path, monkeypatch):
  """A kill between the save and the next row cannot lose the checkpoint step's row: when a save
  starts, the metrics file already holds that step's training row (and its evaluation row)."""
  seen, real_save = {}, checkpoint.Checkpointer.save

  def save(self, step, *args, **kwargs):
    rows = metrics.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
    seen[step] = ({r['step'] for r in rows if 'loss' in r}, {r['step'] for r in rows if 'eval/loss' in r})
    return real_save(self, step, *args, **kwargs)
  monkeypatch.setattr(checkpoint.Checkpointer, 'save', save)
  workdir = str(tmp_path / 'run')
  train.run(_cfg(text_data, **dict(BASE, **{'train.eval_every_steps': 2, 'train.eval_batches': 1})), workdir)
  assert sorted(seen) == [2, 4]
  assert 2 in seen[2][0] and 2 in seen[2][1] and 4 in seen[4][0]  # Step 4 is the last: its evaluation comes after.
