"""Runs the batch-invariance experiment of experiments/batch_invariance.py: writes and prepares the
data, trains every (arm, batch, seed) run, evaluates every run's checkpoints on the same validation
rows with the same masks (a paired comparison), measures the gradient noise scale of the base run,
writes docs/figures/batch_invariance.png and prints the spread of the final exp(ELBO).

  python studies/batch_invariance.py [--data=markov[,fortunes]] [--seeds=0,1] [--batches=8,16,32,64] [--reuse]
                                    [--figure=PNG] [--summary=JSON]

exp(ELBO) is the per-token ELBO bound exponentiated (a perplexity bound). Spread of an arm: the
largest minus the smallest final exp(ELBO) across its physical batches (and max/min - 1), of the
means over seeds; the seed-to-seed spread at one batch is the noise floor it is compared with.
"""

import argparse
import functools
import importlib.util
import json
import logging
import os
import shutil
import sys
import time

import numpy as np
from tmdm.data import shards as shards_lib
from tmdm.training import setup as setup_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = os.path.join(REPO, 'experiments', 'batch_invariance.py')
FIGURE = os.path.join(REPO, 'docs', 'figures', 'batch_invariance.png')

log = logging.getLogger('tmdm')


def _experiment():
  """The experiment module (its constants), loaded by path: this script shares its name."""
  spec = importlib.util.spec_from_file_location('_batch_invariance_experiment', EXPERIMENT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def write_markov_corpus(path, *, words=400, successors=4, docs=20_000, seed=0):
  """Documents of 15-49 made-up words (2-3 consonant-vowel syllables) from a first-order Markov chain
  in which each word has `successors` possible next words with Dirichlet(1) probabilities."""
  if os.path.isfile(path):
    return
  rng = np.random.default_rng(seed)
  consonants, vowels = list('bdfgklmnprstvz'), list('aeiou')
  vocab = set()
  while len(vocab) < words:
    vocab.add(''.join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.integers(2, 4))))
  vocab = sorted(vocab)
  nxt = np.stack([rng.choice(words, successors, replace=False) for _ in range(words)])
  probs = rng.dirichlet(np.ones(successors), size=words)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    for _ in range(docs):
      w, out = rng.integers(words), []
      for _ in range(rng.integers(15, 50)):
        out.append(vocab[w])
        w = nxt[w, rng.choice(successors, p=probs[w])]
      f.write(json.dumps({'text': ' '.join(out)}) + '\n')
  os.replace(path + '.tmp', path)


def _prepare(cfg):
  """The text data set of cfg (text only; `tmdm prepare` would also build the pair data sets)."""
  from tmdm.data import store  # pylint: disable=import-outside-toplevel
  from tmdm.datasets import text  # pylint: disable=import-outside-toplevel
  root = shards_lib.text_root(cfg)
  if os.path.isfile(os.path.join(root, store.MANIFEST)):
    return
  text.prepare_text(root, sources=cfg.data.text_sources.split(','), vocab_size=cfg.vocab.text_size,
                    val_fraction=cfg.data.val_fraction, max_docs=cfg.data.text_max_docs,
                    spm_sample_docs=cfg.data.spm_sample_docs)


def _train(name, workdir, reuse, overrides=()):
  from tmdm.training import checkpoint, loop as train  # pylint: disable=import-outside-toplevel
  from tmdm.config import loader as config_loader
  cfg = config_loader.load(f'{EXPERIMENT}:{name}', list(overrides), num_devices=1)
  cfg.train.progress = False
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if reuse and os.path.isdir(ckpt_dir):
    ckpt = checkpoint.Checkpointer(ckpt_dir, keep=cfg.checkpoint.keep, async_save=False)
    done = ckpt.latest_step() == cfg.train.num_steps
    ckpt.close()
    if done:
      log.info('%s: reusing %s', name, workdir)
      return cfg, None
  shutil.rmtree(workdir, ignore_errors=True)
  t0 = time.perf_counter()
  train.run(cfg, workdir)
  return cfg, time.perf_counter() - t0


def _paired_eval(name, workdirs: dict, seeds: int, eval_rows: int) -> dict:
  """{key: [(tokens, exp(ELBO))] per checkpoint}: every checkpoint of every run on the first
  eval_rows validation rows, summed over `seeds` corruption keys (the same rows, times and masks)."""
  import jax  # pylint: disable=import-outside-toplevel
  from tmdm.training import checkpoint, state as train_state, step as train_step  # pylint: disable=import-outside-toplevel
  from tmdm.config import loader as config_loader
  from tmdm.data import pipeline  # pylint: disable=import-outside-toplevel
  from tmdm.diffusion import loss as loss_lib  # pylint: disable=import-outside-toplevel
  cfg = config_loader.load(f'{EXPERIMENT}:{name}', num_devices=1)
  s = setup_lib.build(cfg)
  rows = pipeline.text_dataset(shards_lib.text_root(cfg), 'val', s.vocab, seq_len=s.seq_len, seed=0, repeat=False)
  batch = pipeline.to_global(next(iter(pipeline.batched(rows, eval_rows, prefetch=0))), s.sharder)
  fn = jax.jit(functools.partial(train_step.eval_sums, model=s.model, diff_cfg=s.diffusion, vocab=s.vocab,
                                 sharder=s.sharder))
  target = train_state.abstract_state(s.model, s.tx, s.sharder, s.seq_len)  # same tree at every batch
  out = {}
  for key, (workdir, tokens_per_step) in workdirs.items():
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=10**6, async_save=False)
    curve = []
    for step in ckpt.steps():
      params = ckpt.restore_state(target, step)[0].params
      total = None
      for seed in range(seeds):
        sums = jax.device_get(fn(params, batch, jax.random.PRNGKey(1000 + seed)))
        total = sums if total is None else jax.tree.map(np.add, total, sums)
      curve.append((step * tokens_per_step, float(np.exp(loss_lib.finalize(total)['loss']))))
    ckpt.close()
    out[key] = np.array(curve)
  return out


def _noise_scale(name, workdir, fractions=(1 / 8, 1 / 2, 1), small=8, big=128, reps=6) -> list:
  """[(tokens, B_simple)]: the gradient noise scale tr(Sigma) / |G|^2 in sequences (McCandlish et al.
  2018, appendix A) at checkpoints of one run, from E|g_B|^2 = |G|^2 + tr(Sigma) / B measured at
  B = small and big on `reps` training batches. The SDE rule needs B well below it."""
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from tmdm.training import checkpoint, state as train_state, step as train_step  # pylint: disable=import-outside-toplevel
  from tmdm.config import loader as config_loader
  from tmdm.data import pipeline  # pylint: disable=import-outside-toplevel
  cfg = config_loader.load(f'{EXPERIMENT}:{name}', num_devices=1)
  s = setup_lib.build(cfg)
  rows = pipeline.text_dataset(shards_lib.text_root(cfg), 'train', s.vocab, seq_len=s.seq_len, seed=123)
  it = iter(pipeline.batched(rows, big, prefetch=0))
  batches = [next(it) for _ in range(reps)]
  grads = functools.partial(train_step.grads_and_sums, model=s.model, diff_cfg=s.diffusion, vocab=s.vocab,
                            sharder=s.sharder, microbatches=1)
  sq_norm = jax.jit(lambda p, b, rng: optax.tree_utils.tree_norm(grads(p, b, rng)[0])**2)
  target = train_state.abstract_state(s.model, s.tx, s.sharder, s.seq_len)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=10**6, async_save=False)
  out = []
  for frac in fractions:
    step = int(round(frac * cfg.train.num_steps))
    params = ckpt.restore_state(target, step)[0].params
    at_big, at_small = [], []
    for i, b in enumerate(batches):
      rng = jax.random.PRNGKey(i)
      at_big.append(float(sq_norm(params, pipeline.to_global(b, s.sharder), rng)))
      for j in range(0, big, small):
        part = pipeline.to_global({k: v[j:j + small] for k, v in b.items()}, s.sharder)
        at_small.append(float(sq_norm(params, part, jax.random.fold_in(rng, j))))
    e_big, e_small = np.mean(at_big), np.mean(at_small)
    g2 = (big * e_big - small * e_small) / (big - small)
    trace = (e_small - e_big) / (1 / small - 1 / big)
    out.append((step * cfg.train.batch_size * cfg.data.seq_len, trace / g2))
  ckpt.close()
  return out


def _train_curve(cfg, workdir):
  """(tokens, exp(train ELBO)) of each logged window."""
  from tmdm.training import metrics  # pylint: disable=import-outside-toplevel
  per_step = cfg.train.batch_size * cfg.data.seq_len
  rows = metrics.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  return np.array([(r['step'] * per_step, np.exp(r['loss'])) for r in rows if 'loss' in r])


def _spread(values):
  lo, hi = min(values), max(values)
  return hi - lo, hi / lo - 1.0


def _mean_curve(results, keys):
  """(tokens, mean, min, max) over seeds of the paired validation curves."""
  curves = np.stack([results[k]['val'] for k in keys])
  return curves[0, :, 0], curves[:, :, 1].mean(0), curves[:, :, 1].min(0), curves[:, :, 1].max(0)


def _plot(results, noise, exp, datasets, seeds, batches, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(len(datasets), 3, figsize=(18, 4.6 * len(datasets)), squeeze=False)
  colors = plt.cm.viridis(np.linspace(0, 0.9, len(batches)))
  for row, data in zip(axes, datasets):
    _plot_finals(row[2], results, noise[data], exp, data, seeds, batches)
    for ax, arm in zip(row, exp.ARMS):
      finals = []
      for color, b in zip(colors, batches):
        tokens, mean, lo, hi = _mean_curve(results, [(data, arm, b, sd) for sd in seeds])
        finals.append(mean[-1])
        ax.fill_between(tokens / 1e6, lo, hi, color=color, alpha=0.15, lw=0)
        ax.plot(tokens / 1e6, mean, 'o-', color=color, lw=1.8, ms=4, label=f'B={b}: final {mean[-1]:.1f}')
      spread, rel = _spread(finals)
      what = 'scaled: lr*sqrt(k), b^k, eps/sqrt(k), wd*sqrt(k)' if arm == 'scaled' else 'fixed hyperparameters'
      ax.set_title(f'{data} | {what}\nspread of the final seed-mean exp(ELBO) across B: {spread:.2f} '
                   f'({100 * rel:.1f}%)', fontsize=9)
      ax.set_yscale('log')
      ax.grid(True, which='both', alpha=0.3)
      ax.legend(fontsize=8, title='physical batch (sequences)', title_fontsize=8)
    row[0].set_ylabel('validation exp(ELBO per token)')
  for ax in axes[-1][:2]:
    ax.set_xlabel('training tokens (millions)')
  fig.suptitle(f'Same model and token horizon D = {exp.HORIZON}, k = B / {exp.BASE_BATCH}; lines: mean over seeds '
               f'{",".join(map(str, seeds))}, bands: min-max; paired validation (same rows and masks)', fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=110)


def _plot_finals(ax, results, noise, exp, data, seeds, batches):
  """Final exp(ELBO) against the physical batch per arm (seeds as points, mean as a line), with
  B_crit = D / (L S_crit) and the measured gradient noise scale as vertical lines."""
  for arm, color in zip(exp.ARMS, ('tab:orange', 'tab:blue')):
    vals = np.array([[results[(data, arm, b, sd)]['val'][-1, 1] for sd in seeds] for b in batches])
    ax.plot(batches, vals.mean(1), 'o-', color=color, label=f'{arm} (mean of {len(seeds)} seeds)')
    for j in range(len(seeds)):
      ax.scatter(batches, vals[:, j], color=color, s=10, alpha=0.5)
  b_crit = exp.HORIZON / (exp.SEQ_LEN * exp.S_CRIT)
  ax.axvline(b_crit, color='k', ls='--', lw=1, label=f'B_crit = D / (L S_crit) = {b_crit:.0f}')
  for (tokens, b_simple), ls in zip(noise, (':', '-.', '-')):
    ax.axvline(b_simple, color='gray', ls=ls, lw=1, label=f'B_simple at {tokens / exp.HORIZON:.2g} D = {b_simple:.0f}')
  ax.set_xscale('log', base=2)
  ax.set_yscale('log')
  ax.set_xlabel('physical batch B (sequences)')
  ax.set_ylabel('final validation exp(ELBO)')
  ax.set_title(f'{data}: final value at equal tokens D = {exp.HORIZON}', fontsize=9)
  ax.grid(True, which='both', alpha=0.3)
  ax.legend(fontsize=7)


def _report(results, noise, exp, datasets, seeds, batches) -> dict:
  """Prints the table and returns its numbers: final paired exp(ELBO) per run, seed means, spreads."""
  out = {}
  print(f'\nfinal validation exp(ELBO) at D = {exp.HORIZON} tokens (paired: {exp.EVAL_ROWS} rows, the same masks '
        'for every run); spread = max - min across batches of the seed means (and max/min - 1)')
  print(f'{"data":9}{"arm":7}{"batch":>6}{"kappa":>7}{"steps":>7}' + ''.join(f'{f"seed {sd}":>9}' for sd in seeds) +
        f'{"mean":>9}{"seeds max/min-1":>17}')
  for data in datasets:
    for arm in exp.ARMS:
      means, seed_rel = {}, []
      for b in batches:
        vals = [float(results[(data, arm, b, sd)]['val'][-1, 1]) for sd in seeds]
        means[b] = float(np.mean(vals))
        seed_rel.append(_spread(vals)[1])
        kappa = b / exp.BASE_BATCH if arm == 'scaled' else 1.0
        print(f'{data:9}{arm:7}{b:>6}{kappa:>7.3g}{exp.HORIZON // (b * exp.SEQ_LEN):>7}' +
              ''.join(f'{v:>9.2f}' for v in vals) + f'{means[b]:>9.2f}{100 * seed_rel[-1]:>16.1f}%')
      spread, rel = _spread(list(means.values()))
      print(f'{data:9}{arm:7} spread across batches {spread:.2f} ({100 * rel:.1f}%); seed-to-seed max/min - 1 '
            f'at one batch, mean over batches: {100 * np.mean(seed_rel):.1f}%')
      out[f'{data}-{arm}'] = {'seed_mean': means, 'spread_abs': spread, 'spread_rel': rel,
                              'seed_rel_mean': float(np.mean(seed_rel)),
                              'runs': {f'{b}-s{sd}': float(results[(data, arm, b, sd)]['val'][-1, 1])
                                       for b in batches for sd in seeds}}
    print(f'{data:9}gradient noise scale B_simple (seed-0 base run): ' +
          ', '.join(f'{b:.0f} seqs at {t / exp.HORIZON:.3g} D' for t, b in noise[data]))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data', default='markov', help='comma list of experiment data sets (markov, fortunes)')
  parser.add_argument('--seeds', default='0,1', help='comma list of seeds; every (arm, batch) runs each')
  parser.add_argument('--out', default=os.path.join(REPO, 'runs', 'batch_invariance'), help='run folders')
  parser.add_argument('--reuse', action='store_true', help='keep finished runs instead of retraining them')
  parser.add_argument('--eval_seeds', type=int, default=8, help='corruption keys of the paired evaluation')
  parser.add_argument('--batches', default='', help='comma list of physical batches (default: the experiment\'s '
                                                     'BATCHES; its BEYOND go past B_crit)')
  parser.add_argument('--figure', default=FIGURE)
  parser.add_argument('--summary', default='', help='summary JSON (default: OUT/summary.json)')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s', datefmt='%H:%M:%S')
  for noisy in ('absl', 'orbax', 'jax._src', 'grain'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  os.chdir(REPO)  # data.root and the markov corpus path are relative to the repository
  from tmdm.config import loader as config_loader  # pylint: disable=import-outside-toplevel
  exp = _experiment()
  datasets = [d for d in args.data.split(',') if d]
  seeds = [int(x) for x in args.seeds.split(',') if x]
  batches = [int(x) for x in args.batches.split(',') if x] or list(exp.BATCHES)
  if exp.BASE_BATCH not in batches or any(f'markov-fixed-{b}' not in exp.PRESETS for b in batches):
    raise SystemExit(f'--batches must include {exp.BASE_BATCH} and come from {exp.BATCHES + exp.BEYOND}')

  t0 = time.perf_counter()
  results, noise, seconds = {}, {}, []
  for data in datasets:
    base = f'{data}-fixed-{exp.BASE_BATCH}'
    if data == 'markov':
      write_markov_corpus(exp.MARKOV_JSONL)
    _prepare(config_loader.load(f'{EXPERIMENT}:{base}'))
    workdirs = {}
    for sd in seeds:
      for arm in exp.ARMS:
        for b in batches:
          key = (data, arm, b, sd)
          if arm == 'scaled' and b == exp.BASE_BATCH:  # kappa = 1: the very same run as 'fixed' (bitwise)
            results[key] = results[(data, 'fixed', b, sd)]
            continue
          workdir = os.path.join(args.out, f'{data}-{arm}-{b}-s{sd}')
          cfg, secs = _train(f'{data}-{arm}-{b}', workdir, args.reuse, [f'--config.seed={sd}'])
          results[key] = {'train': _train_curve(cfg, workdir)}
          workdirs[key] = (workdir, b * exp.SEQ_LEN)
          seconds += [secs] if secs is not None else []
    for key, curve in _paired_eval(base, workdirs, args.eval_seeds, exp.EVAL_ROWS).items():
      results[key]['val'] = curve
    noise[data] = _noise_scale(base, workdirs[(data, 'fixed', exp.BASE_BATCH, seeds[0])][0])
  _plot(results, noise, exp, datasets, seeds, batches, args.figure)
  summary = {'horizon_tokens': exp.HORIZON, 'base_batch': exp.BASE_BATCH, 'batches': batches,
             'b_crit': exp.HORIZON / (exp.SEQ_LEN * exp.S_CRIT), 'seeds': seeds,
             'figure': os.path.relpath(os.path.abspath(args.figure), REPO),
             'arms': _report(results, noise, exp, datasets, seeds, batches),
             'noise_scale_seqs': {d: [(int(t), float(b)) for t, b in v] for d, v in noise.items()},
             'train_s': seconds, 'wall_s': time.perf_counter() - t0}
  summary_path = args.summary or os.path.join(args.out, 'summary.json')
  os.makedirs(os.path.dirname(os.path.abspath(summary_path)), exist_ok=True)
  with open(summary_path, 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=2)
  print(f'figure: {summary["figure"]}; summary: {summary_path}; wall '
        f'{summary["wall_s"]:.0f} s ({len(seconds)} runs trained, {sum(seconds):.0f} s)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
