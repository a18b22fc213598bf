"""The `tmdm` command: flags -> (distributed init) -> config -> the subcommand.

  tmdm prepare --config=experiments/demo.py[:preset] [--config.k=v ...]
  tmdm train   --config=experiments/demo.py[:preset] --workdir=DIR [--config.k=v ...]
  tmdm sample  --workdir=DIR [--n=4] [--prompt=TEXT] [--out=DIR] [--config.sample.k=v ...]

`--host_devices=N` simulates N devices on the CPU (sets XLA_FLAGS before jax is imported).
Errors a user can fix (config, missing data) print one line and exit with status 2.
"""

import argparse
import logging
import os
import sys


def _parser():
  p = argparse.ArgumentParser(prog='tmdm', description='Tri-modal masked diffusion pretraining.')
  sub = p.add_subparsers(dest='command', required=True)
  for name, helptext in (('prepare', 'build datasets and tokenizers'), ('train', 'train or resume'),
                         ('sample', 'generate from a trained workdir')):
    c = sub.add_parser(name, help=helptext)
    c.add_argument('--config', required=name != 'sample', help='experiments/FILE.py[:preset]')
    c.add_argument('--workdir', required=name != 'prepare', help='run folder (checkpoints, metrics)')
    c.add_argument('--host_devices', type=int, default=0, help='simulate this many CPU devices')
    c.add_argument('--force', action='store_true', help='prepare: rebuild existing datasets')
    c.add_argument('--n', type=int, default=0, help='sample: number of samples (default sample.num)')
    c.add_argument('--prompt', default='', help='sample: text the samples start with')
    c.add_argument('--out', default=None, help='sample: output folder (default WORKDIR/samples)')
    c.add_argument('--seed', type=int, default=0, help='sample: random seed')
  return p


def _split_overrides(argv):
  overrides = [a for a in argv if a.startswith('--config.')]
  rest = [a for a in argv if not a.startswith('--config.')]
  return rest, overrides


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  rest, overrides = _split_overrides(argv)
  args = _parser().parse_args(rest)
  if args.host_devices:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={args.host_devices}').strip()
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s', datefmt='%H:%M:%S')
  for noisy in ('absl', 'orbax', 'jax._src', 'grain'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  # Imported late: jax must see XLA_FLAGS first.
  from tmdm import commands  # pylint: disable=import-outside-toplevel
  try:
    return commands.COMMANDS[args.command](args, overrides)
  except commands.USER_ERRORS as e:
    print(f'tmdm {args.command}: error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
