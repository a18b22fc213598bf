"""Metric sinks: JSONL (one object per logged step) and TensorBoard event files, primary process only.

On disk the JSONL is one file, WORKDIR/metrics.jsonl, appended and flushed per line. An object store
has no append (gcsfs turns `open('a')` into an overwrite), so under a URL the lines go to bounded
parts, WORKDIR/metrics/part-<first step>.jsonl, each rewritten whole when a line is added and closed
after PART_LINES lines: a kill loses no line that was written, and no upload grows with the run.
A run resumed from step S first drops the lines of steps after S (the killed run's, which the resumed
run logs again), so every step is in the log once. `read_metrics(workdir)` reads either layout.
"""

import json
import math
import os

from tmdm import storage

PART_LINES = 500  # Lines per object of a URL workdir's metrics log.


class MetricWriter:

  def __init__(self, workdir, *, tensorboard: bool, enabled: bool = True, start_step: int | None = None):
    self.enabled = enabled
    self._sink = None
    self._tb = None
    if not enabled:
      return
    storage.makedirs(workdir)
    self._sink = (_Parts(storage.join(workdir, 'metrics')) if storage.is_url(workdir) else
                  _Appended(os.path.join(workdir, 'metrics.jsonl')))
    self._sink.drop_after(start_step)
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(workdir)  # gs:// through google-cloud-storage (STORAGE_EMULATOR_HOST in tests)

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    self._sink.add(json.dumps({'step': int(step), **clean}))
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(k, v, int(step))
      self._tb.flush()

  def close(self):
    if self._sink:
      self._sink.close()
    if self._tb:
      self._tb.close()


def _steps_at_most(lines, step):
  return [line for line in lines if json.loads(line).get('step', 0) <= step]


class _Appended:
  """One local file, appended; a line cut short by a kill is dropped when the file is opened again."""

  def __init__(self, path):
    self.path = path
    self._read = _read_lines(path) if os.path.isfile(path) else []  # Until drop_after: read once.
    self._rewrite(self._read)
    self._file = open(path, 'a', encoding='utf-8')

  def _rewrite(self, lines):
    storage.write_text(self.path, ''.join(line + '\n' for line in lines))

  def drop_after(self, step):
    if step is None:
      return
    self._file.close()
    lines = self._read if self._read is not None else _read_lines(self.path)
    kept = _steps_at_most(lines, step)
    if len(kept) < len(lines):
      self._rewrite(kept)
    self._read = kept
    self._file = open(self.path, 'a', encoding='utf-8')

  def add(self, line: str):
    self._read = None  # The file has moved on from what was read at open.
    self._file.write(line + '\n')
    self._file.flush()

  def close(self):
    self._file.close()


class _Parts:
  """Objects of at most PART_LINES lines under a URL folder, each written whole."""

  def __init__(self, folder):
    self.folder, self.name, self.lines = folder, None, []

  def drop_after(self, step):
    if step is None:
      return
    for name in _part_names(self.folder):
      path = storage.join(self.folder, name)
      lines = _read_lines(path)
      kept = _steps_at_most(lines, step)
      if not kept:
        storage.remove(path)
      elif len(kept) < len(lines):
        storage.write_text(path, ''.join(line + '\n' for line in kept))

  def add(self, line: str):
    if self.name is None or len(self.lines) >= PART_LINES:
      self.name, self.lines = f'part-{json.loads(line)["step"]:010d}-{len(_part_names(self.folder)):05d}.jsonl', []
    self.lines.append(line)
    storage.write_text(storage.join(self.folder, self.name), ''.join(x + '\n' for x in self.lines))

  def close(self):
    pass


def _part_names(folder):
  return sorted(n for n in storage.listdir(folder) if n.startswith('part-') and n.endswith('.jsonl'))


def _read_lines(path):
  """The complete lines of a JSONL file (a last line without its newline was cut short)."""
  text = storage.read_text(path)
  lines = text.split('\n')
  return [line for line in lines[:-1] if line.strip()]


def read_jsonl(path):
  """The rows of one JSONL file (local or URL)."""
  return [json.loads(line) for line in _read_lines(path)]


def read_metrics(workdir):
  """Every logged row of a run, in order, from either layout (metrics.jsonl or metrics/part-*)."""
  single = storage.join(workdir, 'metrics.jsonl')
  if storage.isfile(single):
    return read_jsonl(single)
  folder = storage.join(workdir, 'metrics')
  return [row for name in _part_names(folder) for row in read_jsonl(storage.join(folder, name))]
