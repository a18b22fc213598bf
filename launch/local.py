"""Train on this machine: its CPU or one GPU.

  python launch/local.py --config=experiments/demo.py --workdir=runs/demo [--prepare] [--gpu=0] \
      [--dry-run] [-- --config.KEY=VALUE ...]

Runs `tmdm prepare` (with --prepare) and `tmdm train`. --gpu=I pins the run to GPU I
(CUDA_VISIBLE_DEVICES); --cpu hides accelerators (JAX_PLATFORMS=cpu). --dry-run prints the commands.
"""

import argparse
import sys

import steps as steps_lib


def build(args, overrides) -> list:
  env = []
  if args.cpu:
    env.append(('JAX_PLATFORMS', 'cpu'))
  elif args.gpu is not None:
    env.append(('CUDA_VISIBLE_DEVICES', str(args.gpu)))
  out = []
  if args.prepare:
    out.append(steps_lib.Step(tuple(steps_lib.tmdm_argv(args.tmdm, 'prepare', args.config, extra=overrides)),
                              tuple(env)))
  out.append(steps_lib.Step(tuple(steps_lib.tmdm_argv(args.tmdm, 'train', args.config, args.workdir, overrides)),
                            tuple(env)))
  return out


def parser():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n', maxsplit=1)[0])
  p.add_argument('--config', required=True, help='experiments/FILE.py[:preset]')
  p.add_argument('--workdir', required=True)
  p.add_argument('--prepare', action='store_true', help='build the datasets first')
  device = p.add_mutually_exclusive_group()
  device.add_argument('--gpu', type=int, default=None, help='use only this GPU')
  device.add_argument('--cpu', action='store_true', help='run on the CPU even where an accelerator exists')
  p.add_argument('--tmdm', default=steps_lib.default_tmdm(), help='the tmdm command')
  p.add_argument('--dry-run', action='store_true', help='print the commands instead of running them')
  return p


def main(argv=None):
  args, rest = parser().parse_known_args(argv)
  return steps_lib.finish(build(args, steps_lib.overrides_of(rest)), args.dry_run)


if __name__ == '__main__':
  sys.exit(main())
