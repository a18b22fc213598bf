"""`tmdm sample-sweep`: measure sampler settings on a trained checkpoint and pick a task's defaults.

For one task it runs the task's evaluator (evaluate.TASK_EVALUATOR) for every combination of
  reveal rule   'ancestral', 'confidence:SCHEDULE' (sampling.COUNT_SCHEDULES), 'threshold:TAU',
                'entropy:GAMMA' (the entropy budget in nats)
  steps         total denoising steps (an upper bound for 'threshold' and 'entropy')
  temperature
  guidance      classifier-free guidance weight w (cross-modal tasks)
  cache         0, 1: the cached sampler (keys and values refreshed at block starts)
and writes sweep.csv, sweep.md (a table sorted by the score below), sweep.png (the metric against
steps, one line per rule and temperature, one panel per guidance weight; for T2I a second row with
the diversity) and sweep_speed.png (the metric against wall time per sample). The chosen setting is
the best *score*; among settings within `tolerance` of it (exact ties by default), the best by the
task's secondary metric (evaluate.SECONDARY: T2I the Fréchet distance), then the one with the fewest
forward passes. With --fastest it weighs
speed instead: among the settings whose score is within the noise of the best (the 95% paired
bootstrap interval of the score difference on the same items reaches 0, and so does that of the
secondary metric where the evaluator gives it per item: I2T / S2T token accuracy), the one with the
least wall time per sample (the median over its sampling calls; sample_bench.measure).

The score is the task's metric, except for tasks with a diversity measure (evaluate.DIVERSITY: T2I's
t2i/diversity, the within-digit spread of the samples over that of real digits), where it is
  score = metric x min(1, diversity)
so that a setting which draws one image per digit (diversity near 0) cannot win on accuracy alone,
while diversity above real handwriting's earns nothing (it would reward noise). Accuracy and
diversity count alike: halving either halves the score.

`--record=FILE.json` writes the chosen setting (with its metric, score and the command) into a file
the user names and prints the line that puts it into an experiment file; no config reads it by
itself, so an experiment gives the same settings until someone changes the experiment.

Steps, temperature, guidance and tau are traced sampler inputs (sampling.Knobs): one compile per
reveal rule serves the whole grid.
"""

import csv
import datetime
import itertools
import json
import logging
import math
import os

import numpy as np

from tmdm import errors, storage
from tmdm.diffusion import sampling
from tmdm.evaluation import evaluators as evaluate
from tmdm.generation import generate, tasks as tasks_lib
from tmdm.tools import sample_bench

log = logging.getLogger('tmdm')


def parse_rule(text: str, section) -> tuple[str, dict]:
  """'confidence:cosine' -> ('confidence', {'schedule': 'cosine'}); 'threshold:0.8' -> tau 0.8."""
  name, _, arg = text.partition(':')
  if name not in sampling.SAMPLERS:
    raise errors.ConfigError(f'unknown sampler {name!r} in {text!r} (choices: {", ".join(sampling.SAMPLERS)})')
  if name == 'confidence':
    schedule = arg or section.schedule
    if schedule not in sampling.COUNT_SCHEDULES:
      raise errors.ConfigError(f'unknown schedule {schedule!r} (choices: {", ".join(sampling.COUNT_SCHEDULES)})')
    return name, {'schedule': schedule}
  if name == 'threshold':
    return name, {'threshold': float(arg) if arg else section.threshold}
  if name == 'entropy':
    return name, {'entropy_budget': float(arg) if arg else section.entropy_budget}
  return name, {}


def _floats(text):
  return [float(x) for x in text.split(',') if x.strip()]


def run_sweep(ctx: generate.Context, task: str, *, rules, steps, temperatures, guidance, tolerance: float = 0.0,
              caches=(False,), fastest: bool = False):
  """Rows of {setting..., metrics...} for the grid, and the chosen row."""
  if task not in evaluate.TASK_EVALUATOR:
    raise errors.ConfigError(f'no evaluator for task {task!r} (choices: {", ".join(evaluate.TASK_EVALUATOR)})')
  metric, higher = evaluate.PRIMARY[task]
  section = tasks_lib.sampler_section(ctx.cfg.sample, task)
  guidance = guidance if tasks_lib.TASKS[task].kind != 'text' else [0.0]
  rows = []
  for rule, cache in itertools.product(rules, caches):
    name, extra = parse_rule(rule, section)
    spec_ = sampling.SamplerSpec(sampler=name, schedule=extra.get('schedule', section.schedule), top_p=section.top_p,
                                 block_len=section.block_len, guided=any(w != 0 for w in guidance),
                                 guidance_schedule=section.guidance_schedule, reuse=section.reuse, cache=bool(cache))
    for n_steps, temp, w in itertools.product(steps, temperatures, guidance):
      knobs = sampling.Knobs(steps=int(n_steps), temperature=float(temp), guidance=float(w),
                             threshold=extra.get('threshold', section.threshold),
                             entropy_budget=extra.get('entropy_budget', section.entropy_budget),
                             refresh=section.refresh)
      got = sample_bench.measure(ctx, task, spec_, knobs)
      row = {'rule': rule, 'sampler': name, 'schedule': spec_.schedule, 'threshold': knobs.threshold,
             'entropy_budget': knobs.entropy_budget, 'cache': int(cache), 'steps': int(n_steps),
             'temperature': float(temp), 'guidance': float(w), 'metric': got[metric],
             **{k: v for k, v in got.items() if k != metric}}
      log.info('%s cache=%d steps=%d T=%g w=%g: %s=%.4f, %.3f s/sample', rule, cache, n_steps, temp, w, metric,
               got[metric], got['wall_s'])
      rows.append(row)
  for r in rows:
    r['score'] = score(task, r, higher)
  best_row = max(rows, key=lambda r: r['score'])
  if fastest:
    _, second_higher = evaluate.SECONDARY.get(task, (None, True))
    for r in rows:
      lo, hi = sample_bench.bootstrap(_score_items(task, r, higher), _score_items(task, best_row, higher))
      r['score_delta_interval'] = (lo, hi)
      r['within_noise'] = bool(hi >= 0)
      if r.get('_items_secondary') is not None and best_row.get('_items_secondary') is not None:
        # The secondary metric must not be clearly worse either (e.g. I2T captions that keep the digit
        # but lose the words around it).
        lo2, hi2 = sample_bench.bootstrap(r['_items_secondary'], best_row['_items_secondary'])
        r['secondary_delta_interval'] = (lo2, hi2)
        r['within_noise'] &= bool(hi2 >= 0) if second_higher else bool(lo2 <= 0)
    chosen = min((r for r in rows if r['within_noise']), key=lambda r: (r['wall_s'], -r['score']))
    return rows, chosen, metric, higher
  close = [r for r in rows if r['score'] >= best_row['score'] - tolerance]
  cost = lambda r: r.get('forward_passes', r['steps'])
  second, second_higher = evaluate.SECONDARY.get(task, (None, True))
  tie = lambda r: 0.0 if second is None else (-r[second] if second_higher else r[second])
  chosen = min(close, key=lambda r: (tie(r), cost(r), -r['score']))
  return rows, chosen, metric, higher


def _score_items(task, row, higher):
  """Per-item (numerators, denominators) whose ratio is the row's score (see score())."""
  num, den = row['_items']
  factor = (1.0 if higher else -1.0)
  if task in evaluate.DIVERSITY:
    factor *= min(1.0, max(0.0, row[evaluate.DIVERSITY[task]]))
  return np.asarray(num) * factor, den


def score(task, row, higher) -> float:
  """What the sweep maximizes (module docstring): the metric (negated when lower is better), times
  min(1, diversity) for tasks with a diversity measure."""
  value = row['metric'] if higher else -row['metric']
  if task in evaluate.DIVERSITY:
    if not higher:
      raise ValueError(f'{task}: diversity weighting needs a higher-is-better metric')
    diversity = row[evaluate.DIVERSITY[task]]
    if not math.isfinite(diversity):  # One sample per digit: no spread to measure.
      raise errors.ConfigError(f'{task}: the diversity needs 2 or more samples per class; raise eval.num '
                               '(T2I: at least 20)')
    value *= min(1.0, max(0.0, diversity))
  return value


def _write_table(out_dir, rows, metric, higher):
  rows = [{k: v for k, v in r.items() if not k.startswith('_')} for r in rows]
  keys = list(dict.fromkeys(k for r in rows for k in r))
  with open(os.path.join(out_dir, 'sweep.csv'), 'w', newline='', encoding='utf-8') as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
  ordered = sorted(rows, key=lambda r: -r['score'])
  cols = (['rule', 'cache', 'steps', 'temperature', 'guidance', 'metric'] +
          [k for k in keys if k.endswith('/diversity')] + ['score', 'forward_passes', 'wall_s'] +
          (['within_noise'] if 'within_noise' in keys else []))
  lines = [f'| {" | ".join(c if c != "metric" else metric for c in cols)} |', '|' + '---|' * len(cols)]
  for r in ordered:
    lines.append('| ' + ' | '.join(f'{r[c]:.4g}' if isinstance(r[c], float) else str(r[c]) for c in cols) + ' |')
  with open(os.path.join(out_dir, 'sweep.md'), 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '\n')
  return '\n'.join(lines)


def _plot(path, rows, metric, task, chosen=None):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  weights = sorted({r['guidance'] for r in rows})
  shown = [('metric', metric)] + ([(evaluate.DIVERSITY[task], evaluate.DIVERSITY[task])]
                                  if task in evaluate.DIVERSITY else [])
  fig, axes = plt.subplots(len(shown), len(weights), figsize=(4.5 * len(weights), 3.6 * len(shown)), squeeze=False,
                           sharey='row')
  for row_axes, (key, label) in zip(axes, shown):
    for ax, w in zip(row_axes, weights):
      for (rule, temp), group in itertools.groupby(sorted((r for r in rows if r['guidance'] == w),
                                                          key=lambda r: (r['rule'], r['temperature'], r['steps'])),
                                                   key=lambda r: (r['rule'], r['temperature'])):
        group = list(group)
        ax.plot([r['steps'] for r in group], [r[key] for r in group], marker='o', label=f'{rule} T={temp:g}')
      if chosen is not None and chosen['guidance'] == w:
        ax.scatter([chosen['steps']], [chosen[key]], marker='*', s=220, color='red', zorder=5, label='chosen')
      ax.set_xscale('log', base=2)
      ax.set_xlabel('steps')
      ax.set_title(f'{task}, guidance w={w:g}')
      ax.grid(alpha=0.3)
    row_axes[0].set_ylabel(label)
    row_axes[-1].legend(fontsize=7)
  if task in evaluate.DIVERSITY:
    fig.suptitle(f'chosen by score = {metric} x min(1, {evaluate.DIVERSITY[task]})', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _plot_speed(path, rows, metric, task, chosen):
  """The metric against wall time per sample, one point per setting (95% bootstrap interval)."""
  points = [{'label': f'{r["rule"]}{" cached" if r.get("cache") else ""} s={r["steps"]} T={r["temperature"]:g} '
                      f'w={r["guidance"]:g}',
             'wall_s': r['wall_s'], 'value': r['metric'], 'cached': bool(r.get('cache')),
             'interval': sample_bench.bootstrap(r['_items']) if r.get('_items') is not None else None} for r in rows]
  sample_bench.plot_quality_time(path, points, title=f'{task}: quality against time', ylabel=metric,
                                 chosen=(chosen['wall_s'], chosen['metric']))


def record(task: str, chosen: dict, metric: str, command: str, path: str) -> str:
  """Writes a task's chosen sampler keys, with the metric and the command that chose them, into the
  JSON file `path` (other tasks in it are kept); returns the line that puts them into an experiment
  file. Nothing reads the file by itself: measured settings become part of an experiment by review."""
  data = {'tasks': {}}
  if storage.isfile(path):
    data = json.loads(storage.read_text(path))
  keys = {'sampler': chosen['sampler'], 'schedule': chosen['schedule'], 'threshold': float(chosen['threshold']),
          'steps': int(chosen['steps']), 'temperature': float(chosen['temperature']),
          'guidance': float(chosen['guidance'])}
  if 'cache' in chosen:
    keys.update(cache=bool(chosen['cache']), entropy_budget=float(chosen['entropy_budget']))
  measured = {metric: chosen['metric'], **{k: chosen[k] for k in ('score', evaluate.DIVERSITY.get(task)) if k in chosen}}
  data.setdefault('tasks', {})[task] = {'chosen': keys, 'metric': measured, 'command': command,
                                        'date': datetime.date.today().isoformat()}
  storage.write_text(path, json.dumps(data, indent=2, sort_keys=True) + '\n')
  section = 'c.sample' if task == 'text' else f'c.sample.{task}'
  return f'{section}.update({", ".join(f"{k}={v!r}" for k, v in keys.items())})'


def sweep_command(workdir, task, *, rules, steps, temperatures, guidance, out_dir=None, record_path='',
                  tolerance=0.0, caches='0', fastest=False, overrides=(), command=''):
  ctx = generate.Context.from_workdir(workdir, overrides)
  rows, chosen, metric, higher = run_sweep(ctx, task, rules=[r.strip() for r in rules.split(',') if r.strip()],
                                           steps=[int(x) for x in _floats(steps)], temperatures=_floats(temperatures),
                                           guidance=_floats(guidance), tolerance=tolerance,
                                           caches=[bool(int(x)) for x in _floats(caches)], fastest=fastest)
  out_dir = out_dir or storage.join(workdir, 'sample_sweep', task)
  with storage.staged(out_dir) as local:  # A URL workdir: written here, then uploaded.
    os.makedirs(local, exist_ok=True)
    table = _write_table(local, rows, metric, higher)
    _plot(os.path.join(local, 'sweep.png'), rows, metric, task, chosen)
    _plot_speed(os.path.join(local, 'sweep_speed.png'), rows, metric, task, chosen)
  print(table)
  summary = {k: chosen[k] for k in ('rule', 'cache', 'steps', 'temperature', 'guidance', 'metric', 'score', 'wall_s')}
  print(f'chosen for {task}: {json.dumps(summary)}'
        f' -> {out_dir}/sweep.{{csv,md,png}}')
  if record_path:
    line = record(task, chosen, metric, command, record_path)
    print(f'recorded in {record_path}; to use it, put into the experiment file:\n  {line}')
  return rows, chosen

