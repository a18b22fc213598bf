"""Train on a simulated mesh of CPU devices: one process, or several processes on this machine
talking through JAX's distributed runtime (a rehearsal of a multi-host job).

  python launch/cpu_mesh.py --config=experiments/demo.py --workdir=runs/demo --devices=8 \
      [--processes=2 --port=12355] [--prepare] [--dry-run] [-- --config.KEY=VALUE ...]

One process: `tmdm train ... --host_devices=DEVICES`. P processes: P copies of that with
--host_devices=DEVICES/P, --coordinator=localhost:PORT, --num_processes=P and --process_id=i, started
together (cross-process collectives go through gloo on CPU); each process reads its share of the data.
"""

import argparse
import sys

import steps as steps_lib


def build(args, overrides) -> list:
  if args.devices % args.processes:
    raise SystemExit(f'--devices {args.devices} is not divisible by --processes {args.processes}')
  out = []
  if args.prepare:
    out.append(steps_lib.Step(tuple(steps_lib.tmdm_argv(args.tmdm, 'prepare', args.config, extra=overrides))))
  per_process = args.devices // args.processes
  train = steps_lib.tmdm_argv(args.tmdm, 'train', args.config, args.workdir, overrides)
  if args.processes == 1:
    return out + [steps_lib.Step(tuple(train + [f'--host_devices={per_process}']))]
  for i in range(args.processes):
    argv = train + [f'--host_devices={per_process}', f'--coordinator=localhost:{args.port}',
                    f'--num_processes={args.processes}', f'--process_id={i}']
    out.append(steps_lib.Step(tuple(argv), background=True))
  return out


def parser():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n', maxsplit=1)[0])
  p.add_argument('--config', required=True, help='experiments/FILE.py[:preset]')
  p.add_argument('--workdir', required=True)
  p.add_argument('--devices', type=int, default=8, help='simulated CPU devices in all')
  p.add_argument('--processes', type=int, default=1, help='processes sharing them (multi-host rehearsal)')
  p.add_argument('--port', type=int, default=12355, help='coordinator port (processes > 1)')
  p.add_argument('--prepare', action='store_true', help='build the datasets first')
  p.add_argument('--tmdm', default=steps_lib.default_tmdm(), help='the tmdm command')
  p.add_argument('--dry-run', action='store_true', help='print the commands instead of running them')
  return p


def main(argv=None):
  args, rest = parser().parse_known_args(argv)
  return steps_lib.finish(build(args, steps_lib.overrides_of(rest)), args.dry_run)


if __name__ == '__main__':
  sys.exit(main())
