"""A real multi-process job on this machine: 2 processes x 4 simulated CPU devices, a localhost
coordinator and gloo collectives. It trains, checkpoints, resumes and must match 1 process x 8
devices step for step (data.num_shards=2 fixes the data order across process counts)."""

import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from tmdm import config_lib, metrics, train
from helpers import REPO

SMOKE = os.path.join(REPO, 'experiments', 'smoke.py')
KV = {'train.num_steps': 6, 'train.log_every_steps': 1, 'checkpoint.every_steps': 3, 'train.eval_batches': 1,
      'data.num_shards': 2, 'model.compute_dtype': 'float32', 'train.progress': 'false'}


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _two_processes(workdir, data_root):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'tmdm.cli', 'train', f'--config={SMOKE}', f'--workdir={workdir}', '--host_devices=4',
       f'--coordinator=localhost:{port}', '--num_processes=2', f'--process_id={i}',
       f'--config.data.root={data_root}', *[f'--config.{k}={v}' for k, v in KV.items()]],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


def _rows(workdir):
  """(step -> training row, step -> evaluation row); a resumed run's rows replace earlier ones."""
  rows = metrics.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  return ({r['step']: r for r in rows if 'loss' in r}, {r['step']: r for r in rows if 'eval/loss' in r})


@pytest.mark.slow
def test_two_processes_match_one(text_data, tmp_path):
  single = str(tmp_path / 'single')
  cfg = config_lib.load(SMOKE, [f'--config.{k}={v}' for k, v in KV.items()], num_devices=8)
  cfg.data.root = text_data
  train.run(cfg, single)

  multi = str(tmp_path / 'multi')
  outs = _two_processes(multi, text_data)
  assert 'process 1 of 2, 4 local / 8 global devices' in outs[1]
  shutil.rmtree(os.path.join(multi, 'checkpoints', '6'))  # as if killed after the step-3 checkpoint
  outs = _two_processes(multi, text_data)
  assert 'resumed from step 3' in outs[0]
  (a, a_eval), (b, b_eval) = _rows(single), _rows(multi)
  np.testing.assert_allclose([b[s]['loss'] for s in range(1, 7)], [a[s]['loss'] for s in range(1, 7)], rtol=2e-5)
  np.testing.assert_allclose(b_eval[6]['eval/loss'], a_eval[6]['eval/loss'], rtol=2e-5)
