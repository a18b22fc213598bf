"""Loading experiment files and applying command-line overrides (validation: checks.py).

`load("experiments/demo.py:tiny", ["--config.optim.lr=3e-4"])` imports the file, calls
`get_config("tiny")`, applies the overrides (typed by the existing value; unknown keys fail) and
validates the result. Every problem is a `ConfigError` whose message is one line a user can act on.
"""

import ast
import difflib
import importlib.util
import json
import logging
import os

import ml_collections

from tmdm.config import base
from tmdm.config.checks import validate
from tmdm.errors import ConfigError

log = logging.getLogger('tmdm')


def _flat_keys(cfg, prefix=''):
  for key, value in cfg.items():
    name = f'{prefix}{key}'
    if isinstance(value, ml_collections.ConfigDict):
      yield from _flat_keys(value, name + '.')
    else:
      yield name


def _merge(cfg, saved: dict, where=''):
  """cfg <- saved for the keys cfg knows (a run written before a key existed still loads)."""
  for key, value in saved.items():
    if key not in cfg:
      log.debug('ignoring %s%s from a saved config (no longer a config key)', where, key)
    elif isinstance(cfg[key], ml_collections.ConfigDict):
      _merge(cfg[key], value, f'{where}{key}.')
    else:
      cfg[key] = tuple(value) if isinstance(cfg[key], tuple) else value


def from_dict(saved: dict) -> ml_collections.ConfigDict:
  """The base config with a saved run's settings (its config.json) merged in."""
  cfg = base.get_config()
  _merge(cfg, saved)
  return cfg


def load_file(spec: str) -> ml_collections.ConfigDict:
  """Imports `path.py[:arg]` and returns its `get_config(arg)`; a `.json` file is a run's saved config
  (WORKDIR/config.json: e.g. fine-tuning a run made by `tmdm import`)."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ConfigError(f'config file not found: {path}')
  if path.endswith('.json'):
    try:
      with open(path, encoding='utf-8') as f:
        return from_dict(json.load(f))
    except json.JSONDecodeError as e:
      raise ConfigError(f'{path} is not a JSON config: {e}') from None
  module_spec = importlib.util.spec_from_file_location('_tmdm_experiment', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'{path} defines no get_config(arg)')
  try:
    cfg = module.get_config(arg or None)
  except KeyError as e:  # Presets are dict lookups; name the choices.
    presets = getattr(module, 'PRESETS', {})
    raise ConfigError(f'{path}: unknown preset {e} (choices: {", ".join(presets) or "none"})') from None
  _check_base_keys(cfg, path)
  return cfg


def _check_base_keys(cfg, path):
  known = set(_flat_keys(base.get_config()))
  for key in _flat_keys(cfg):
    if key not in known:
      raise ConfigError(f'{path}: unknown config key {key!r}{_suggest(key, known)}')


def _suggest(key, known):
  close = difflib.get_close_matches(key, sorted(known), n=1)
  return f' (did you mean {close[0]!r}?)' if close else ''


def _parse_value(text: str, current):
  if isinstance(current, bool):
    low = text.lower()
    if low in ('true', '1', 'yes'):
      return True
    if low in ('false', '0', 'no'):
      return False
    raise ValueError(f'expected a boolean, got {text!r}')
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      try:
        as_float = float(text)  # Accept 1e5 for an integer key, but not 2.5.
      except ValueError:
        raise ValueError(f'expected an integer, got {text!r}') from None
      if not as_float.is_integer():
        raise ValueError(f'expected an integer, got {text!r}') from None
      return int(as_float)
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise ValueError(f'expected a number, got {text!r}') from None
  if isinstance(current, str):
    return text
  return ast.literal_eval(text)


def apply_overrides(cfg, overrides):
  """Applies `--config.a.b=value` (or `a.b=value`) strings in place."""
  known = set(_flat_keys(cfg))
  for item in overrides:
    text = item[len('--config.'):] if item.startswith('--config.') else item
    key, sep, raw = text.partition('=')
    if not sep:
      raise ConfigError(f'override {item!r} is not of the form --config.key=value')
    if key not in known:
      raise ConfigError(f'unknown config key {key!r}{_suggest(key, known)}')
    *parents, leaf = key.split('.')
    node = cfg
    for p in parents:
      node = node[p]
    try:
      node[leaf] = _parse_value(raw, node[leaf])
    except (ValueError, TypeError, SyntaxError) as e:
      raise ConfigError(f'--config.{key}: {e}') from None
  return cfg


def load(spec: str, overrides=(), num_devices=None, process_count=1):
  cfg = apply_overrides(load_file(spec), overrides)
  validate(cfg, num_devices, process_count)
  return cfg


