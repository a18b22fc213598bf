"""A tmdm checkpoint opens with Orbax alone: a process that imports nothing from tmdm restores every
item with `ocp.CheckpointManager(dir).restore(step)` and gets the parameters tmdm restores."""

import json
import os
import subprocess
import sys

import numpy as np

from tmdm.config import loader as config_loader
from tmdm.parallel import sharding as sharding_lib
from tmdm.training import checkpoint, loop as train, state as train_state
from tmdm.training import setup as setup_lib
from helpers import REPO

SMOKE = os.path.join(REPO, 'experiments', 'smoke.py')

PLAIN_ORBAX = r'''
import json, sys
import numpy as np
import orbax.checkpoint as ocp
assert not any(m == 'tmdm' or m.startswith('tmdm.') for m in sys.modules)
manager = ocp.CheckpointManager(sys.argv[1])
step = manager.latest_step()
out = manager.restore(step)
leaves = {}
def walk(tree, path):
  if isinstance(tree, dict):
    for k, v in tree.items():
      walk(v, path + '/' + str(k))
  else:
    leaves[path] = float(np.asarray(tree, np.float64).sum())
walk(out['state']['params'], 'params')
assert not any(m == 'tmdm' or m.startswith('tmdm.') for m in sys.modules), 'restoring imported tmdm'
print(json.dumps({'step': step, 'items': sorted(out.keys()), 'params': leaves,
                  'data_shards': sorted(out['data']['shards']), 'num_shards': out['data']['num_shards'],
                  'config_steps': out['config']['train']['num_steps'], 'meta_step': out['meta']['step']}))
'''


def test_plain_orbax_restores_a_tmdm_checkpoint(text_data, tmp_path):
  args = ['--config.train.num_steps=3', '--config.checkpoint.every_steps=3', '--config.train.eval_batches=0',
          '--config.data.num_shards=2']
  cfg = config_loader.load(SMOKE, args, num_devices=8)
  cfg.data.root, cfg.train.progress = text_data, False
  train.run(cfg, str(tmp_path))
  ckpt_dir = str(tmp_path / 'checkpoints')
  env = dict(os.environ, PYTHONPATH='')
  proc = subprocess.run([sys.executable, '-c', PLAIN_ORBAX, ckpt_dir], capture_output=True, text=True, env=env,
                        cwd=str(tmp_path), timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  plain = json.loads(proc.stdout.strip().splitlines()[-1])
  assert plain['step'] == 3 and plain['items'] == ['config', 'data', 'meta', 'state']
  assert plain['data_shards'] == ['0', '1'] and plain['num_shards'] == 2
  assert plain['config_steps'] == 3 and plain['meta_step'] == 3

  s = setup_lib.build(cfg, with_optimizer=False)
  ckpt = checkpoint.Checkpointer(ckpt_dir, keep=1, async_save=False)
  params, step, _ = ckpt.restore_params(train_state.abstract_params(s.model, s.sharder, s.seq_len))
  ckpt.close()
  ours = {}

  def walk(tree, path):
    if isinstance(tree, dict):
      for k, v in tree.items():
        walk(v, f'{path}/{k}')
    else:
      ours[path] = float(np.asarray(sharding_lib.fetch(tree), np.float64).sum())
  walk(params, 'params')
  assert step == 3 and sorted(ours) == sorted(plain['params'])
  np.testing.assert_allclose([ours[k] for k in sorted(ours)], [plain['params'][k] for k in sorted(ours)], rtol=1e-6)
