"""Train on GPU nodes under SLURM: an sbatch script whose `srun` starts one process per GPU (default)
or one per node; JAX reads the SLURM environment (coordinator = the first node, process count and id).

  python launch/slurm.py --config=experiments/sizes.py:1b --workdir=/shared/runs/1b --nodes=4 \
      [--gpus_per_node=8] [--per=gpu|node] [--partition=P] [--account=A] [--time=24:00:00] \
      [--env=NAME=VALUE ...] [--repo=/shared/tmdm] [--dry-run] [-- --config.KEY=VALUE ...]

Writes WORKDIR/tmdm-train.sbatch and submits it with `sbatch`; --dry-run prints both. The checkout
(with its .venv from launch/setup.sh) and the workdir must be on a file system every node sees.
--per=gpu: GPUS_PER_NODE tasks per node, each sees every GPU of its node and JAX picks GPU
SLURM_LOCALID (so the cluster must not bind GPUs per task). --per=node: one task per node driving all
its GPUs; JAX_LOCAL_DEVICE_IDS lists them, since JAX would otherwise give each task only GPU
SLURM_LOCALID = 0.
"""

import argparse
import os
import shlex
import sys

import steps as steps_lib


def header(args, job_name, output, extra=()) -> list:
  tasks = args.gpus_per_node if args.per == 'gpu' else 1
  lines = ['#!/bin/bash', f'#SBATCH --job-name={job_name}', f'#SBATCH --nodes={args.nodes}',
           f'#SBATCH --ntasks-per-node={tasks}', f'#SBATCH --gpus-per-node={args.gpus_per_node}',
           f'#SBATCH --time={args.time}', f'#SBATCH --output={output}']
  lines += [f'#SBATCH --{k}={getattr(args, k)}' for k in ('partition', 'account') if getattr(args, k)]
  lines += [f'#SBATCH {x}' for x in extra]
  lines += ['set -euo pipefail', f'cd {shlex.quote(args.repo)}']
  if args.per == 'node':
    lines.append(f'export JAX_LOCAL_DEVICE_IDS={",".join(str(i) for i in range(args.gpus_per_node))}')
  for item in args.env:
    name, sep, value = item.partition('=')
    if not sep:
      raise SystemExit(f'--env takes NAME=VALUE, got {item!r}')
    lines.append(f'export {name}={shlex.quote(value)}')
  return lines


def srun(train_argv) -> str:
  # --kill-on-bad-exit: one failed process ends the job instead of leaving the rest in a collective.
  return 'srun --kill-on-bad-exit=1 ' + shlex.join(train_argv)


def train_argv(args, workdir, overrides):
  return steps_lib.tmdm_argv(args.tmdm, 'train', args.config, workdir, overrides)


def build(args, overrides) -> list:
  script = args.script or os.path.join(args.workdir, 'tmdm-train.sbatch')
  lines = header(args, args.job_name, os.path.join(args.workdir, 'slurm-%j.out'))
  lines.append(srun(train_argv(args, args.workdir, overrides)))
  return [steps_lib.Step(write=(script, '\n'.join(lines) + '\n')), steps_lib.Step(('sbatch', script))]


def add_cluster_args(p):
  p.add_argument('--nodes', type=int, default=1)
  p.add_argument('--gpus_per_node', type=int, default=8)
  p.add_argument('--per', choices=('gpu', 'node'), default='gpu', help='one process per GPU or per node')
  p.add_argument('--partition', default='')
  p.add_argument('--account', default='')
  p.add_argument('--time', default='24:00:00', help='wall-clock limit')
  p.add_argument('--env', action='append', default=[], help='NAME=VALUE exported in the job (repeatable)')
  p.add_argument('--repo', default=steps_lib.REPO, help='the checkout on the shared file system')
  p.add_argument('--tmdm', default='.venv/bin/tmdm', help='the tmdm command, relative to --repo')


def parser():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n', maxsplit=1)[0])
  p.add_argument('--config', required=True, help='experiments/FILE.py[:preset]')
  p.add_argument('--workdir', required=True, help='on a shared file system')
  p.add_argument('--job_name', default='tmdm')
  p.add_argument('--script', default='', help='where to write the sbatch script (default: WORKDIR/tmdm-train.sbatch)')
  add_cluster_args(p)
  p.add_argument('--dry-run', action='store_true', help='print the script and the sbatch command')
  return p


def main(argv=None):
  args, rest = parser().parse_known_args(argv)
  return steps_lib.finish(build(args, steps_lib.overrides_of(rest)), args.dry_run)


if __name__ == '__main__':
  sys.exit(main())
