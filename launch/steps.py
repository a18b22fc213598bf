"""What a launcher does, as data: a list of Steps (write a file, or run a command with extra
environment variables), which `--dry-run` prints as shell lines one can paste and otherwise runs.

Shared by local.py, cpu_mesh.py, tpu.py, slurm.py and sweep.py (imported from this folder).
"""

import dataclasses
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Step:
  argv: tuple = ()  # the command (empty for a file write)
  env: tuple = ()  # (name, value) pairs set for this command only
  write: tuple = ()  # (path, text): write a file instead of running a command
  background: bool = False  # start without waiting (the script waits for all at the end)

  def shell(self) -> str:
    """The step as one pasteable shell line (a heredoc for a file)."""
    if self.write:
      path, text = self.write
      return f"mkdir -p {shlex.quote(os.path.dirname(path) or '.')} && cat > {shlex.quote(path)} <<'EOF'\n{text}EOF"
    prefix = ''.join(f'{k}={shlex.quote(v)} ' for k, v in self.env)
    return prefix + shlex.join(self.argv) + (' &' if self.background else '')


def default_tmdm() -> str:
  """The `tmdm` of this Python's environment when it has one (works without activating it)."""
  here = os.path.join(os.path.dirname(sys.executable), 'tmdm')
  return here if os.path.isfile(here) else 'tmdm'


def tmdm_argv(tmdm: str, command: str, config: str, workdir: str = '', extra=()) -> list:
  argv = [*shlex.split(tmdm), command, f'--config={config}']
  if workdir:
    argv.append(f'--workdir={workdir}')
  return argv + list(extra)


def overrides_of(rest) -> list:
  """Arguments after `--` go to tmdm unchanged; only --config.KEY=VALUE makes sense there."""
  rest = list(rest)
  if rest and rest[0] == '--':
    rest = rest[1:]
  for a in rest:
    if not a.startswith('--config.'):
      raise SystemExit(f'unexpected argument {a!r}: pass config overrides as --config.KEY=VALUE after --')
  return rest


def print_steps(steps, out=None):
  out = out or sys.stdout  # Looked up per call: tests swap sys.stdout.
  for s in steps:
    print(s.shell(), file=out)
  if any(s.background for s in steps):
    print('wait', file=out)


def execute(steps) -> int:
  """Runs steps in order; background steps run together and are waited for at the end."""
  waiting = []
  for s in steps:
    if s.write:
      path, text = s.write
      os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
      with open(path, 'w', encoding='utf-8') as f:
        f.write(text)
      continue
    env = dict(os.environ, **dict(s.env))
    print('+ ' + s.shell(), flush=True)
    if s.background:
      waiting.append(subprocess.Popen(s.argv, env=env))  # pylint: disable=consider-using-with
      continue
    rc = subprocess.call(s.argv, env=env)
    if rc:
      for p in waiting:
        p.terminate()
      return rc
  return max([p.wait() for p in waiting], default=0)


def finish(steps, dry_run: bool) -> int:
  if dry_run:
    print_steps(steps)
    return 0
  return execute(steps)
