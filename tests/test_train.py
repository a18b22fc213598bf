"""End-to-end: the trainer on the 8-device simulated mesh (real data, real checkpoints)."""

import math
import os
import shutil

import numpy as np
import pytest

from tmdm.config import loader as config_loader
from tmdm.training import loop as train, metrics
from helpers import REPO

SMOKE = os.path.join(REPO, 'experiments', 'smoke.py')


def _cfg(text_data, preset='', **overrides):
  args = [f'--config.{k}={v}' for k, v in overrides.items()]
  cfg = config_loader.load(SMOKE + (f':{preset}' if preset else ''), args, num_devices=8)
  cfg.data.root = text_data
  cfg.train.progress = False
  return cfg


def _losses(workdir):
  """step -> training loss; later lines (a resumed run) replace earlier ones."""
  return {r['step']: r['loss'] for r in metrics.read_jsonl(os.path.join(workdir, 'metrics.jsonl')) if 'loss' in r}


@pytest.mark.slow
def test_smoke_run_lowers_text_loss(text_data, tmp_path):
  final = train.run(_cfg(text_data), str(tmp_path))
  rows = metrics.read_jsonl(os.path.join(tmp_path, 'metrics.jsonl'))
  train_rows = [r for r in rows if 'loss/text' in r]
  first, last = train_rows[0]['loss/text'], train_rows[-1]['loss/text']
  assert last < first - 0.4, (first, last)
  assert final['eval/loss/text'] < math.log(512) - 0.6  # Well below a uniform guess over the text ids.
  for key in ('step', 'loss', 'loss/text', 'tokens_per_s', 'mfu', 'grad_norm', 'lr', 'ppl/text'):
    assert key in train_rows[-1]
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['100', '200']


@pytest.mark.slow
def test_resume_equals_uninterrupted(text_data, tmp_path):
  common = dict(**{'train.num_steps': 12, 'train.log_every_steps': 1, 'checkpoint.every_steps': 4,
                   'checkpoint.keep': 5, 'train.eval_batches': 0})
  straight, broken = str(tmp_path / 'straight'), str(tmp_path / 'broken')
  train.run(_cfg(text_data, **common), straight)
  train.run(_cfg(text_data, **common), broken)
  # A kill after the step-4 checkpoint: later checkpoints never happened.
  for step in ('8', '12'):
    shutil.rmtree(os.path.join(broken, 'checkpoints', step))
  train.run(_cfg(text_data, **common), broken)
  a, b = _losses(straight), _losses(broken)
  assert sorted(a) == sorted(b) == list(range(1, 13))
  np.testing.assert_array_equal([a[s] for s in range(1, 13)], [b[s] for s in range(1, 13)])


@pytest.mark.slow
def test_checkpoint_restores_on_another_mesh(text_data, tmp_path):
  common = {'train.num_steps': 8, 'train.log_every_steps': 1, 'checkpoint.every_steps': 4, 'train.eval_batches': 0,
            'model.compute_dtype': 'float32'}
  straight, moved = str(tmp_path / 'straight'), str(tmp_path / 'moved')
  train.run(_cfg(text_data, 'mesh222', **common), straight)
  train.run(_cfg(text_data, 'mesh222', **common), moved)
  shutil.rmtree(os.path.join(moved, 'checkpoints', '8'))
  train.run(_cfg(text_data, 'mesh181', **common), moved)  # resumes from step 4 on (1, 8, 1)
  a, b = _losses(straight), _losses(moved)
  np.testing.assert_allclose([b[s] for s in range(5, 9)], [a[s] for s in range(5, 9)], rtol=1e-4)
