"""The `tmdm` command: flags -> config -> the subcommand (registry in commands.py).

  tmdm prepare --config=experiments/demo.py[:preset] [--config.k=v ...]
  tmdm train   --config=experiments/demo.py[:preset] --workdir=DIR [--config.k=v ...]
  tmdm sample  --workdir=DIR [--n=4] [--prompt=TEXT] [--out=DIR] [--config.sample.k=v ...]
  tmdm <command> --help

`--host_devices=N` (any subcommand) simulates N devices on the CPU: it sets XLA_FLAGS before jax is
imported. Errors a user can fix (config, missing data) print one line and exit with status 2.
"""

import argparse
import logging
import os
import sys


def _take_host_devices(argv):
  """Removes --host_devices=N from argv and applies it before anything imports jax."""
  rest, count = [], 0
  for i, arg in enumerate(argv):
    if arg.startswith('--host_devices='):
      count = int(arg.split('=', 1)[1])
    elif arg == '--host_devices' and i + 1 < len(argv):
      count = int(argv[i + 1])
    elif i > 0 and argv[i - 1] == '--host_devices':
      continue
    else:
      rest.append(arg)
  if count:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={count}').strip()
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  return rest


def main(argv=None):
  argv = _take_host_devices(sys.argv[1:] if argv is None else list(argv))
  overrides = [a for a in argv if a.startswith('--config.')]
  argv = [a for a in argv if not a.startswith('--config.')]
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s', datefmt='%H:%M:%S')
  for noisy in ('absl', 'orbax', 'jax._src', 'grain'):
    logging.getLogger(noisy).setLevel(logging.WARNING)

  from tmdm import commands  # pylint: disable=import-outside-toplevel  (after XLA_FLAGS)
  parser = argparse.ArgumentParser(prog='tmdm', description='Tri-modal masked diffusion pretraining.',
                                   epilog='Any subcommand also takes --host_devices=N and --config.KEY=VALUE.')
  sub = parser.add_subparsers(dest='command', required=True)
  for name, command in commands.COMMANDS.items():
    command.add_arguments(sub.add_parser(name, help=command.help))
  args = parser.parse_args(argv)
  try:
    return commands.COMMANDS[args.command].run(args, overrides)
  except commands.USER_ERRORS as e:
    message = str(e).splitlines()[0] if str(e) else type(e).__name__  # Grain appends traceback notes.
    print(f'tmdm {args.command}: error: {message}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
