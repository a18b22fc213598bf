"""`tmdm bench-sample`: what sampler settings cost in time and in quality.

With --workdir (a trained run) it compares settings on the same held-out prompts: each `--setting`
(sampler keys of the task's section, e.g. 'cache=1,steps=16' or 'sampler=entropy,entropy_budget=2';
'baseline' is the run's own) runs the task's evaluator (evaluate.TASK_EVALUATOR) on eval.num items with
eval.seed, and prints one JSON line per setting:
  setting, forward_passes   per sample (a cached step counts W / L of a pass)
  wall_s                    seconds per sample: median over the sampling calls of call time / rows (compiled)
  tokens_per_s              generated tokens per second of sampling
  speedup                   the first setting's wall_s over this one's
  the task's metrics        e.g. t2i/digit_acc, t2i/fd, t2i/diversity, s2t/word_acc
  interval, delta_interval  95% bootstrap interval of the primary metric, and of its difference to the
                            first setting on the same items (paired)
  within_noise              the difference's interval does not exclude "as good as the first setting",
                            nor does that of the secondary metric where it is per item
                            (secondary_delta_interval: I2T / S2T token accuracy)
It writes them to WORKDIR/bench_sample/TASK/bench.jsonl with bench.png (quality against wall time).

With --config (a freshly initialized model, no data), the throughput table below against the number of
steps. Canvases are synthetic (random caption ids, every target position masked) in a task's training
layout, so the table needs no dataset: a freshly initialized model (the cost of a step does not
depend on the weights; the passes of 'threshold', 'entropy' and reuse do, so compare those on a
trained run with --setting). Each row: one compile (steps are a traced input), one warm-up call,
then `repeats` timed calls of one batch.

  tokens/s            generated (masked) tokens per second of wall time
  latency/batch       seconds per sampling call of `batch` rows
  ms/sample           the same per row
  passes              forward passes of the batch (fewer than steps when reuse skips some)
"""

import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np

from tmdm import errors, storage, vocab as vocab_lib
from tmdm.config import loader as config_loader
from tmdm.diffusion import sampling
from tmdm.generation import generate, tasks as tasks_lib
from tmdm.training import setup as setup_lib, state as train_state

log = logging.getLogger('tmdm')


def tokens_per_item(cfg, kind: str) -> int:
  """Codes per image / clip implied by the config (the learned tokenizers' own layout)."""
  from tmdm.tokenizers import audio as audio_tok, image as image_tok  # pylint: disable=import-outside-toplevel
  if kind == 'image':
    return image_tok.ImageConfig(size=cfg.image.size, downsamples=cfg.image.downsamples).latent**2
  a = cfg.audio
  return audio_tok.AudioConfig(sample_rate=a.sample_rate, seconds=a.seconds, hop=a.hop,
                               downsamples=a.downsamples).tokens


def synthetic_canvas(cfg, vocab: vocab_lib.VocabSpec, task: str, rows: int, seed: int = 0):
  t = tasks_lib.TASKS[task]
  rng = np.random.default_rng(seed)
  if task == 'text':
    n = cfg.sample.text_len - 2
    return tasks_lib.text_rows(vocab, [(np.zeros(n, np.int64), np.ones(n, bool))] * rows, cfg.sample.text_len)
  per_item = tokens_per_item(cfg, t.kind)
  if t.media_first:
    codes = rng.integers(0, vocab.image_size if t.kind == 'image' else vocab.audio_size, (rows, per_item))
    return tasks_lib.pair_canvas(vocab, t, cfg.data.seq_len, codes=codes, caption_lens=[cfg.sample.caption_len] * rows)
  texts = [rng.integers(0, vocab.text_size, 8) for _ in range(rows)]
  return tasks_lib.pair_canvas(vocab, t, cfg.data.seq_len, texts=texts, tokens_per_item=per_item)


def context(workdir, config, overrides) -> generate.Context:
  if workdir:
    return generate.Context.from_workdir(workdir, overrides)
  cfg = config_loader.load(config, overrides, num_devices=jax.device_count())
  s = setup_lib.build(cfg)
  return generate.Context(s, train_state.create(s.model, s.tx, s.sharder, s.seq_len, cfg.seed).params, 0)


def bench(ctx: generate.Context, task: str, steps_list, *, batch: int, repeats: int):
  """Rows of {steps, passes, tokens_per_s, latency_s, ms_per_sample, compile_s}."""
  s = ctx.s
  rows_n = -(-batch // s.mesh_shape.batch_shards) * s.mesh_shape.batch_shards
  canvas = synthetic_canvas(ctx.cfg, s.vocab, task, rows_n)
  masked = int((canvas['tokens'] == s.vocab.mask_id).sum())
  spec_, knobs = ctx.settings(task)
  spec_ = sampling.fit_window(spec_, canvas['tokens'], s.vocab.mask_id)
  fn = ctx.sampler(spec_)
  put = {k: jax.device_put(v, s.sharder.batch()) for k, v in canvas.items()}
  out = []
  for i, steps in enumerate(steps_list):
    k = knobs._replace(steps=int(steps)).as_arrays()
    start = time.perf_counter()
    jax.block_until_ready(fn(ctx.params, put, jax.random.PRNGKey(0), k))  # compile (first row) + warm-up
    first = time.perf_counter() - start
    start = time.perf_counter()
    for r in range(repeats):
      _, passes = jax.block_until_ready(fn(ctx.params, put, jax.random.PRNGKey(r + 1), k))
    dt = (time.perf_counter() - start) / repeats
    out.append({'steps': int(steps), 'passes': float(passes), 'tokens_per_s': masked / dt, 'latency_s': dt,
                'ms_per_sample': 1e3 * dt / rows_n, 'first_call_s': first})
  return out, {'rows': rows_n, 'masked_per_row': masked / rows_n, 'spec': spec_, 'device': jax.devices()[0].device_kind,
               'devices': jax.device_count()}


def format_table(rows, info, task) -> str:
  head = (f'{task}: {info["rows"]} rows x {info["masked_per_row"]:.0f} generated tokens, {info["spec"].sampler}'
          f'{"+guidance" if info["spec"].guided else ""}, {info["devices"]} x {info["device"]}')
  cols = f'{"steps":>6} {"passes":>6} {"tokens/s":>10} {"latency/batch s":>16} {"ms/sample":>10} {"first call s":>13}'
  lines = [head, cols]
  for r in rows:
    lines.append(f'{r["steps"]:>6} {r["passes"]:>6} {r["tokens_per_s"]:>10.0f} {r["latency_s"]:>16.3f} '
                 f'{r["ms_per_sample"]:>10.1f} {r["first_call_s"]:>13.2f}')
  return '\n'.join(lines)


def bench_command(*, workdir, config, task, steps, batch, repeats, overrides=()):
  ctx = context(workdir, config, overrides)
  rows, info = bench(ctx, task, [int(x) for x in steps.split(',') if x.strip()], batch=batch, repeats=repeats)
  table = format_table(rows, info, task)
  print(table)
  return rows


DEFAULT_SETTINGS = ('baseline', 'cache=1', 'sampler=entropy', 'sampler=entropy,cache=1')


def parse_setting(text: str, section):
  """'k=v,k=v' over a task's sampler keys -> a copy of the section with them set ('baseline': none)."""
  out = section.copy_and_resolve_references()
  if text.strip() in ('', 'baseline'):
    return out
  for item in text.split(','):
    key, sep, value = item.partition('=')
    key = key.strip()
    if not sep or key not in out or isinstance(out[key], ml_collections.ConfigDict):
      raise errors.ConfigError(f'setting {text!r}: {item!r} is not KEY=VALUE of a sampler key '
                               f'({", ".join(k for k in out if not isinstance(out[k], ml_collections.ConfigDict))})')
    kind = type(out[key])
    try:
      out[key] = (value.strip().lower() in ('1', 'true', 'yes', 'on')) if kind is bool else kind(value)
    except ValueError:
      raise errors.ConfigError(f'setting {text!r}: {key} must be of type {kind.__name__}, got {value!r}') from None
  return out


def ratio(num, den) -> float:
  return float(np.sum(num) / max(np.sum(den), 1e-12))


def bootstrap(items, base=None, *, draws: int = 2000, seed: int = 0, level: float = 0.95):
  """Percentile interval of sum(num) / sum(den) over items resampled with replacement; with `base`
  (the same items under another setting), of the paired difference items - base."""
  num, den = (np.asarray(x, np.float64) for x in items)
  idx = np.random.default_rng(seed).integers(0, len(num), (draws, len(num)))
  stat = num[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-12)
  if base is not None:
    bnum, bden = (np.asarray(x, np.float64) for x in base)
    stat = stat - bnum[idx].sum(1) / np.maximum(bden[idx].sum(1), 1e-12)
  lo, hi = np.quantile(stat, [(1 - level) / 2, (1 + level) / 2])
  return float(lo), float(hi)


def measure(ctx: generate.Context, task: str, spec_, knobs) -> dict:
  """One setting through the task's evaluator: its metrics, per-sample cost and per-item values."""
  from tmdm.evaluation import evaluators as evaluate  # pylint: disable=import-outside-toplevel
  ctx.items.clear()  # What this evaluation leaves, not an earlier one's.
  got = evaluate.EVALUATORS[evaluate.TASK_EVALUATOR[task]](ctx, settings=lambda _c, _t: (spec_, knobs))
  run = ctx.last_run
  per_call = [sec / run['batch_size'] for sec in run['batch_seconds']]
  return {'forward_passes': round(run['forward_passes'], 3), 'wall_s': float(np.median(per_call)),
          'tokens_per_s': run['generated_tokens'] / max(run['seconds'], 1e-9),
          **{k: v for k, v in got.items() if k.startswith(task + '/') and not k.endswith(('/seconds', '/forward_passes'))},
          '_items': ctx.items.get(task), '_items_secondary': ctx.items.get(evaluate.SECONDARY.get(task, ('',))[0])}


def compare(ctx: generate.Context, task: str, settings) -> list[dict]:
  """Rows of measure() for each setting text, with intervals and speed-ups against the first."""
  from tmdm.evaluation import evaluators as evaluate  # pylint: disable=import-outside-toplevel
  metric, higher = evaluate.PRIMARY[task]
  section = tasks_lib.sampler_section(ctx.cfg.sample, task)
  rows = []
  for text in settings:
    spec_, knobs = sampling.spec_and_knobs(parse_setting(text, section), guided=task != 'text')
    row = {'setting': text.strip() or 'baseline', 'task': task, **measure(ctx, task, spec_, knobs),
           '_cached': spec_.cache}
    rows.append(row)
    log.info('%s %s: %s %.4f, %.3f s/sample, %.1f passes', task, row['setting'], metric, row.get(metric, float('nan')),
             row['wall_s'], row['forward_passes'])
  first = rows[0]
  for row in rows:
    row['speedup'] = first['wall_s'] / row['wall_s']
    if row['_items'] is not None and first['_items'] is not None:
      row['interval'] = bootstrap(row['_items'])
      lo, hi = bootstrap(row['_items'], first['_items'])
      row['delta_interval'] = (lo, hi)
      row['within_noise'] = bool(hi >= 0) if higher else bool(lo <= 0)
    if row['_items_secondary'] is not None and first['_items_secondary'] is not None:
      _, second_higher = evaluate.SECONDARY[task]
      lo, hi = bootstrap(row['_items_secondary'], first['_items_secondary'])
      row['secondary_delta_interval'] = (lo, hi)
      row['within_noise'] = row.get('within_noise', True) and (bool(hi >= 0) if second_higher else bool(lo <= 0))
  return rows


def plot_quality_time(path, points, *, title: str, ylabel: str, chosen=None):
  """A metric against wall time per sample, one point per setting: points are dicts of label, wall_s,
  value, interval (95%, or None) and cached (circle) or not (square); `chosen` (wall_s, value) is
  starred."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(10, 4.8))
  for p in points:
    err = None
    if p['interval'] is not None:
      err = [[max(p['value'] - p['interval'][0], 0)], [max(p['interval'][1] - p['value'], 0)]]
    ax.errorbar([1e3 * p['wall_s']], [p['value']], yerr=err, marker='o' if p['cached'] else 's', capsize=3,
                alpha=0.8, label=p['label'])
  if chosen is not None:
    ax.scatter([1e3 * chosen[0]], [chosen[1]], marker='*', s=320, facecolors='none', edgecolors='red', linewidths=1.5,
               zorder=5, label='chosen')
  ax.set_xscale('log')
  ax.set_xlabel('wall time per sample (ms, log; median over sampling calls)')
  ax.set_ylabel(f'{ylabel} (95% bootstrap interval)')
  ax.set_title(f'{title} (circles: cached)', fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc='center left', bbox_to_anchor=(1.01, 0.5))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def compare_command(workdir, task, settings, *, out_dir=None, overrides=()):
  from tmdm.evaluation import evaluators as evaluate  # pylint: disable=import-outside-toplevel
  ctx = generate.Context.from_workdir(workdir, overrides)
  rows = compare(ctx, task, settings or DEFAULT_SETTINGS)
  lines = [json.dumps({k: v for k, v in r.items() if not k.startswith('_')}) for r in rows]
  print('\n'.join(lines))
  out_dir = out_dir or storage.join(workdir, 'bench_sample', task)
  if jax.process_index() == 0:
    with storage.staged(out_dir) as local:
      os.makedirs(local, exist_ok=True)
      with open(os.path.join(local, 'bench.jsonl'), 'w', encoding='utf-8') as f:
        f.write('\n'.join(lines) + '\n')
      metric = evaluate.PRIMARY[task][0]
      points = [{'label': r['setting'], 'wall_s': r['wall_s'], 'value': r[metric], 'interval': r.get('interval'),
                 'cached': r['_cached']} for r in rows]
      plot_quality_time(os.path.join(local, 'bench.png'), points, title=f'{task}: quality against time',
                        ylabel=metric)
    print(f'-> {out_dir}/bench.{{jsonl,png}}')
  return rows
