"""Goodput: where a run's wall time went, by cause, across restarts.

Every logged training row carries the seconds spent since the previous row by cause
(`goodput/<cause>_s`) and the wall-clock time it was written (`goodput/time`). Causes timed directly:
startup (set-up and data checks before the first step), restore, compile, data (waiting for the next
batch), checkpoint (the blocking part of a save, and the final wait for background saves), eval
(validation and generation metrics); productive is the rest of each interval (dispatching and
computing steps). A restarted run adds one row at the step it resumed from, before the killed run's
later rows are dropped from the log: `lost` is the time those rows accounted for (work computed again)
and `lost_steps` their count; `idle` is the time from the killed run's last row to the restart (the
failure, the wait for a new machine, and unlogged work before the kill). So the rows' seconds add up
to the wall time from the first start to the last row, up to what falls between rows and is not
measured (`unaccounted` in the summary).

`summary(workdir)` reads them back (local or gs://); `tmdm goodput WORKDIR` prints the table and
draws the timeline (plot_timeline).
"""

import contextlib
import time

from tmdm import storage
from tmdm.training import metrics as metrics_lib

CAUSES = ('productive', 'startup', 'restore', 'compile', 'data', 'checkpoint', 'eval', 'idle', 'lost')
PREFIX = 'goodput/'


def key(cause: str) -> str:
  return f'{PREFIX}{cause}_s'


class Account:
  """Seconds by cause since the last row(); wall time not timed by a cause is productive, except
  before `started()` (the first step), where it is startup."""

  def __init__(self):
    self.start = time.time()
    self._interval_start = time.perf_counter()
    self._sums = dict.fromkeys(CAUSES, 0.0)
    self._in_loop = False

  @contextlib.contextmanager
  def timed(self, cause: str):
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self._sums[cause] += time.perf_counter() - t0

  def started(self):
    """The loop begins: the untimed time so far was set-up (the first interval starts at creation)."""
    self._sums['startup'] += max(time.perf_counter() - self._interval_start - sum(self._sums.values()), 0.0)
    self._in_loop = True

  def row(self) -> dict:
    """The interval since the last row, as metric values; starts the next interval."""
    if not self._in_loop:
      self.started()
    now = time.perf_counter()
    sums, self._sums = self._sums, dict.fromkeys(CAUSES, 0.0)
    sums['productive'] = max(now - self._interval_start - sum(sums.values()), 0.0)
    self._interval_start = now
    out = {key(c): s for c, s in sums.items() if s > 0}
    out[f'{PREFIX}time'] = time.time()
    out[f'{PREFIX}run_start'] = self.start
    return out


def restart_row(workdir, start_step: int, now: float) -> dict | None:
  """The lost work and idle time of a restart, from the rows of the previous attempts still in the
  log (call it before the metric writer drops the rows after `start_step`); None on a first start."""
  rows = [r for r in metrics_lib.read_metrics(workdir) if f'{PREFIX}time' in r] if _has_log(workdir) else []
  if not rows:
    return None
  redone = [r for r in rows if r['step'] > start_step]
  trained = [r['step'] for r in redone if 'loss' in r]
  # The first start is kept here too: when no checkpoint survived, every earlier row is dropped, and the
  # wall time must still begin at the first start (or the lost work would exceed it).
  first = min(r.get(f'{PREFIX}run_start', r[f'{PREFIX}time']) for r in rows)
  return {key('lost'): sum(v for r in redone for k, v in r.items() if k.startswith(PREFIX) and k.endswith('_s')),
          f'{PREFIX}lost_steps': float(max(trained, default=start_step) - start_step),
          key('idle'): max(now - max(r[f'{PREFIX}time'] for r in rows), 0.0),
          f'{PREFIX}time': now, f'{PREFIX}run_start': first, f'{PREFIX}restart': 1.0}


def _has_log(workdir) -> bool:
  return storage.isfile(storage.join(workdir, 'metrics.jsonl')) or storage.isdir(storage.join(workdir, 'metrics'))


def summary(workdir) -> dict:
  """{'seconds': {cause: s}, 'share': {cause: fraction}, 'wall_s', 'lost_steps', 'restarts', 'rows'}:
  the run's rows summed; shares are of the wall time from the first start to the last row, with
  `unaccounted` the part no row covers (negative when timed causes overlap)."""
  rows = [r for r in metrics_lib.read_metrics(workdir) if f'{PREFIX}time' in r]
  if not rows:
    raise ValueError(f'{workdir} has no goodput rows (written by tmdm train since goodput accounting)')
  seconds = {c: sum(r.get(key(c), 0.0) for r in rows) for c in CAUSES}
  begin = min(r.get(f'{PREFIX}run_start', r[f'{PREFIX}time']) for r in rows)
  wall = max(r[f'{PREFIX}time'] for r in rows) - begin
  seconds['unaccounted'] = wall - sum(seconds.values())
  share = {c: s / wall if wall > 0 else 0.0 for c, s in seconds.items()}
  return {'seconds': seconds, 'share': share, 'wall_s': wall, 'rows': rows,
          'lost_steps': int(sum(r.get(f'{PREFIX}lost_steps', 0) for r in rows)),
          'restarts': int(sum(r.get(f'{PREFIX}restart', 0) for r in rows))}


def table(s: dict) -> str:
  lines = [f'{"cause":<12} {"seconds":>10} {"share":>7}']
  for cause, seconds in s['seconds'].items():
    lines.append(f'{cause:<12} {seconds:10.1f} {s["share"][cause]:7.1%}')
  lines.append(f'{"wall":<12} {s["wall_s"]:10.1f} {sum(s["share"].values()):7.1%}')
  lines.append(f'goodput (productive share) {s["share"]["productive"]:.1%}; {s["restarts"]} restart(s), '
               f'{s["lost_steps"]} step(s) computed again')
  return '\n'.join(lines)


COLORS = {'productive': '#2e7d32', 'startup': '#9e9e9e', 'restore': '#6a1b9a', 'compile': '#f9a825',
          'data': '#0277bd', 'checkpoint': '#ef6c00', 'eval': '#00838f', 'idle': '#bdbdbd', 'lost': '#c62828'}


def plot_timeline(s: dict, path):
  """Each row's interval as a bar split by cause, along wall time since the first start (PNG)."""
  import io  # pylint: disable=import-outside-toplevel
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  rows = sorted(s['rows'], key=lambda r: r[f'{PREFIX}time'])
  begin = min(r.get(f'{PREFIX}run_start', r[f'{PREFIX}time']) for r in rows)
  fig, (ax, bx) = plt.subplots(2, 1, figsize=(10, 3.8), height_ratios=(1, 1.4))
  for r in rows:
    end = r[f'{PREFIX}time'] - begin
    left = end - sum(r.get(key(c), 0.0) for c in CAUSES)
    for cause in CAUSES:
      width = r.get(key(cause), 0.0)
      if width > 0:
        ax.barh(0, width, left=left, color=COLORS[cause], edgecolor='none')
        left += width
  ax.set_yticks([])
  ax.set_xlabel('wall time since the first start (s)')
  ax.set_title(f'goodput {s["share"]["productive"]:.1%}: {s["restarts"]} restart(s), '
               f'{s["lost_steps"]} step(s) computed again')
  causes = [c for c in (*CAUSES, 'unaccounted') if abs(s['seconds'][c]) > 0]
  bx.barh(range(len(causes)), [s['share'][c] for c in causes], color=[COLORS.get(c, '#000000') for c in causes])
  bx.set_yticks(range(len(causes)), causes)
  bx.invert_yaxis()
  bx.set_xlabel('share of wall time')
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=110)
  plt.close(fig)
  storage.write_bytes(str(path), buf.getvalue())
