"""Study 1a of the design space: the variance of the ELBO estimator and of its gradient across
corruption draws, per noise schedule and modality, at a trained checkpoint (no training per point).

  python studies/schedules.py --workdir=runs/demo [--draws=24] [--out=docs/studies/schedules]

For each modality m and schedule s, only m's schedule is set to s (the others keep the run's), and
the same validation batch of m's mixture component is corrupted with `draws` keys. Per draw: the
joint validation ELBO of m's tokens (`train_step.eval_sums`, mode 'joint') and its gradient. In
continuous time the estimator's mean does not depend on the schedule (docs/design.md 2.3), so the
means agree up to noise and the truncations; the schedules differ in
  loss_rel_std    std / mean of the per-draw ELBO of m's tokens
  grad_rel_var    E ||g_k - g_mean||^2 / ||g_mean||^2 over the draws (the gradient's noise-to-signal)
Writes results.json and schedules.png into --out.
"""

import argparse
import dataclasses
import json
import os
import time
from tmdm.data import shards as shards_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPONENT = {'text': 'text', 'image': 'image', 'audio': 'audio'}  # modality -> the component holding most of it


def measure(workdir, draws: int, schedules) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from tmdm.generation import generate  # pylint: disable=import-outside-toplevel
  from tmdm.training import step as train_step
  from tmdm import vocab as vocab_lib  # pylint: disable=import-outside-toplevel
  ctx = generate.Context.from_workdir(workdir)
  s = ctx.s
  val = shards_lib.eval_batches(s.cfg, s.vocab, s.sharder, shards_lib.owned(ctx.cfg))
  rows = []
  for m, name in enumerate(vocab_lib.MODALITIES):
    batches = val.get(COMPONENT[name])
    if not batches:
      continue
    batch = batches[0]
    for schedule in schedules:
      names = list(s.diffusion.schedules)
      names[m] = schedule
      diff = dataclasses.replace(s.diffusion, schedules=tuple(names))

      def loss(params, key, diff=diff, name=name):
        sums = train_step.eval_sums(params, batch, key, model=s.model, diff_cfg=diff, vocab=s.vocab, sharder=s.sharder)
        return sums[f'elbo_sum/{name}'] / jnp.maximum(sums[f'count/{name}'], 1.0)

      fn = jax.jit(jax.value_and_grad(loss))
      start = time.perf_counter()
      values, grads = [], []
      for k in range(draws):
        value, grad = fn(ctx.params, jax.random.PRNGKey(10_000 + k))
        values.append(float(value))
        grads.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(grad))]))
      values, grads = np.array(values), np.stack(grads)
      mean_grad = grads.mean(0)
      rel_var = float(np.mean(np.sum((grads - mean_grad)**2, axis=1)) / np.sum(mean_grad**2))
      rows.append({'modality': name, 'schedule': schedule, 'loss_mean': float(values.mean()),
                   'loss_std': float(values.std(ddof=1)), 'loss_rel_std': float(values.std(ddof=1) / values.mean()),
                   'grad_rel_var': rel_var, 'draws': draws, 'seconds': round(time.perf_counter() - start, 1)})
      print(json.dumps(rows[-1]), flush=True)
  return {'workdir': os.path.basename(os.path.normpath(workdir)), 'step': ctx.step,
          'run_schedules': list(s.diffusion.schedules), 'rows': rows}


def plot(result: dict, path: str):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  rows = result['rows']
  modalities = list(dict.fromkeys(r['modality'] for r in rows))
  schedules = list(dict.fromkeys(r['schedule'] for r in rows))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  width = 0.8 / len(schedules)
  for j, sched in enumerate(schedules):
    for ax, key in zip(axes, ('loss_rel_std', 'grad_rel_var')):
      vals = [next((r[key] for r in rows if r['modality'] == m and r['schedule'] == sched), float('nan'))
              for m in modalities]
      ax.bar([i + j * width for i in range(len(modalities))], vals, width, label=sched)
  for ax, title in zip(axes, ('ELBO estimate: std / mean across draws', 'gradient: E|g - mean|^2 / |mean|^2')):
    ax.set_xticks([i + width * (len(schedules) - 1) / 2 for i in range(len(modalities))], modalities)
    ax.set_title(title)
  axes[1].set_yscale('log')
  axes[0].legend(fontsize=8)
  fig.suptitle(f'noise schedules at step {result["step"]} of {result["workdir"]} ({rows[0]["draws"]} draws each)')
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--draws', type=int, default=24)
  parser.add_argument('--schedules', default='linear,cosine,md4_cosine,polynomial,loglinear')
  parser.add_argument('--out', default=os.path.join(REPO, 'docs', 'studies', 'schedules'))
  args = parser.parse_args()
  result = measure(args.workdir, args.draws, args.schedules.split(','))
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=1)
  plot(result, os.path.join(args.out, 'schedules.png'))
  print('wrote', os.path.join(args.out, 'results.json'), 'and schedules.png')


if __name__ == '__main__':
  main()
