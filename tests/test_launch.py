"""Launchers: each --dry-run prints exactly the expected command lines; sweeps expand, run locally with
a manifest (here with a stand-in for `tmdm train`), and write RESULTS from workdirs."""

import json
import os
import sys

import pytest

from tmdm import errors, vocab as vocab_lib
from tmdm.config import base as base_config, loader as config_loader
from tmdm.model import config as model_config
from tmdm.scaling import sweeps
from helpers import REPO

sys.path.insert(0, os.path.join(REPO, 'launch'))
import cpu_mesh  # pylint: disable=wrong-import-position,import-error
import local  # pylint: disable=wrong-import-position,import-error
import slurm  # pylint: disable=wrong-import-position,import-error
import sweep  # pylint: disable=wrong-import-position,import-error
import tpu  # pylint: disable=wrong-import-position,import-error

MICRO = 'experiments/micro_sweep.py'


def _dry(module, argv, capsys):
  capsys.readouterr()
  cut = argv.index('--') if '--' in argv else len(argv)  # Launcher flags go before `--`.
  assert module.main(argv[:cut] + ['--dry-run'] + argv[cut:]) == 0
  return capsys.readouterr().out.splitlines()


def test_local_dry_run(capsys):
  out = _dry(local, ['--config=experiments/demo.py', '--workdir=runs/demo', '--prepare', '--gpu=1', '--tmdm=tmdm', '--',
                     '--config.train.num_steps=5'], capsys)
  assert out == [
      'CUDA_VISIBLE_DEVICES=1 tmdm prepare --config=experiments/demo.py --config.train.num_steps=5',
      'CUDA_VISIBLE_DEVICES=1 tmdm train --config=experiments/demo.py --workdir=runs/demo --config.train.num_steps=5']
  assert _dry(local, ['--config=experiments/demo.py', '--workdir=r', '--cpu', '--tmdm=tmdm'], capsys) == [
      'JAX_PLATFORMS=cpu tmdm train --config=experiments/demo.py --workdir=r']


def test_cpu_mesh_dry_run(capsys):
  out = _dry(cpu_mesh, ['--config=experiments/smoke.py', '--workdir=runs/s', '--devices=8', '--tmdm=tmdm'], capsys)
  assert out == ['tmdm train --config=experiments/smoke.py --workdir=runs/s --host_devices=8']
  out = _dry(cpu_mesh, ['--config=experiments/smoke.py', '--workdir=runs/s', '--devices=8', '--processes=2',
                        '--port=4000', '--tmdm=tmdm'], capsys)
  common = 'tmdm train --config=experiments/smoke.py --workdir=runs/s --host_devices=4 --coordinator=localhost:4000'
  assert out == [f'{common} --num_processes=2 --process_id=0 &', f'{common} --num_processes=2 --process_id=1 &', 'wait']


def test_tpu_dry_run(capsys):
  out = _dry(tpu, ['--tpu=pod', '--zone=us-east5-a', '--project=proj', '--config=experiments/sizes.py:1b',
                   '--workdir=gs://b/1b', '--setup', '--prepare', '--', '--config.train.num_steps=9'], capsys)
  ssh = 'gcloud compute tpus tpu-vm ssh pod --worker=all --command'
  where = '--zone=us-east5-a --project=proj'
  assert out == [
      f'git -C {REPO} archive --format=tar.gz --output=/tmp/tmdm-src.tar.gz HEAD',
      f'gcloud compute tpus tpu-vm scp /tmp/tmdm-src.tar.gz pod:tmdm-src.tar.gz --worker=all {where}',
      f"{ssh} 'mkdir -p tmdm && tar -xzf tmdm-src.tar.gz -C tmdm && cd tmdm && bash launch/setup.sh && "
      f".venv/bin/pip install -q \"jax[tpu]>=0.10.2,<0.13\"' {where}",
      f"{ssh} 'cd tmdm && .venv/bin/tmdm prepare --config=experiments/sizes.py:1b --config.train.num_steps=9' {where}",
      f"{ssh} 'cd tmdm && .venv/bin/tmdm train --config=experiments/sizes.py:1b --workdir=gs://b/1b "
      f"--config.train.num_steps=9' {where}"]
  out = _dry(tpu, ['--tpu=pod', '--zone=z', '--config=c.py', '--workdir=gs://b/r', '--prepare', '--',
                   '--config.data.root=gs://b/data'], capsys)
  assert out[0] == ("gcloud compute tpus tpu-vm ssh pod --worker=0 --command 'cd tmdm && .venv/bin/tmdm prepare "
                    "--config=c.py --config.data.root=gs://b/data' --zone=z")  # Shared storage: prepared once.
  out = _dry(tpu, ['--tpu=pod', '--zone=z', '--config=c.py', '--workdir=gs://b/r', '--detach'], capsys)
  assert out == [f"{ssh} 'cd tmdm && nohup .venv/bin/tmdm train --config=c.py "
                 "--workdir=gs://b/r > train.log 2>&1 &' --zone=z"]


def _sbatch(out):
  """(script path, script text, the submit line) from a dry-run heredoc."""
  first = out[0]
  assert first.startswith('mkdir -p ') and out[-2] == 'EOF'
  return first.split('cat > ')[1].split(' <<')[0], '\n'.join(out[1:-2]) + '\n', out[-1]


def test_slurm_dry_run_one_process_per_gpu(capsys):
  out = _dry(slurm, ['--config=experiments/sizes.py:1b', '--workdir=/shared/r', '--nodes=4', '--partition=gpu',
                     '--repo=/shared/tmdm', '--tmdm=.venv/bin/tmdm', '--', '--config.train.num_steps=7'], capsys)
  path, script, submit = _sbatch(out)
  assert path == '/shared/r/tmdm-train.sbatch' and submit == 'sbatch /shared/r/tmdm-train.sbatch'
  assert script.splitlines() == [
      '#!/bin/bash',
      '#SBATCH --job-name=tmdm',
      '#SBATCH --nodes=4',
      '#SBATCH --ntasks-per-node=8',
      '#SBATCH --gpus-per-node=8',
      '#SBATCH --time=24:00:00',
      '#SBATCH --output=/shared/r/slurm-%j.out',
      '#SBATCH --partition=gpu',
      'set -euo pipefail',
      'cd /shared/tmdm',
      'srun --kill-on-bad-exit=1 .venv/bin/tmdm train --config=experiments/sizes.py:1b --workdir=/shared/r '
      '--config.train.num_steps=7']


def test_slurm_dry_run_one_process_per_node(capsys):
  out = _dry(slurm, ['--config=c.py', '--workdir=/s/r', '--nodes=2', '--gpus_per_node=4', '--per=node',
                     '--repo=/s/tmdm', '--env=NCCL_DEBUG=WARN', '--time=1:00:00'], capsys)
  _, script, _ = _sbatch(out)
  lines = script.splitlines()
  assert '#SBATCH --ntasks-per-node=1' in lines and '#SBATCH --gpus-per-node=4' in lines
  assert lines[-3:] == ['export JAX_LOCAL_DEVICE_IDS=0,1,2,3', 'export NCCL_DEBUG=WARN',
                        'srun --kill-on-bad-exit=1 .venv/bin/tmdm train --config=c.py --workdir=/s/r']


def test_sweep_expands_grid_and_list():
  runs = sweeps.load_sweep(os.path.join(REPO, MICRO))
  assert len(runs) == 9 and len({r.name for r in runs}) == 9
  assert runs[0].name == 'w64-s800' and runs[0].overrides['train.num_steps'] == 800
  grid = sweeps.expand({'optim.lr': [1e-3, 3e-3], 'diffusion.schedule_text': {'lin': 'linear', 'cos': 'cosine'}})
  assert [r.name for r in grid] == ['lr0.001-lin', 'lr0.001-cos', 'lr0.003-lin', 'lr0.003-cos']
  assert grid[3].override_args() == ['--config.optim.lr=0.003', '--config.diffusion.schedule_text=cosine']
  assert sweeps.expand([{'name': 'a', 'train.batch_size': 8}, {'train.batch_size': 16}])[1].name == 'run001'
  with pytest.raises(errors.ConfigError, match='repeat'):
    sweeps.expand([{'name': 'a'}, {'name': 'a'}])


def test_sweep_dry_runs(capsys):
  out = _dry(sweep, ['run', f'--config={MICRO}', '--root=runs/ms', '--parallel=2', '--only=w16-s200',
                     '--tmdm=tmdm'], capsys)
  assert out == ['# 1 runs, 2 at a time',
                 'mkdir -p runs/ms/w16-s200 && tmdm train --config=experiments/micro_sweep.py '
                 '--workdir=runs/ms/w16-s200 --config.model.d_model=16 --config.model.n_heads=1 '
                 '--config.model.d_head=16 --config.model.d_ff=44 --config.train.num_steps=200 '
                 '> runs/ms/w16-s200/train.log 2>&1']
  capsys.readouterr()
  assert sweep.main(['slurm', f'--config={MICRO}', '--root=/s/ms', '--gpus_per_node=1', '--max_parallel=3',
                     '--repo=/s/tmdm', '--dry-run']) == 0
  _, script, submit = _sbatch(capsys.readouterr().out.splitlines())
  assert submit == 'sbatch --parsable /s/ms/sweep.sbatch'
  assert '#SBATCH --array=0-8%3' in script and '#SBATCH --output=/s/ms/slurm-%A_%a.out' in script
  assert ('  8) srun --kill-on-bad-exit=1 .venv/bin/tmdm train --config=experiments/micro_sweep.py '
          '--workdir=/s/ms/w16-s200 --config.model.d_model=16 --config.model.n_heads=1 --config.model.d_head=16 '
          '--config.model.d_ff=44 --config.train.num_steps=200 ;;') in script.splitlines()
  assert sweep.main(['tpu', f'--config={MICRO}', '--root=gs://b/ms', '--tpu=a', '--tpu=b', '--zone=z',
                     '--dry-run']) == 0
  out = capsys.readouterr().out.splitlines()
  assert len(out) == 3 and out[2] == 'wait'
  assert out[0].startswith("gcloud compute tpus tpu-vm ssh a --worker=all --command 'cd tmdm && .venv/bin/tmdm train")
  assert out[0].count('.venv/bin/tmdm train') == 5 and out[1].count('.venv/bin/tmdm train') == 4
  assert out[0].endswith("--config.train.num_steps=200' --zone=z &")


# Stands in for `tmdm train` (no jax import, so it starts fast): writes the run's config.json (made
# by the test from the sweep) and a metrics.jsonl whose final loss falls with width and steps; width
# 64 fails.
FAKE_TRAIN = """
import json, os, sys
workdir = [a for a in sys.argv if a.startswith('--workdir=')][0].split('=', 1)[1]
cfg = json.load(open(sys.argv[1]))[os.path.basename(workdir)]
if cfg['model']['d_model'] == 64:
  sys.exit(3)
os.makedirs(workdir, exist_ok=True)
json.dump(cfg, open(os.path.join(workdir, 'config.json'), 'w'))
steps = cfg['train']['num_steps']
with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
  f.write(json.dumps({'step': steps, 'loss': 9.0, 'loss/text': 9.0}) + '\\n')
  f.write(json.dumps({'step': steps, 'eval/loss/text': 5 + 10 / cfg['model']['d_model'] + 100 / steps}) + '\\n')
"""


def test_local_sweep_keeps_manifest_and_writes_results(tmp_path, capsys):
  micro = os.path.join(REPO, MICRO)
  runs = {r.name: config_loader.load(micro, r.override_args()) for r in sweeps.load_sweep(micro)}
  (tmp_path / 'configs.json').write_text(json.dumps({k: c.to_dict() for k, c in runs.items()}))
  fake = tmp_path / 'fake_tmdm.py'
  fake.write_text(FAKE_TRAIN)
  root = tmp_path / 'sweep'
  argv = ['run', f'--config={micro}', f'--root={root}', '--parallel=3',
          f'--tmdm={sys.executable} {fake} {tmp_path / "configs.json"}', '--only=w16-s200', '--only=w16-s800',
          '--only=w64-s200', '--only=w32-s400']
  assert sweep.main(argv) == 1  # One run failed.
  manifest = json.loads((root / 'manifest.json').read_text())['runs']
  assert manifest['w64-s200']['status'] == 'failed' and manifest['w64-s200']['returncode'] == 3
  assert all(manifest[n]['status'] == 'ok' and manifest[n]['duration_s'] >= 0 for n in ('w16-s200', 'w32-s400'))
  rows = [json.loads(line) for line in (root / 'results.jsonl').read_text().splitlines()]
  by_name = {r['name']: r for r in rows}
  assert sorted(by_name) == ['w16-s200', 'w16-s800', 'w32-s400']
  r = by_name['w16-s800']
  assert r['source'] == 'eval' and r['loss'] == pytest.approx(5 + 10 / 16 + 100 / 800)
  assert r['tokens'] == 800 * 16 * 64 and r['modality'] == 'text'
  vocab = vocab_lib.VocabSpec.from_config(runs['w16-s800'].vocab).size
  assert r['params'] == model_config.ModelConfig.from_config(runs['w16-s800'].model, vocab).non_embedding_params == 6352
  # Rerunning skips the finished runs; only the failed one runs again.
  capsys.readouterr()
  assert sweep.main(argv) == 1
  assert capsys.readouterr().out.count('started ') == 1


def test_run_results_fall_back_to_training_loss_and_skip_unfinished(tmp_path):
  cfg = base_config.get_config()
  cfg.train.num_steps = 10
  (tmp_path / 'config.json').write_text(json.dumps(cfg.to_dict()))
  (tmp_path / 'metrics.jsonl').write_text(json.dumps({'step': 5, 'loss/text': 4.0}) + '\n')
  assert sweeps.run_results(str(tmp_path)) == []  # Stopped at step 5 of 10.
  with open(tmp_path / 'metrics.jsonl', 'a', encoding='utf-8') as f:
    f.write(json.dumps({'step': 10, 'loss/text': 3.5, 'loss/image': 6.0}) + '\n{"step": 1')  # A cut-off line.
  rows = sweeps.run_results(str(tmp_path))
  assert [(r['modality'], r['loss'], r['source']) for r in rows] == [('text', 3.5, 'train'), ('image', 6.0, 'train')]
