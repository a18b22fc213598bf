"""`tmdm study report ROOT`: any finished sweep (launch/sweep.py) as a table and a figure, with the seeds
of each setting grouped.

A run's *setting* is its name less a trailing `-s<seed>` (its config's `seed`): the runs of one setting
are its seeds. A run's values are its final metrics (every numeric key of the rows logged at
train.num_steps: the validation ELBOs eval/..., and the generation scores t2i/..., t2s/... when
eval.every_steps ran them); runs that did not reach num_steps are listed as unfinished and left out.
Per setting and metric the report gives the seeds' values, their mean and sample standard deviation
(n - 1), and the paired difference to a baseline setting: value minus the baseline's value at the same
seed (same initialization, data order and training masks), its mean over the common seeds and the
range of the per-seed differences, so that a claimed difference can be set against its spread.

Outputs (OUT, default ROOT/report; a folder or a gs:// URL): results.json (every run's values, the
summary), table.md (two Markdown tables: means +- std, paired differences) and study.png (a panel per
metric: every seed as a point, the mean with its std as an error bar). With `x` ({metric: config
key}, e.g. the mixing study's eval/loss/image against data.mix_image) those panels plot the metric
against the run's value of the key instead (a trade-off curve; settings' means joined in x order).
"""

import io
import json
import math
import re

import ml_collections
import numpy as np

from tmdm import errors, storage, vocab as vocab_lib
from tmdm.training import metrics as metrics_lib

MANIFEST = 'manifest.json'
# The default metrics, in this order, when present: validation ELBO per modality, then generation scores.
DEFAULT_METRICS = tuple(f'eval/loss/{m}' for m in vocab_lib.MODALITIES) + (
    'eval/image/conditional/loss/text', 'eval/image/conditional/loss/image', 'eval/audio/conditional/loss/audio',
    't2i/digit_acc', 't2i/fd', 't2s/score', 'i2t/digit_acc', 's2t/word_acc', 'text/infill_token_acc')
# Lower is better for these (ELBOs, distances); higher for the rest. Only used to word the table.
_LOWER_BETTER = re.compile(r'(^|/)(loss|ppl|fd|mel_dtw)(/|$)')


def _runs_of(root):
  """[(name, workdir)]: the manifest's runs in its order, else every subfolder with a config.json."""
  path = storage.join(root, MANIFEST)
  if storage.isfile(path):
    names = list(json.loads(storage.read_text(path)).get('runs', {}))
  else:
    names = sorted(d for d in storage.listdir(root) if storage.isfile(storage.join(root, d, 'config.json')))
  return [(n, storage.join(root, n)) for n in names]


def _final_values(workdir):
  """(config, {metric: value}) of a run that reached train.num_steps, else (config or None, None)."""
  cfg_path = storage.join(workdir, 'config.json')
  if not storage.isfile(cfg_path):
    return None, None
  cfg = ml_collections.ConfigDict(json.loads(storage.read_text(cfg_path)))
  try:
    rows = metrics_lib.read_metrics(workdir)
  except FileNotFoundError:
    return cfg, None
  steps = cfg.train.num_steps
  final = [r for r in rows if r.get('step') == steps]
  if not final:
    return cfg, None
  values = {}
  for r in final:  # Training window, validation and generation rows of the last step, later rows win.
    values.update({k: float(v) for k, v in r.items()
                   if k != 'step' and isinstance(v, (int, float)) and not isinstance(v, bool)})
  return cfg, values


def _config_value(cfg, key):
  node = cfg
  for part in key.split('.'):
    if part not in node:
      raise errors.ConfigError(f'the runs\' config has no key {key!r}')
    node = node[part]
  return float(node)


def collect(root, keys=()) -> dict:
  """{'runs': [{name, setting, seed, values, config: {key: value for keys}}], 'unfinished': [names]}."""
  runs, unfinished = [], []
  for name, workdir in _runs_of(root):
    cfg, values = _final_values(workdir)
    if values is None:
      unfinished.append(name)
      continue
    seed = int(cfg.seed)
    suffix = f'-s{seed}'
    setting = name[:-len(suffix)] if name.endswith(suffix) and len(name) > len(suffix) else name
    runs.append(dict(name=name, setting=setting, seed=seed, values=values,
                     config={k: _config_value(cfg, k) for k in keys}))
  return {'runs': runs, 'unfinished': unfinished}


def choose_metrics(runs, wanted=''):
  """The metrics to report: `wanted` (comma list; each must be in some run) or the present defaults."""
  present = set().union(*(r['values'] for r in runs)) if runs else set()
  if wanted:
    names = [m for m in wanted.split(',') if m]
    missing = [m for m in names if m not in present]
    if missing:
      raise errors.ConfigError(f'no run logged {", ".join(missing)} at its last step (logged: '
                               f'{", ".join(sorted(k for k in present if "/" in k)[:40])} ...)')
    return names
  names = [m for m in DEFAULT_METRICS if m in present]
  return names or sorted(k for k in present if k.startswith('eval/loss'))


def summarize(runs, metric_names, baseline=''):
  """Per setting (first-seen order) and metric: seeds' values, mean, std (n - 1; None for one seed), and
  the paired difference to `baseline` (default: the first setting) over the seeds both have."""
  settings = list(dict.fromkeys(r['setting'] for r in runs))
  if not settings:
    raise errors.ConfigError('no finished run to report')
  baseline = baseline or settings[0]
  if baseline not in settings:
    raise errors.ConfigError(f'--baseline {baseline!r} is no setting of this sweep ({", ".join(settings)})')
  by = {s: {r['seed']: r['values'] for r in runs if r['setting'] == s} for s in settings}
  out = {}
  for s in settings:
    out[s] = {}
    for m in metric_names:
      seeds = {sd: v[m] for sd, v in sorted(by[s].items()) if m in v and math.isfinite(v[m])}
      vals = np.array(list(seeds.values()))
      entry = {'seeds': seeds, 'n': len(vals), 'mean': float(vals.mean()) if len(vals) else None,
               'std': float(vals.std(ddof=1)) if len(vals) > 1 else None}
      base = {sd: v[m] for sd, v in by[baseline].items() if m in v and math.isfinite(v[m])}
      common = sorted(set(seeds) & set(base))
      if s != baseline and common:
        diffs = np.array([seeds[sd] - base[sd] for sd in common])
        entry['diff'] = {'mean': float(diffs.mean()), 'min': float(diffs.min()), 'max': float(diffs.max()),
                         'n': len(diffs)}
      out[s][m] = entry
  return {'baseline': baseline, 'settings': settings, 'metrics': list(metric_names), 'table': out}


def _fmt(x, digits=4):
  return '-' if x is None else f'{x:.{digits}g}'


def markdown(summary, title='') -> str:
  table, metric_names = summary['table'], summary['metrics']
  lines = [f'# {title}', ''] if title else []
  lines += ['Mean +- standard deviation over seeds (n seeds); ' +
            ', '.join(f'{m} ({"lower" if _LOWER_BETTER.search(m) else "higher"} is better)' for m in metric_names) + '.',
            '', '| setting | seeds | ' + ' | '.join(metric_names) + ' |', '|---|---|' + '---|' * len(metric_names)]
  for s in summary['settings']:
    n = max(e['n'] for e in table[s].values())
    cells = [f'{_fmt(e["mean"])} +- {_fmt(e["std"], 2)}' if e['std'] is not None else _fmt(e['mean'])
             for e in table[s].values()]
    lines.append(f'| {s} | {n} | ' + ' | '.join(cells) + ' |')
  lines += ['', f'Paired difference to `{summary["baseline"]}` (same seed): mean [min, max] over the common seeds.',
            '', '| setting | ' + ' | '.join(metric_names) + ' |', '|---|' + '---|' * len(metric_names)]
  for s in summary['settings']:
    if s == summary['baseline']:
      continue
    cells = []
    for e in table[s].values():
      d = e.get('diff')
      cells.append('-' if d is None else f'{d["mean"]:+.3g} [{d["min"]:+.3g}, {d["max"]:+.3g}] (n {d["n"]})')
    lines.append(f'| {s} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def _against(ax, runs, summary, metric, key):
  """A panel of `metric` against the config value `key`: runs as points, settings' means as a line."""
  pts = [(r['config'][key], r['values'][metric]) for r in runs if metric in r['values']]
  ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=16, alpha=0.7, color='tab:blue', zorder=2)
  means = sorted((next(r['config'][key] for r in runs if r['setting'] == s), summary['table'][s][metric]['mean'], s)
                 for s in summary['settings'] if summary['table'][s][metric]['mean'] is not None)
  ax.plot([m[0] for m in means], [m[1] for m in means], 'k-', lw=1, zorder=3)
  for x_, y_, s in means:
    ax.annotate(s, (x_, y_), fontsize=7, xytext=(3, 3), textcoords='offset points')
  ax.set_xlabel(key)


def figure(summary, title='', runs=(), x=None) -> bytes:
  """PNG bytes: one panel per metric; x the settings, each seed a point, the mean +- std a bar (or,
  for metrics in `x`, the metric against a config key: module docstring)."""
  x_of = x or {}
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  names, settings, table = summary['metrics'], summary['settings'], summary['table']
  cols = min(3, len(names))
  rows = math.ceil(len(names) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(1.2 + 0.55 * len(settings) * cols + 2 * cols, 3.6 * rows),
                           squeeze=False)
  x = np.arange(len(settings))
  for ax, m in zip(axes.flat, names):
    ax.set_title(f'{m} ({"lower" if _LOWER_BETTER.search(m) else "higher"} is better)', fontsize=9)
    ax.grid(True, alpha=0.3)
    if m in x_of:
      _against(ax, runs, summary, m, x_of[m])
      continue
    means = [table[s][m]['mean'] for s in settings]
    stds = [table[s][m]['std'] or 0.0 for s in settings]
    ok = [i for i, v in enumerate(means) if v is not None]
    ax.errorbar(x[ok], [means[i] for i in ok], yerr=[stds[i] for i in ok], fmt='s', color='k', ms=6, capsize=4,
                zorder=3, label='mean +- std')
    for i, s in enumerate(settings):
      seeds = table[s][m]['seeds']
      ax.scatter(np.full(len(seeds), i) + np.linspace(-0.12, 0.12, len(seeds)) if len(seeds) > 1 else [i],
                 list(seeds.values()), s=16, alpha=0.7, color='tab:blue', zorder=2)
    base = table[summary['baseline']][m]['mean']
    if base is not None:
      ax.axhline(base, color='gray', ls=':', lw=1)
    ax.set_xticks(x)
    ax.set_xticklabels(settings, rotation=35, ha='right', fontsize=8)
  for ax in list(axes.flat)[len(names):]:
    ax.axis('off')
  fig.suptitle(title or 'study', fontsize=10)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=110)
  plt.close(fig)
  return buf.getvalue()


def parse_x(text: str) -> dict:
  """'METRIC:KEY,METRIC:KEY' -> {metric: config key}."""
  out = {}
  for item in (t for t in text.split(',') if t):
    metric, sep, key = item.rpartition(':')
    if not sep or not metric or not key:
      raise errors.ConfigError(f'--x takes METRIC:CONFIG_KEY pairs, got {item!r}')
    out[metric] = key
  return out


def report(root, out='', metrics='', baseline='', title='', x='') -> dict:
  """Writes OUT/results.json, OUT/table.md and OUT/study.png; returns the summary."""
  x_of = parse_x(x) if isinstance(x, str) else dict(x or {})
  got = collect(root, sorted(set(x_of.values())))
  names = choose_metrics(got['runs'], metrics)
  unknown = sorted(set(x_of) - set(names))
  if unknown:
    raise errors.ConfigError(f'--x names metrics not reported: {", ".join(unknown)}')
  summary = summarize(got['runs'], names, baseline)
  title = title or str(root).rstrip('/').rsplit('/', 1)[-1]
  out = out or storage.join(root, 'report')
  storage.makedirs(out)
  storage.write_text(storage.join(out, 'results.json'), json.dumps(
      {'title': title, **summary, 'runs': got['runs'], 'unfinished': got['unfinished']}, indent=1))
  storage.write_text(storage.join(out, 'table.md'), markdown(summary, title))
  storage.write_bytes(storage.join(out, 'study.png'), figure(summary, title, got['runs'], x_of))
  return {**summary, 'out': out, 'unfinished': got['unfinished'], 'runs': len(got['runs'])}


def command(args) -> int:
  """`tmdm study report ROOT`."""
  if not storage.isdir(args.root):
    raise errors.ConfigError(f'no sweep folder {args.root}')
  got = report(args.root, args.out, args.metrics, args.baseline, args.title, args.x)
  print(storage.read_text(storage.join(got['out'], 'table.md')))
  if got['unfinished']:
    print(f'unfinished (left out): {", ".join(got["unfinished"])}')
  print(f'wrote {got["out"]}/results.json, table.md, study.png ({got["runs"]} runs, '
        f'{len(got["settings"])} settings)')
  return 0
