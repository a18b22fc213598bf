"""Sweeps: an experiment file's `get_sweep(arg)` expanded into named runs, and the RESULTS rows that
`tmdm scaling fit` reads, collected from finished runs' workdirs.

get_sweep(arg) returns either
  - a list of runs, each a dict of dotted config keys -> values, with an optional 'name'; or
  - a grid, {axis: {label: {dotted key: value, ...}}} or {dotted key: [values]}, whose Cartesian
    product gives the runs (named by joining the labels, e.g. 'w64-s200').
Every run is `tmdm train --config=FILE[:ARG] --workdir=ROOT/NAME --config.KEY=VALUE ...`: the
file's get_config(arg) plus the run's overrides, so any run can be repeated by hand.

A RESULTS row (one per finished run and modality):
  {name, modality, loss, params (non-embedding, ModelConfig.non_embedding_params),
   tokens = steps x train.batch_size x data.seq_len, flops = 6 N D, steps, source}
with `loss` the final validation ELBO eval/loss/<modality> when the run evaluated at its last step,
else the last logged training loss/<modality> (`source` says which).
"""

import dataclasses
import importlib.util
import itertools
import json
import os
import re

import ml_collections

from tmdm import errors, storage, vocab as vocab_lib
from tmdm.config import loader as config_loader
from tmdm.model import config as model_config
from tmdm.training import metrics

_NAME_OK = re.compile(r'^[A-Za-z0-9_.=+-]+$')


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  overrides: dict  # dotted config key -> value

  def override_args(self):
    return [f'--config.{k}={_format(v)}' for k, v in self.overrides.items()]


def _format(value):
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  return str(value)


def load_sweep(config_spec: str):
  """The sweep of `path.py[:arg]` (its get_sweep(arg)), expanded into Runs."""
  path, _, arg = config_spec.partition(':')
  if not os.path.isfile(path):
    raise errors.ConfigError(f'sweep file not found: {path}')
  module_spec = importlib.util.spec_from_file_location('_tmdm_sweep', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_sweep'):
    raise errors.ConfigError(f'{path} defines no get_sweep(arg)')
  return expand(module.get_sweep(arg or None))


def expand(sweep) -> list:
  if isinstance(sweep, dict):
    runs = _grid(sweep)
  else:
    runs = [Run(str(r.get('name') or f'run{i:03d}'), {k: v for k, v in r.items() if k != 'name'})
            for i, r in enumerate(sweep)]
  names = [r.name for r in runs]
  for name in names:
    if not _NAME_OK.match(name):
      raise errors.ConfigError(f'sweep run name {name!r} must be letters, digits and _.=+- (it names a folder)')
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise errors.ConfigError(f'sweep run names repeat: {", ".join(dupes)}')
  return runs


def _axis(key, values):
  """One grid axis as [(label, overrides)]."""
  if isinstance(values, dict):
    return [(str(label), dict(o) if isinstance(o, dict) else {key: o}) for label, o in values.items()]
  leaf = key.rsplit('.', 1)[-1]
  return [(f'{leaf}{v}', {key: v}) for v in values]


def _grid(grid):
  axes = [_axis(k, v) for k, v in grid.items()]
  runs = []
  for combo in itertools.product(*axes):
    overrides = {}
    for _, o in combo:
      overrides.update(o)
    runs.append(Run('-'.join(label for label, _ in combo), overrides))
  return runs


def check_configs(config_spec: str, runs, num_devices=None):
  """Loads and validates every run's config before anything starts: one bad key fails the sweep."""
  for r in runs:
    try:
      config_loader.load(config_spec, r.override_args(), num_devices=num_devices)
    except errors.ConfigError as e:
      raise errors.ConfigError(f'sweep run {r.name}: {e}') from None


def run_results(workdir: str, name: str = '') -> list:
  """RESULTS rows of one finished run ([] when it did not reach train.num_steps)."""
  cfg_path = storage.join(workdir, 'config.json')  # A folder or a URL (gs://bucket/sweep/run).
  if not storage.isfile(cfg_path):
    return []
  cfg = ml_collections.ConfigDict(json.loads(storage.read_text(cfg_path)))
  try:
    rows = metrics.read_metrics(workdir)
  except FileNotFoundError:
    return []
  steps = cfg.train.num_steps
  if not rows or max(r.get('step', 0) for r in rows) < steps:
    return []
  vocab = vocab_lib.VocabSpec.from_config(cfg.vocab)
  params = model_config.ModelConfig.from_config(cfg.model, vocab.size).non_embedding_params
  tokens = steps * cfg.train.batch_size * cfg.data.seq_len
  out = []
  for modality in vocab_lib.MODALITIES:
    loss, source = _final(rows, steps, modality)
    if loss is not None:
      out.append(dict(name=name or str(workdir).rstrip('/').rsplit('/', 1)[-1], modality=modality, loss=loss,
                      params=params, tokens=tokens, flops=6.0 * params * tokens, steps=steps, source=source,
                      workdir=storage.absolute(workdir)))
  return out


def _final(rows, steps, modality):
  evals = [r for r in rows if r.get('step') == steps and f'eval/loss/{modality}' in r]
  if evals:
    return float(evals[-1][f'eval/loss/{modality}']), 'eval'
  train_rows = [r for r in rows if f'loss/{modality}' in r]
  if train_rows:
    return float(train_rows[-1][f'loss/{modality}']), 'train'
  return None, None


def write_results(path: str, rows) -> str:
  storage.makedirs(storage.parent(storage.absolute(path)))
  storage.write_text(path, ''.join(json.dumps(r) + '\n' for r in rows))
  return path
