"""Run an experiment file's sweep (its get_sweep(arg); see src/tmdm/scaling/sweeps.py): every run in its own
workdir ROOT/NAME, locally or on a cluster, with a manifest (ROOT/manifest.json) of what ran and how it
ended, and RESULTS (ROOT/results.jsonl, the input of `tmdm scaling fit`) from the finished runs.

  python launch/sweep.py run     --config=experiments/micro_sweep.py --root=runs/micro_sweep [--parallel=2]
                                 [--host_devices=N] [--only=NAME ...] [--force] [--dry-run] [-- --config.K=V]
  python launch/sweep.py slurm   --config=... --root=/shared/sweep --nodes=1 [--max_parallel=4] [slurm.py options]
  python launch/sweep.py tpu     --config=... --root=gs://B/sweep --tpu=SLICE [--tpu=SLICE2 ...] --zone=Z
  python launch/sweep.py results --root=ROOT [--out=ROOT/results.jsonl]

`run` starts up to --parallel runs at once as subprocesses (stdout in ROOT/NAME/train.log), skips runs
the manifest marks ok (--force reruns them; a rerun resumes from its checkpoints), then writes RESULTS.
`slurm` submits one job array (task i = run i, at most --max_parallel at once). `tpu` gives each slice
its share of the runs (round robin), run one after another through `tpu-vm ssh --worker=all`; copy the
workdirs down (e.g. gsutil -m rsync -r) before `results`. --dry-run prints the commands.
"""

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time

import slurm as slurm_lib
import steps as steps_lib
import tpu as tpu_lib

sys.path.insert(0, os.path.join(steps_lib.REPO, 'src'))
from tmdm import storage  # pylint: disable=wrong-import-position
from tmdm.scaling import sweeps  # pylint: disable=wrong-import-position

MANIFEST = 'manifest.json'


def _now():
  return datetime.datetime.now().isoformat(timespec='seconds')


class Manifest:
  """ROOT/manifest.json: per run its overrides, command and outcome; rewritten after every change."""

  def __init__(self, root, config=None, backend=None):
    self.path = storage.join(root, MANIFEST)  # ROOT may be a folder or a URL (gs://bucket/sweep).
    self.data = {'config': config, 'root': storage.absolute(root), 'runs': {}}
    if storage.isfile(self.path):
      self.data = json.loads(storage.read_text(self.path))
    if config:  # A new sweep (or the same one again) on this root.
      self.data.update(config=config, backend=backend)

  def status(self, name):
    return self.data['runs'].get(name, {}).get('status')

  def update(self, name, **fields):
    self.data['runs'].setdefault(name, {}).update(fields)
    self.save()

  def save(self):
    storage.makedirs(storage.parent(self.path))
    self.data['updated'] = _now()
    storage.write_text(self.path, json.dumps(self.data, indent=1))  # Written whole: never half a manifest.


def _log_path(workdir) -> str:
  """Where a run's output goes while it runs: WORKDIR/train.log, or for a URL workdir a local file
  (uploaded to WORKDIR/train.log when the run ends; a pipe into an object store cannot be appended)."""
  if not storage.is_url(workdir):
    return os.path.join(workdir, 'train.log')
  return os.path.join('sweep_logs', *str(workdir).split('://', 1)[1].split('/'), 'train.log')


def _train_argv(args, run, workdir, overrides, tmdm):
  extra = run.override_args() + list(overrides)
  argv = steps_lib.tmdm_argv(tmdm, 'train', args.config, workdir, extra)
  return argv + ([f'--host_devices={args.host_devices}'] if getattr(args, 'host_devices', 0) else [])


def _selected(args):
  runs = sweeps.load_sweep(args.config)
  if args.only:
    unknown = sorted(set(args.only) - {r.name for r in runs})
    if unknown:
      raise SystemExit(f'--only names no run of the sweep: {", ".join(unknown)}')
    runs = [r for r in runs if r.name in args.only]
  return runs


def run_local(args, overrides) -> int:
  runs = _selected(args)
  sweeps.check_configs(args.config, runs)
  manifest = None if args.dry_run else Manifest(args.root, args.config, 'local')
  todo = [r for r in runs if args.force or manifest is None or manifest.status(r.name) != 'ok']
  jobs = []
  for r in todo:
    workdir = storage.join(args.root, r.name)
    jobs.append((r, workdir, _train_argv(args, r, workdir, overrides, args.tmdm)))
  if args.dry_run:
    print(f'# {len(jobs)} runs, {args.parallel} at a time')
    for _, workdir, argv in jobs:
      log = _log_path(workdir)
      print(f'mkdir -p {shlex.quote(os.path.dirname(log))} && {shlex.join(argv)} > {shlex.quote(log)} 2>&1')
    return 0
  for r, workdir, argv in jobs:
    manifest.update(r.name, overrides=r.overrides, workdir=storage.absolute(workdir), command=shlex.join(argv),
                    status='pending')
  failed = _schedule(jobs, manifest, args.parallel)
  collect(args.root, manifest)
  return 1 if failed else 0


def _schedule(jobs, manifest, parallel) -> int:
  """Keeps up to `parallel` runs going; records each outcome as it ends. Returns the failure count."""
  pending, running, failed = list(jobs), {}, 0
  try:
    while pending or running:
      while pending and len(running) < parallel:
        r, workdir, argv = pending.pop(0)
        os.makedirs(os.path.dirname(os.path.abspath(_log_path(workdir))), exist_ok=True)
        log = open(_log_path(workdir), 'w', encoding='utf-8')  # pylint: disable=consider-using-with
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)  # pylint: disable=consider-using-with
        running[r.name] = (proc, time.time(), log, workdir)
        manifest.update(r.name, status='running', started=_now(), log=log.name)
        print(f'started {r.name}', flush=True)
      for name, (proc, start, log, workdir) in list(running.items()):
        rc = proc.poll()
        if rc is None:
          continue
        log.close()
        if storage.is_url(workdir):
          storage.write_bytes(storage.join(workdir, 'train.log'), open(log.name, 'rb').read())
        del running[name]
        failed += rc != 0
        took = time.time() - start
        manifest.update(name, status='ok' if rc == 0 else 'failed', returncode=rc, duration_s=round(took, 1),
                        ended=_now())
        print(f'{"finished" if rc == 0 else "FAILED"} {name} in {took:.0f}s (exit {rc})', flush=True)
      time.sleep(0.5)
  except KeyboardInterrupt:
    for name, (proc, start, log, _) in running.items():
      proc.terminate()
      proc.wait()
      log.close()
      manifest.update(name, status='interrupted', duration_s=round(time.time() - start, 1), ended=_now())
    raise
  return failed


def collect(root, manifest=None, out='') -> str:
  """RESULTS of every finished run under ROOT (the manifest's runs, else every subfolder)."""
  names = sorted(manifest.data['runs']) if manifest else sorted(
      d for d in storage.listdir(root) if storage.isdir(storage.join(root, d)))
  rows, missing = [], []
  for name in names:
    got = sweeps.run_results(storage.join(root, name), name)
    rows += got
    if not got:
      missing.append(name)
  path = sweeps.write_results(out or storage.join(root, 'results.jsonl'), rows)
  print(f'wrote {len(rows)} rows to {path}' + (f'; unfinished: {", ".join(missing)}' if missing else ''))
  for r in rows:
    print(f'  {r["name"]:<20} {r["modality"]:<6} N={r["params"]:<10,d} D={r["tokens"]:<12,d} '
          f'loss={r["loss"]:.4f} ({r["source"]})')
  return path


def submit_slurm(args, overrides) -> int:
  runs = _selected(args)
  sweeps.check_configs(args.config, runs)
  script = os.path.join(args.root, 'sweep.sbatch')
  throttle = f'%{args.max_parallel}' if args.max_parallel else ''
  lines = slurm_lib.header(args, args.job_name, os.path.join(args.root, 'slurm-%A_%a.out'),
                           extra=[f'--array=0-{len(runs) - 1}{throttle}'])
  lines.append('case "$SLURM_ARRAY_TASK_ID" in')
  for i, r in enumerate(runs):
    argv = _train_argv(args, r, os.path.join(args.root, r.name), overrides, args.tmdm)
    lines.append(f'  {i}) {slurm_lib.srun(argv)} ;;')
  lines.append('esac')
  write = steps_lib.Step(write=(script, '\n'.join(lines) + '\n'))
  if args.dry_run:
    steps_lib.print_steps([write, steps_lib.Step(('sbatch', '--parsable', script))])
    return 0
  steps_lib.execute([write])
  job = subprocess.run(['sbatch', '--parsable', script], check=True, capture_output=True, text=True).stdout.strip()
  manifest = Manifest(args.root, args.config, 'slurm')
  for i, r in enumerate(runs):
    manifest.update(r.name, overrides=r.overrides, workdir=os.path.join(args.root, r.name), status='submitted',
                    job=f'{job}_{i}', submitted=_now())
  print(f'submitted job array {job} ({len(runs)} runs)')
  return 0


def submit_tpu(args, overrides) -> int:
  runs = _selected(args)
  sweeps.check_configs(args.config, runs)
  plan = []
  for k, tpu in enumerate(args.tpu):
    mine = runs[k::len(args.tpu)]
    if not mine:
      continue
    slice_args = argparse.Namespace(**{**vars(args), 'tpu': tpu})
    commands = [shlex.join(_train_argv(args, r, f'{args.root}/{r.name}', overrides, '.venv/bin/tmdm')) for r in mine]
    # ';' and not '&&': a failed run should not cancel the slice's later runs.
    step = tpu_lib.ssh(slice_args, f'cd {shlex.quote(args.repo_dir)} && ' + ' ; '.join(commands))
    plan.append((tpu, mine, steps_lib.Step(step.argv, background=len(args.tpu) > 1)))
  if args.dry_run:
    steps_lib.print_steps([s for _, _, s in plan])
    return 0
  manifest = Manifest(args.root, args.config, 'tpu')  # ROOT/manifest.json, on gs:// too.
  for tpu, mine, step in plan:
    for r in mine:
      manifest.update(r.name, overrides=r.overrides, workdir=f'{args.root}/{r.name}', status='submitted', tpu=tpu,
                      command=step.shell(), submitted=_now())
  rc = steps_lib.execute([s for _, _, s in plan])
  for tpu, mine, _ in plan:
    for r in mine:
      manifest.update(r.name, status='slice_exited', slice_returncode=rc, ended=_now())
  return rc


def parser():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n', maxsplit=1)[0])
  sub = p.add_subparsers(dest='mode', required=True)

  def common(q, root_help='folder of the runs (ROOT/NAME each)'):
    q.add_argument('--config', required=True, help='experiments/FILE.py[:arg] defining get_sweep(arg)')
    q.add_argument('--root', required=True, help=root_help)
    q.add_argument('--only', action='append', default=[], help='run only this run (repeatable)')
    q.add_argument('--dry-run', action='store_true', help='print the commands instead of running them')

  local = sub.add_parser('run', help='run the sweep on this machine')
  common(local)
  local.add_argument('--parallel', type=int, default=1, help='runs at once')
  local.add_argument('--host_devices', type=int, default=0, help='simulated CPU devices per run (0: real devices)')
  local.add_argument('--force', action='store_true', help='also rerun runs the manifest marks ok')
  local.add_argument('--tmdm', default=steps_lib.default_tmdm(), help='the tmdm command')

  cluster = sub.add_parser('slurm', help='submit the sweep as a SLURM job array')
  common(cluster, 'folder of the runs, on a shared file system')
  cluster.add_argument('--job_name', default='tmdm-sweep')
  cluster.add_argument('--max_parallel', type=int, default=0, help='array tasks at once (0: no limit)')
  slurm_lib.add_cluster_args(cluster)

  tpu = sub.add_parser('tpu', help='run the sweep on TPU slices, one job per slice')
  common(tpu, 'shared storage for the runs (gs://BUCKET/... or a shared file system)')
  tpu.add_argument('--tpu', action='append', required=True, help='a TPU VM / slice name (repeatable)')
  tpu.add_argument('--zone', required=True)
  tpu.add_argument('--project', default='')
  tpu.add_argument('--repo_dir', default='tmdm', help='checkout on the hosts (set up by launch/tpu.py --setup)')

  results = sub.add_parser('results', help='write RESULTS (JSONL) from the finished runs under ROOT')
  results.add_argument('--root', required=True)
  results.add_argument('--out', default='', help='default: ROOT/results.jsonl')
  return p


def main(argv=None):
  args, rest = parser().parse_known_args(argv)
  if args.mode == 'results':
    if rest:
      raise SystemExit(f'unexpected arguments: {" ".join(rest)}')
    manifest = Manifest(args.root) if storage.isfile(storage.join(args.root, MANIFEST)) else None
    collect(args.root, manifest, args.out)
    return 0
  overrides = steps_lib.overrides_of(rest)
  return {'run': run_local, 'slurm': submit_slurm, 'tpu': submit_tpu}[args.mode](args, overrides)


if __name__ == '__main__':
  sys.exit(main())
