import os
import subprocess
import sys

import pytest

from tmdm import errors
from tmdm.config import loader as config_loader
from helpers import REPO

SMOKE = os.path.join(REPO, 'experiments', 'smoke.py')


def test_presets_and_typed_overrides():
  cfg = config_loader.load(SMOKE + ':mesh222', ['--config.optim.lr=3e-4', '--config.train.num_steps=1e3',
                                             '--config.diffusion.complementary=true'], num_devices=8)
  assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (2, 2, 2)
  assert cfg.optim.lr == 3e-4 and cfg.train.num_steps == 1000 and cfg.diffusion.complementary is True


@pytest.mark.parametrize('overrides, message', [
    (['--config.optim.lrr=1'], "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
    (['--config.train.num_steps=2.5'], "--config.train.num_steps: expected an integer, got '2.5'"),
    (['--config.train.batch_size=10', '--config.mesh.data=4', '--config.mesh.fsdp=2'],
     'batch of 10 rows per microbatch (train.batch_size 10 / microbatches 1) is not divisible by the 8 batch shards'),
    (['--config.mesh.data=4', '--config.mesh.fsdp=4'], 'is larger than the 8 visible devices'),
    (['--config.train.batch_size=16', '--config.train.microbatches=3'], 'not divisible by train.microbatches 3'),
    (['--config.model.d_head=33'], 'model.d_head must be even'),
    (['--config.mesh.tensor=8', '--config.mesh.data=1'], 'model.n_heads 2 is not divisible by mesh.tensor 8'),
    (['--config.diffusion.schedule_text=square'], 'diffusion.schedule_text must be one of'),
    (['--config.diffusion.p_joint=0.9'], 'must be 1, got 1.3'),
    (['--config.diffusion.complementary=true', '--config.train.batch_size=8'],
     '4 input rows per step do not divide over 8 batch shards'),
])
def test_validation_errors(overrides, message):
  with pytest.raises(errors.ConfigError) as e:
    config_loader.load(SMOKE, overrides, num_devices=8)
  assert message in str(e.value)
  assert '\n' not in str(e.value)


def test_missing_file_and_unknown_preset():
  with pytest.raises(errors.ConfigError, match='config file not found'):
    config_loader.load('experiments/nope.py')
  with pytest.raises(errors.ConfigError, match='unknown preset'):
    config_loader.load(SMOKE + ':nope')


def test_cli_config_error_is_one_line(tmp_path):
  """A config error exits with status 2 and one line on stderr, no traceback, before any compile."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-m', 'tmdm.cli', 'train', f'--config={SMOKE}', f'--workdir={tmp_path}',
                         '--host_devices=8', '--config.train.batch_size=10', '--config.mesh.data=4',
                         '--config.mesh.fsdp=2'], capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr
  assert lines[0].startswith('tmdm train: error: batch of 10 rows')
