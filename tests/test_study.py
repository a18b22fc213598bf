"""`tmdm study report` on a real tiny sweep: launch/sweep.py runs 4 real `tmdm train` runs (2 settings x
2 seeds, a few steps of a tiny text model), and the report's numbers are checked against the runs' own
metrics files read directly, its arithmetic against numpy."""

import json
import os
import shutil
import sys

import matplotlib.image
import numpy as np
import pytest

from tmdm import cli, errors
from tmdm.scaling import study
from helpers import REPO

sys.path.insert(0, os.path.join(REPO, 'launch'))
import sweep  # pylint: disable=wrong-import-position,import-error

STEPS = 6
EXPERIMENT = f'''
from tmdm.config import base as base_config
from tmdm.model import config as model_config


def get_config(arg=None):
  c = base_config.get_config()
  c.model.update(model_config.PRESETS['tiny'])
  c.model.update(d_model=32, n_heads=1, d_ff=88, compute_dtype='float32', attention_impl='xla', scan_layers=False)
  c.vocab.update(text_size=512, multiple=8)
  c.data.update(text_name='fortunes-smoke', text_sources='fortunes', text_max_docs=2000, seq_len=32)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  c.train.update(num_steps={STEPS}, batch_size=8, log_every_steps=3, eval_batches=2, progress=False, tensorboard=False)
  c.checkpoint.update(every_steps={STEPS}, keep=1, async_save=False)
  return c


def get_sweep(arg=None):
  runs = [{{'name': 'base'}}, {{'name': 'hot', 'optim.lr': 0.05}}]
  return [dict(r, name=r['name'] + f'-s{{sd}}', seed=sd) for r in runs for sd in (0, 1)]
'''


def _final_eval(workdir, key):
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8')]
  return [r[key] for r in rows if r.get('step') == STEPS and key in r][-1]


@pytest.fixture(scope='module')
def tiny_sweep(text_data, tmp_path_factory):
  tmp = tmp_path_factory.mktemp('study')
  exp = tmp / 'tiny_study.py'
  exp.write_text(EXPERIMENT)
  root = tmp / 'sweep'
  env = os.environ.get('XLA_FLAGS')
  os.environ['XLA_FLAGS'] = ''  # One device per run: the session's 8 simulated devices would slow 4 runs down.
  try:
    assert sweep.main(['run', f'--config={exp}', f'--root={root}', '--parallel=2', '--',
                       f'--config.data.root={text_data}']) == 0
  finally:
    os.environ['XLA_FLAGS'] = env or ''
  return root


def test_report_matches_the_runs_own_metrics(tiny_sweep, tmp_path, capsys):
  out = tmp_path / 'report'
  assert cli.main(['study', 'report', str(tiny_sweep), f'--out={out}', '--metrics=eval/loss/text,eval/ppl/text']) == 0
  printed = capsys.readouterr().out
  got = json.loads((out / 'results.json').read_text())
  assert got['settings'] == ['base', 'hot'] and got['baseline'] == 'base' and got['unfinished'] == []
  assert sorted((r['setting'], r['seed']) for r in got['runs']) == [('base', 0), ('base', 1), ('hot', 0), ('hot', 1)]
  direct = {(s, sd): _final_eval(tiny_sweep / f'{s}-s{sd}', 'eval/loss/text') for s in ('base', 'hot') for sd in (0, 1)}
  for s in ('base', 'hot'):
    entry = got['table'][s]['eval/loss/text']
    vals = [direct[(s, 0)], direct[(s, 1)]]
    assert [entry['seeds'][k] for k in ('0', '1')] == pytest.approx(vals, rel=1e-9)
    assert entry['mean'] == pytest.approx(np.mean(vals)) and entry['std'] == pytest.approx(np.std(vals, ddof=1))
  diff = got['table']['hot']['eval/loss/text']['diff']
  per_seed = [direct[('hot', sd)] - direct[('base', sd)] for sd in (0, 1)]
  assert diff['n'] == 2 and diff['mean'] == pytest.approx(np.mean(per_seed))
  assert (diff['min'], diff['max']) == pytest.approx((min(per_seed), max(per_seed)))
  assert 'diff' not in got['table']['base']['eval/loss/text']
  # The two settings really differ (lr 0.05 vs the default): the report is not reading one run twice.
  assert direct[('hot', 0)] != direct[('base', 0)] and direct[('base', 0)] != direct[('base', 1)]
  table = (out / 'table.md').read_text()
  assert f'| base | 2 | {np.mean([direct[("base", 0)], direct[("base", 1)]]):.4g} +- ' in table
  assert '| hot |' in table and table in printed
  png = matplotlib.image.imread(str(out / 'study.png'))
  assert png.ndim == 3 and png.shape[0] > 100 and png.shape[1] > 100


def test_report_defaults_unfinished_runs_and_bad_input(tiny_sweep, tmp_path):
  root = tmp_path / 'sweep'
  shutil.copytree(tiny_sweep, root)
  metrics = root / 'hot-s1' / 'metrics.jsonl'
  kept = [line for line in metrics.read_text().splitlines() if json.loads(line).get('step', 0) < STEPS]
  metrics.write_text('\n'.join(kept) + '\n')  # hot-s1 stopped before its last step.
  got = study.report(str(root), str(tmp_path / 'r'), baseline='hot')
  assert got['unfinished'] == ['hot-s1'] and got['runs'] == 3 and got['baseline'] == 'hot'
  assert got['metrics'] == ['eval/loss/text']  # The default: the ELBO of each modality the runs have.
  entry = got['table']['hot']['eval/loss/text']
  assert entry['n'] == 1 and entry['std'] is None and list(entry['seeds']) == [0]
  assert got['table']['base']['eval/loss/text']['diff']['n'] == 1  # Paired on seed 0 only.
  # Against a config value: the runs carry it (read from their config.json), the figure is written.
  got = study.report(str(root), str(tmp_path / 'rx'), x='eval/loss/text:optim.lr')
  runs = json.loads((tmp_path / 'rx' / 'results.json').read_text())['runs']
  lrs = {r['name']: r['config']['optim.lr'] for r in runs}
  assert lrs['hot-s0'] == 0.05 and lrs['base-s0'] == lrs['base-s1'] != 0.05
  assert matplotlib.image.imread(str(tmp_path / 'rx' / 'study.png')).ndim == 3
  with pytest.raises(errors.ConfigError, match='no key'):
    study.report(str(root), str(tmp_path / 'r4'), x='eval/loss/text:optim.nothing')
  with pytest.raises(errors.ConfigError, match='METRIC:CONFIG_KEY'):
    study.report(str(root), str(tmp_path / 'r5'), x='optim.lr')
  with pytest.raises(errors.ConfigError, match='no run logged t2i/digit_acc'):
    study.report(str(root), str(tmp_path / 'r2'), metrics='t2i/digit_acc')
  with pytest.raises(errors.ConfigError, match='is no setting'):
    study.report(str(root), str(tmp_path / 'r3'), baseline='cold')
  assert cli.main(['study', 'report', str(tmp_path / 'nothing')]) == 2
