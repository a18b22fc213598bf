"""Fault injection: each test causes one fault for real and checks what the run does about it.

Preemption (SIGTERM) and hard kills (SIGKILL) hit real `tmdm train` subprocesses; the rest run the
trainer in-process on the 8 simulated devices of tests/conftest.py."""

import glob
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tmdm import cli, errors
from tmdm.config import loader as config_loader
from tmdm.data import pipeline, store
from tmdm.training import checkpoint, goodput, loop as train, metrics, resilience, setup as setup_lib
from helpers import run_and_resumed_step

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(REPO, 'experiments', 'smoke.py')
pytestmark = pytest.mark.slow


def _overrides(**kv):
  return [f'--config.{k}={v}' for k, v in kv.items()]


def _cfg(data_root, **kv):
  cfg = config_loader.load(SMOKE, _overrides(**kv), num_devices=8)
  cfg.data.root = data_root
  cfg.train.progress = False
  return cfg


def _losses(workdir):
  return {r['step']: r['loss'] for r in metrics.read_jsonl(os.path.join(workdir, 'metrics.jsonl')) if 'loss' in r}


def _spawn(workdir, data_root, **kv):
  cmd = [sys.executable, '-m', 'tmdm.cli', 'train', f'--config={SMOKE}', f'--workdir={workdir}', '--host_devices=8',
         f'--config.data.root={data_root}', '--config.train.progress=false', *_overrides(**kv)]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _saved_steps(workdir):
  """Finished checkpoint steps, read from the folder (a second CheckpointManager on the same folder
  would start its own clean-up of temporary folders, racing the trainer's)."""
  folder = os.path.join(workdir, 'checkpoints')
  return sorted(int(d) for d in os.listdir(folder) if d.isdigit())


def _wait_for_step(workdir, step, proc, timeout=120):
  path = os.path.join(workdir, 'metrics.jsonl')
  end = time.time() + timeout
  while time.time() < end:
    if proc.poll() is not None:
      raise AssertionError(f'run ended early:\n{proc.stdout.read()[-3000:]}')
    if os.path.exists(path) and any(r.get('step', 0) >= step for r in metrics.read_jsonl(path)):
      return
    time.sleep(0.05)
  raise AssertionError(f'step {step} not reached')


LONG = {'train.num_steps': 400, 'train.log_every_steps': 1, 'checkpoint.every_steps': 50, 'train.eval_batches': 0}


def test_sigterm_checkpoints_and_exits_cleanly(text_data, tmp_path):
  workdir = str(tmp_path / 'run')
  proc = _spawn(workdir, text_data, **LONG)
  _wait_for_step(workdir, 5, proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert 'stopped by SIGTERM' in out
  saved = _saved_steps(workdir)
  assert len(saved) == 1 and 5 <= saved[0] < 400  # a checkpoint at the step it stopped, not a scheduled one
  stopped = saved[0]
  final = train.run(_cfg(text_data, **dict(LONG, **{'train.num_steps': stopped + 3})), workdir)
  assert 'loss' in final
  assert max(_losses(workdir)) == stopped + 3


def test_kill9_resumes_bitwise_from_last_complete_checkpoint(text_data, tmp_path):
  kv = {'train.num_steps': 16, 'train.log_every_steps': 1, 'checkpoint.every_steps': 2, 'checkpoint.keep': 20,
        'train.eval_batches': 0}
  straight = str(tmp_path / 'straight')
  train.run(_cfg(text_data, **kv), straight)
  rng = random.Random(os.getpid())
  for trial in range(2):
    workdir = str(tmp_path / f'killed{trial}')
    proc = _spawn(workdir, text_data, **kv)
    _wait_for_step(workdir, rng.randint(3, 10), proc)
    time.sleep(rng.random() * 0.3)  # a random moment, often inside an async checkpoint write
    proc.kill()
    proc.wait()
    saved = _saved_steps(workdir)
    last_logged = max(_losses(workdir))  # The killed run's log, before the resume drops its later rows.
    resumed = run_and_resumed_step(lambda: train.run(_cfg(text_data, **kv), workdir))
    a, b = _losses(straight), _losses(workdir)
    assert sorted(b) == list(range(1, 17))
    np.testing.assert_array_equal([b[s] for s in range(1, 17)], [a[s] for s in range(1, 17)])
    assert not saved or saved == sorted(saved)
    _check_goodput(workdir, restarts=1, lost_steps=last_logged - resumed)


def _check_goodput(workdir, *, restarts, lost_steps):
  """`tmdm goodput` against the run's own logs: the steps computed again, and causes that cover the
  wall time from the first start to the last row (what no row covers stays under 5%)."""
  s = goodput.summary(workdir)
  assert s['restarts'] == restarts and s['lost_steps'] == lost_steps
  assert (s['seconds']['lost'] > 0) == (lost_steps > 0)
  assert sum(s['seconds'].values()) == pytest.approx(s['wall_s']) and sum(s['share'].values()) == pytest.approx(1)
  assert abs(s['share']['unaccounted']) < 0.05, goodput.table(s)
  for cause in ('productive', 'startup', 'compile', 'checkpoint', 'data', 'idle'):
    assert s['seconds'][cause] > 0, cause
  out = os.path.join(workdir, 'timeline.png')
  assert cli.main(['goodput', workdir, f'--out={out}']) == 0
  with open(out, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def _largest_file(folder):
  return max(glob.glob(os.path.join(folder, '**', '*'), recursive=True), key=lambda p: os.path.getsize(p)
             if os.path.isfile(p) else -1)


@pytest.mark.parametrize('damage', ['truncate', 'tamper'])
def test_corrupt_checkpoint_falls_back_to_previous(text_data, tmp_path, damage):
  kv = {'train.num_steps': 8, 'train.log_every_steps': 1, 'checkpoint.every_steps': 4, 'train.eval_batches': 0}
  straight, broken = str(tmp_path / 'straight'), str(tmp_path / 'broken')
  train.run(_cfg(text_data, **kv), straight)
  train.run(_cfg(text_data, **kv), broken)
  target = _largest_file(os.path.join(broken, 'checkpoints', '8', 'state'))
  with open(target, 'rb+') as f:
    data = f.read()
    if damage == 'truncate':
      f.truncate(len(data) // 2)
    else:  # flip the low bits of a few bytes: no read error, only wrong values
      for i in range(len(data) // 3, len(data) // 3 + 64, 8):
        f.seek(i)
        f.write(bytes([data[i] ^ 0x01]))
  assert run_and_resumed_step(lambda: train.run(_cfg(text_data, **kv), broken)) == 4  # redoes 5..8
  assert [r['step'] for r in metrics.read_jsonl(os.path.join(broken, 'metrics.jsonl')) if 'loss' in r] == list(
      range(1, 9))  # The lines the corrupt step's run wrote after step 4 were dropped, then logged again.
  quarantined = os.listdir(os.path.join(broken, 'corrupt'))
  assert len(quarantined) == 1 and quarantined[0].startswith('8-')
  a, b = _losses(straight), _losses(broken)
  np.testing.assert_array_equal([b[s] for s in range(5, 9)], [a[s] for s in range(5, 9)])
  assert sorted(os.listdir(os.path.join(broken, 'checkpoints'))) == ['4', '8']


def test_nonfinite_steps_are_skipped_and_counted(text_data, tmp_path):
  kv = {'train.num_steps': 10, 'train.log_every_steps': 1, 'train.eval_batches': 0,
        'train.fault_nonfinite_steps': '(3, 4)'}
  train.run(_cfg(text_data, **kv), str(tmp_path))
  rows = {r['step']: r for r in metrics.read_jsonl(os.path.join(tmp_path, 'metrics.jsonl')) if 'nonfinite' in r}
  assert [rows[s]['nonfinite'] for s in range(1, 11)] == [0, 0, 0, 1, 1, 0, 0, 0, 0, 0]
  assert all(np.isfinite(rows[s]['loss']) for s in (1, 2, 3, 6, 10))
  # Skipped steps still count for the lr schedule: after them, every step's lr is the clean run's.
  clean = tmp_path / 'clean'
  train.run(_cfg(text_data, **dict(kv, **{'train.fault_nonfinite_steps': '()'})), str(clean))
  want = {r['step']: r for r in metrics.read_jsonl(os.path.join(clean, 'metrics.jsonl')) if 'nonfinite' in r}
  assert len({want[s]['lr'] for s in range(6, 11)}) == 5  # The lr moves every step, so a lag would show.
  np.testing.assert_allclose([rows[s]['lr'] for s in range(6, 11)], [want[s]['lr'] for s in range(6, 11)],
                             rtol=1e-6)


def test_nonfinite_streak_stops_with_last_good_checkpoint(text_data, tmp_path):
  kv = {'train.num_steps': 20, 'checkpoint.every_steps': 4, 'train.eval_batches': 0,
        'train.max_nonfinite_streak': 3, 'train.fault_nonfinite_steps': '(6, 7, 8, 9, 10)'}
  with pytest.raises(resilience.NonFiniteError, match='3 consecutive steps'):
    train.run(_cfg(text_data, **kv), str(tmp_path))
  assert os.listdir(os.path.join(tmp_path, 'checkpoints')) == ['4']  # 8 fell inside the streak


def test_nonfinite_streak_rolls_back_with_new_data_seed(text_data, tmp_path):
  kv = {'train.num_steps': 14, 'checkpoint.every_steps': 4, 'train.eval_batches': 0, 'train.log_every_steps': 1,
        'train.max_nonfinite_streak': 3, 'train.fault_nonfinite_steps': '(6, 7, 8, 9)', 'train.rollbacks': 1}
  final = train.run(_cfg(text_data, **kv), str(tmp_path))
  assert np.isfinite(final['loss']) and max(_losses(str(tmp_path))) == 14


def test_failed_checkpoint_stops_or_warns(text_data, tmp_path, monkeypatch):
  kv = {'train.num_steps': 8, 'checkpoint.every_steps': 2, 'train.eval_batches': 0, 'train.log_every_steps': 1}
  real_save = checkpoint.Checkpointer.save

  def disk_full_after_4(self, step, *args, **kwargs):
    if step > 4:
      raise checkpoint.CheckpointError(f'checkpoint of step {step} failed: OSError: [Errno 28] No space left')
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(checkpoint.Checkpointer, 'save', disk_full_after_4)
  with pytest.raises(checkpoint.CheckpointError, match='No space left'):
    train.run(_cfg(text_data, **kv), str(tmp_path / 'stop'))
  assert sorted(os.listdir(tmp_path / 'stop' / 'checkpoints')) == ['2', '4']
  final = train.run(_cfg(text_data, **dict(kv, **{'checkpoint.on_error': 'warn'})), str(tmp_path / 'warn'))
  assert final['checkpoint/failed_saves'] == 2  # steps 6 and 8, reported in the metrics


def test_unwritable_checkpoint_folder_is_one_clear_error(text_data, tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  with pytest.raises(checkpoint.CheckpointError, match='cannot use checkpoint folder'):
    train.run(_cfg(text_data, **{'checkpoint.dir': str(blocker / 'ckpt')}), str(tmp_path / 'run'))


def _copy_data(text_data, tmp_path):
  root = str(tmp_path / 'data')
  shutil.copytree(text_data, root)
  return root


def test_bad_token_shards(text_data, tmp_path):
  root = _copy_data(text_data, tmp_path)
  shard = os.path.join(root, 'fortunes-smoke', 'train', '00001', 'text', 'values', 'c', '0')
  with open(shard, 'rb+') as f:  # a truncated chunk: its records cannot be read
    f.truncate(os.path.getsize(shard) // 3)
  vocab = setup_lib.build(_cfg(root)).vocab
  skips = pipeline.SkipCounter(max_fraction=1.0)
  rows = pipeline.text_dataset(os.path.join(root, 'fortunes-smoke'), 'train', vocab, seq_len=64, seed=0,
                               repeat=False, skips=skips)
  assert sum(1 for _ in rows) > 0
  # Records whose ids lie in the cut part of the chunk (most of the 700 of shard 1) are lost, no others.
  assert 300 < skips.counts['unreadable'] <= 700 and set(skips.counts) == {'unreadable'}
  assert 'train/00001/text' in skips.examples['unreadable']
  with pytest.raises(store.DataError, match=r'records were bad .*train/00001/text'):
    train.run(_cfg(root, **{'train.num_steps': 40}), str(tmp_path / 'run'))  # default 1% limit
  shutil.rmtree(os.path.join(root, 'fortunes-smoke', 'train', '00002'))
  with pytest.raises(errors.ConfigError, match='missing shard array .*train/00002'):
    train.run(_cfg(root), str(tmp_path / 'run2'))


def test_ids_out_of_range_and_empty_documents_are_counted(tmp_path):
  root = str(tmp_path / 'bad')
  records = [{'text': np.array([1, 2, 3])}, {'text': np.array([], np.int32)}, {'text': np.array([5, 9999])}] * 50
  store.write_manifest(root, modality='text', fields=['text'], source={},
                       tokenizers={'text': {'vocab_size': 512, 'sha256': 'x'}},
                       splits={'train': [store.write_shard(os.path.join(root, 'train', '0'), records, ['text'])]})
  vocab = setup_lib.build(_cfg(str(tmp_path))).vocab
  skips = pipeline.SkipCounter(max_fraction=1.0)
  list(pipeline.text_dataset(root, 'train', vocab, seq_len=16, seed=0, repeat=False, skips=skips))
  assert skips.counts == {'empty': 50, 'out_of_range': 50} and skips.seen == 150


def test_missing_dataset_fails_before_compiling(tmp_path):
  start = time.time()
  with pytest.raises(errors.ConfigError, match='manifest.json is missing'):
    train.run(_cfg(str(tmp_path / 'nowhere')), str(tmp_path / 'run'))
  assert time.time() - start < 5 and not os.path.exists(tmp_path / 'run')


def test_tokenizer_hash_mismatch_with_checkpoint(text_data, tmp_path):
  root = _copy_data(text_data, tmp_path)
  kv = {'train.num_steps': 2, 'checkpoint.every_steps': 2, 'train.eval_batches': 0}
  train.run(_cfg(root, **kv), str(tmp_path / 'run'))
  manifest_path = os.path.join(root, 'fortunes-smoke', 'manifest.json')
  with open(manifest_path) as f:
    text = f.read()
  sha = store.read_manifest(os.path.join(root, 'fortunes-smoke'))['tokenizers']['text']['sha256']
  with open(manifest_path, 'w') as f:
    f.write(text.replace(sha, '0' * 64))
  with pytest.raises(errors.ConfigError, match='tokenizer of the text data .* is not the one the checkpoint'):
    train.run(_cfg(root, **dict(kv, **{'train.num_steps': 4})), str(tmp_path / 'run'))


def test_same_seed_gives_bitwise_identical_runs(text_data, tmp_path):
  kv = {'train.num_steps': 6, 'train.log_every_steps': 1, 'train.eval_batches': 0}
  train.run(_cfg(text_data, **kv), str(tmp_path / 'a'))
  train.run(_cfg(text_data, **kv), str(tmp_path / 'b'))
  a, b = _losses(str(tmp_path / 'a')), _losses(str(tmp_path / 'b'))
  assert list(a.values()) == list(b.values()) and len(a) == 6


def test_goodput_of_a_restart_that_found_no_checkpoint(tmp_path):
  """A run killed before its first checkpoint completed restarts from step 0 and its rows are dropped
  from the log: the restart row still carries the first start, so the wall time covers the lost work.
  (Under load, the kill-9 test above once hit this: lost 7.5 s against a wall of 5.5 s.)"""
  workdir = str(tmp_path)
  first = metrics.MetricWriter(workdir, tensorboard=False)
  for step in (1, 2, 3):  # The killed attempt: started at t=100, one second per step.
    first.write(step, {'loss': 1.0, 'goodput/productive_s': 1.0, 'goodput/time': 100.0 + step,
                       'goodput/run_start': 100.0})
  first.close()
  restart = goodput.restart_row(workdir, 0, now=110.0)
  second = metrics.MetricWriter(workdir, tensorboard=False, start_step=0)  # drops the steps after 0
  second.write(0, restart)
  second.write(1, {'loss': 1.0, 'goodput/productive_s': 1.0, 'goodput/time': 111.0, 'goodput/run_start': 110.0})
  second.close()
  s = goodput.summary(workdir)
  assert s['restarts'] == 1 and s['lost_steps'] == 3
  assert s['wall_s'] == pytest.approx(11.0)  # from the first start (100) to the last row (111)
  assert s['seconds']['lost'] == pytest.approx(3.0) and s['seconds']['idle'] == pytest.approx(7.0)
  assert abs(s['seconds']['unaccounted']) < 1e-6
