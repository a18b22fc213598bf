"""A real multi-process job on this machine: 2 processes x 4 simulated CPU devices, a localhost
coordinator and gloo collectives. It trains, checkpoints, resumes and must match 1 process x 8
devices step for step (data.num_shards=2 fixes the data order across process counts)."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tmdm.config import loader as config_loader
from tmdm.training import loop as train, metrics
from helpers import REPO, run_and_resumed_step

SMOKE = os.path.join(REPO, 'experiments', 'smoke.py')
KV = {'train.num_steps': 6, 'train.log_every_steps': 1, 'checkpoint.every_steps': 3, 'train.eval_batches': 1,
      'data.num_shards': 2, 'model.compute_dtype': 'float32', 'train.progress': 'false'}


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _start(args, processes=2):
  """`python -m tmdm.cli ARGS` as one process on 8 devices or as 2 processes x 4 on a localhost
  coordinator."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  if processes == 1:
    cmds = [args + ['--host_devices=8']]
  else:
    port = _free_port()
    cmds = [args + ['--host_devices=4', f'--coordinator=localhost:{port}', '--num_processes=2', f'--process_id={i}']
            for i in range(2)]
  return [subprocess.Popen([sys.executable, '-m', 'tmdm.cli', *c], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True) for c in cmds]


def _start_two(workdir, data_root, kv):
  return _start(['train', f'--config={SMOKE}', f'--workdir={workdir}', f'--config.data.root={data_root}',
                 *[f'--config.{k}={v}' for k, v in kv.items()]])


def _two_processes(workdir, data_root, kv=None):
  procs = _start_two(workdir, data_root, kv or KV)
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


def _rows(workdir):
  """(step -> training row, step -> evaluation row); a resumed run's rows replace earlier ones."""
  rows = metrics.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  return ({r['step']: r for r in rows if 'loss' in r}, {r['step']: r for r in rows if 'eval/loss' in r})


def _keep_checkpoints(workdir, up_to):
  """As if the run had been killed right after checkpoint `up_to`: later checkpoints removed."""
  folder = os.path.join(workdir, 'checkpoints')
  for name in os.listdir(folder):
    if name.isdigit() and int(name) > up_to:
      shutil.rmtree(os.path.join(folder, name))


def _assert_nothing_quarantined(workdir):
  assert not os.path.exists(os.path.join(workdir, 'corrupt')), os.listdir(os.path.join(workdir, 'corrupt'))


@pytest.mark.slow
def test_resumes_across_process_counts_and_meshes_continue_the_run(text_data, tmp_path):
  """One run, 9 steps on 1 process x 8 devices (mesh data 2, fsdp 4; checkpoints at 3, 6, 9), is
  the reference. Resumed from its step 3 on 2 processes x 4 devices (same mesh), from its step 6 on
  2 x 4 with another mesh (2, 2, 2), and from the 2-process run's step 6 back on 1 x 8: each says the
  step it resumed from, quarantines nothing (the fingerprint is exact on every topology) and
  continues with the reference's losses (the masks are drawn from seed, step and row only)."""
  kv = dict(KV, **{'train.num_steps': 9, 'checkpoint.keep': 5, 'mesh.data': 2, 'mesh.fsdp': 4})
  single = str(tmp_path / 'single')
  cfg = config_loader.load(SMOKE, [f'--config.{k}={v}' for k, v in kv.items()], num_devices=8)
  cfg.data.root = text_data
  train.run(cfg, single)
  ref, ref_eval = _rows(single)

  def assert_continues(workdir, after):
    got, got_eval = _rows(workdir)
    np.testing.assert_allclose([got[s]['loss'] for s in range(after + 1, 10)],
                               [ref[s]['loss'] for s in range(after + 1, 10)], rtol=2e-5)
    np.testing.assert_allclose(got_eval[9]['eval/loss'], ref_eval[9]['eval/loss'], rtol=2e-5)
    _assert_nothing_quarantined(workdir)

  same = str(tmp_path / 'same_mesh')
  shutil.copytree(single, same)
  _keep_checkpoints(same, 3)
  outs = _two_processes(same, text_data, kv)
  assert 'process 1 of 2, 4 local / 8 global devices' in outs[1]
  assert all('resumed from step 3 ' in out for out in outs), outs[0][-3000:]
  assert_continues(same, 3)

  other = str(tmp_path / 'other_mesh')
  shutil.copytree(single, other)
  _keep_checkpoints(other, 6)
  outs = _two_processes(other, text_data, dict(kv, **{'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}))
  assert all('resumed from step 6 ' in out for out in outs), outs[0][-3000:]
  assert_continues(other, 6)

  _keep_checkpoints(same, 6)  # Written by 2 processes: back on one.
  assert _resume_in_process(same, cfg) == 6
  assert_continues(same, 6)


def _resume_in_process(workdir, cfg):
  return run_and_resumed_step(lambda: train.run(cfg, workdir))


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_after_the_same_step(text_data, tmp_path):
  """Only process 1 gets SIGTERM: both stop after the same step (their votes meet in the train
  step), save one checkpoint together, exit 0, and the next launch resumes from it."""
  workdir = str(tmp_path / 'run')
  kv = dict(KV, **{'train.num_steps': 400, 'checkpoint.every_steps': 1000, 'train.eval_batches': 0})
  procs = _start_two(workdir, text_data, kv)
  metrics_file = os.path.join(workdir, 'metrics.jsonl')
  end = time.time() + 300
  while not (os.path.exists(metrics_file) and metrics.read_jsonl(metrics_file)):
    assert time.time() < end and all(p.poll() is None for p in procs), 'training did not start'
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  stopped = [int(re.search(r'stopped by (.+?) after step (\d+)', out).group(2)) for out in outs]
  assert 'stopped by SIGTERM' in outs[1] and 'stopped by a signal to another process' in outs[0]
  assert stopped[0] == stopped[1] < 400
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  assert saved == [stopped[0]]
  outs = _two_processes(workdir, text_data, dict(kv, **{'train.num_steps': stopped[0] + 2}))
  assert f'resumed from step {stopped[0]}' in outs[0]


def _eval_json(workdir, out, processes):
  """`tmdm eval` (validation ELBO and text infilling) on 1 process x 8 devices or 2 x 4."""
  procs = _start(['eval', f'--workdir={workdir}', f'--out={out}', '--config.eval.tasks=elbo,text_infill',
                  '--config.eval.num=6'], processes)
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0] * processes, outs[-1][-3000:]
  with open(out) as f:
    return json.load(f)


@pytest.mark.slow
def test_two_process_eval_matches_one(text_data, tmp_path):
  workdir = str(tmp_path / 'run')
  cfg = config_loader.load(SMOKE, [f'--config.{k}={v}' for k, v in KV.items()], num_devices=8)
  cfg.data.root = text_data
  train.run(cfg, workdir)
  one = _eval_json(workdir, str(tmp_path / 'one.json'), 1)
  two = _eval_json(workdir, str(tmp_path / 'two.json'), 2)
  assert one.keys() == two.keys() and 'eval/text/joint/loss/text' in one and 'text/infill_token_acc' in one
  for k, v in one.items():
    if isinstance(v, float) and not k.endswith(('seconds', '_per_s')):  # timings differ
      np.testing.assert_allclose(two[k], v, rtol=2e-5, err_msg=k)


@pytest.mark.slow
def test_hosts_with_different_tokenizers_refuse_to_train(text_data, tmp_path):
  """Each host prepared its own copy and one tokenizer differs: both processes stop with one line
  before compiling anything."""
  other = tmp_path / 'other'
  shutil.copytree(text_data, other)
  manifest = other / 'fortunes-smoke' / 'manifest.json'
  m = json.loads(manifest.read_text())
  m['tokenizers']['text']['sha256'] = '0' * 64  # As if trained on another sample.
  manifest.write_text(json.dumps(m))
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  procs = [subprocess.Popen([sys.executable, '-m', 'tmdm.cli', 'train', f'--config={SMOKE}',
                             f'--workdir={tmp_path / "run"}', f'--config.data.root={root}', '--host_devices=4',
                             f'--coordinator=localhost:{port}', '--num_processes=2', f'--process_id={i}',
                             *[f'--config.{k}={v}' for k, v in KV.items()]],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i, root in enumerate((text_data, str(other)))]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 2, out[-3000:]
    assert 'processes [1] read datasets (text) tokenized by other tokenizers than process 0' in out, out[-3000:]
  assert not (tmp_path / 'run' / 'checkpoints').exists()


@pytest.mark.slow
def test_two_process_export_writes_the_bytes_of_one(text_data, tmp_path):
  """`tmdm export` of an FSDP run (every weight split across both processes): 2 processes x 4 devices
  gather leaf by leaf and process 0 writes the same files as 1 process x 8 devices, several
  safetensors files included."""
  workdir = str(tmp_path / 'run')
  cfg = config_loader.load(SMOKE + ':mesh181', [f'--config.{k}={v}' for k, v in KV.items()], num_devices=8)
  cfg.data.root = text_data
  train.run(cfg, workdir)
  folders = []
  for n in (1, 2):
    out = str(tmp_path / f'export{n}')
    procs = _start(['export', f'--workdir={workdir}', f'--out={out}', '--max_shard_mb=0.1'], processes=n)
    for p in procs:
      text = p.communicate(timeout=600)[0]
      assert p.returncode == 0, text[-3000:]
    folders.append(out)
  names = sorted(os.listdir(folders[0]))
  assert names == sorted(os.listdir(folders[1]))
  assert len([n for n in names if n.endswith('.safetensors')]) > 2
  for name in names:
    with open(os.path.join(folders[0], name), 'rb') as a, open(os.path.join(folders[1], name), 'rb') as b:
      assert a.read() == b.read(), name
