"""Train on a Cloud TPU VM or pod slice: the same command on every host through
`gcloud compute tpus tpu-vm ssh --worker=all`; JAX finds the pod's hosts itself.

  python launch/tpu.py --tpu=NAME --zone=ZONE [--project=P] --config=experiments/sizes.py:1b \
      --workdir=gs://BUCKET/runs/1b [--create --accelerator_type=v5p-64 --runtime_version=VERSION] \
      [--setup] [--prepare] [--detach] [--dry-run] [-- --config.KEY=VALUE ...]

--create makes the VM; --setup copies this checkout (`git archive HEAD`: commit first) to every host,
creates the virtual environment (launch/setup.sh) and installs jax[tpu]; --prepare builds the datasets:
once, on worker 0, when `--config.data.root=gs://...` names shared storage, else on every host
(deterministic; `tmdm train` refuses to start when the hosts' tokenizers differ); --detach
starts training under nohup so the ssh session may close (log: ~/REPO_DIR/train.log on each host).
The workdir must be storage all hosts share (a gs:// bucket or a shared file system) for checkpoints.
"""

import argparse
import shlex
import sys

import steps as steps_lib

JAX_TPU = 'jax[tpu]>=0.10.2,<0.13'
ARCHIVE = '/tmp/tmdm-src.tar.gz'


def _gcloud(args, verb, *rest):
  where = [f'--zone={args.zone}'] + ([f'--project={args.project}'] if args.project else [])
  return ('gcloud', 'compute', 'tpus', 'tpu-vm', verb, *rest, *where)


def ssh(args, command: str, worker: str = 'all') -> steps_lib.Step:
  """`command` (a shell line) on every host of the slice."""
  return steps_lib.Step(_gcloud(args, 'ssh', args.tpu, f'--worker={worker}', '--command', command))


def remote_tmdm(args, command, workdir='', overrides=()):
  argv = steps_lib.tmdm_argv('.venv/bin/tmdm', command, args.config, workdir, overrides)
  return f'cd {shlex.quote(args.repo_dir)} && {shlex.join(argv)}'


def setup_steps(args) -> list:
  unpack = (f'mkdir -p {shlex.quote(args.repo_dir)} && tar -xzf tmdm-src.tar.gz -C {shlex.quote(args.repo_dir)} && '
            f'cd {shlex.quote(args.repo_dir)} && bash launch/setup.sh && '
            f'.venv/bin/pip install -q "{JAX_TPU}"')
  return [steps_lib.Step(('git', '-C', steps_lib.REPO, 'archive', '--format=tar.gz', f'--output={ARCHIVE}', 'HEAD')),
          steps_lib.Step(_gcloud(args, 'scp', ARCHIVE, f'{args.tpu}:tmdm-src.tar.gz', '--worker=all')),
          ssh(args, unpack)]


def build(args, overrides) -> list:
  out = []
  if args.create:
    if not (args.accelerator_type and args.runtime_version):
      raise SystemExit('--create needs --accelerator_type and --runtime_version')
    out.append(steps_lib.Step(_gcloud(args, 'create', args.tpu, f'--accelerator-type={args.accelerator_type}',
                                      f'--version={args.runtime_version}')))
  if args.setup:
    out += setup_steps(args)
  if args.prepare:  # Into shared storage: once, from worker 0. Else each host builds its own copy (the
    # build is deterministic; training checks that every host's tokenizers agree before it starts).
    shared = any(o.startswith('--config.data.root=') and '://' in o for o in overrides)
    out.append(ssh(args, remote_tmdm(args, 'prepare', overrides=overrides), worker='0' if shared else 'all'))
  train = remote_tmdm(args, 'train', args.workdir, overrides)
  if args.detach:
    cd, _, cmd = train.partition(' && ')
    train = f'{cd} && nohup {cmd} > train.log 2>&1 &'
  out.append(ssh(args, train))
  return out


def add_tpu_args(p):
  p.add_argument('--tpu', required=True, help='TPU VM name')
  p.add_argument('--zone', required=True)
  p.add_argument('--project', default='', help='Google Cloud project (default: gcloud config)')
  p.add_argument('--repo_dir', default='tmdm', help='checkout folder on the hosts (relative to home)')


def parser():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n', maxsplit=1)[0])
  add_tpu_args(p)
  p.add_argument('--config', required=True, help='experiments/FILE.py[:preset]')
  p.add_argument('--workdir', required=True, help='shared storage: gs://BUCKET/... or a shared file system')
  p.add_argument('--create', action='store_true', help='create the TPU VM first')
  p.add_argument('--accelerator_type', default='', help='with --create, e.g. v5p-64, v6e-16')
  p.add_argument('--runtime_version', default='', help='with --create: the TPU software version')
  p.add_argument('--setup', action='store_true', help='copy the code and install it on every host')
  p.add_argument('--prepare', action='store_true', help='build the datasets on every host')
  p.add_argument('--detach', action='store_true', help='train under nohup; the ssh session returns at once')
  p.add_argument('--dry-run', action='store_true', help='print the commands instead of running them')
  return p


def main(argv=None):
  args, rest = parser().parse_known_args(argv)
  return steps_lib.finish(build(args, steps_lib.overrides_of(rest)), args.dry_run)


if __name__ == '__main__':
  sys.exit(main())
