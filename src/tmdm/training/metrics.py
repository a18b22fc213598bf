"""Metric sinks: JSONL (one object per logged step) and TensorBoard event files, primary process only."""

import json
import math
import os


class MetricWriter:

  def __init__(self, workdir, *, tensorboard: bool, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, 'metrics.jsonl')
    _drop_partial_line(path)
    self._jsonl = open(path, 'a', encoding='utf-8')
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(workdir)

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    self._jsonl.write(json.dumps({'step': int(step), **clean}) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(k, v, int(step))
      self._tb.flush()

  def close(self):
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()


def _drop_partial_line(path):
  """A run killed mid-write leaves a line without its newline; cut it before appending."""
  if not os.path.isfile(path):
    return
  with open(path, 'rb+') as f:
    data = f.read()
    if data and not data.endswith(b'\n'):
      f.truncate(data.rfind(b'\n') + 1)


def read_jsonl(path):
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]
