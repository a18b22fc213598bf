"""PNG figures of a scaling-law fit (matplotlib, Agg backend: no display needed).

Per modality: `<modality>_loss.png` (loss against N at fixed D and against D at fixed N, points
coloured by the other variable, fitted L(N, D) drawn at the same values) and `<modality>_frontier.png`
(N*(C) and D*(C) under C = 6 N D, with a bootstrap band and the runs' own (C, N) and (C, D)).
"""

import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.ticker  # pylint: disable=wrong-import-position
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from tmdm.scaling import laws as scaling  # pylint: disable=wrong-import-position


def _levels(values, most=5):
  """The distinct values when a sweep used few (token horizons, sizes); else log-spaced quantiles."""
  uniq = np.unique(values)
  if len(uniq) <= most:
    return uniq
  return np.exp(np.quantile(np.log(values), np.linspace(0.05, 0.95, most)))


def _panel(ax, x, other, loss, law, x_is_n, cmap):
  logs = np.log(other)
  norm = matplotlib.colors.Normalize(logs.min(), logs.max() + 1e-9)
  ax.scatter(x, loss, c=cmap(norm(logs)), s=18, edgecolors='k', linewidths=0.3, zorder=3)
  grid = np.geomspace(x.min() / 1.5, x.max() * 1.5, 100)
  for level in _levels(other):
    fitted = law.loss(grid, level) if x_is_n else law.loss(level, grid)
    ax.plot(grid, fitted, color=cmap(norm(np.log(level))), lw=1.2,
            label=f'{"D" if x_is_n else "N"} = {level:.3g}')
  low, high = loss.min(), loss.max()
  pad = 0.25 * (high - low) + 1e-3
  if law.E > low - 4 * pad:  # The floor only when it sits near the data (else it flattens the plot).
    ax.axhline(law.E, color='gray', ls=':', lw=1, label=f'E = {law.E:.3g}')
  ax.set_ylim(min(low - pad, law.E - pad) if law.E > low - 4 * pad else low - pad, high + pad)
  ax.set_xscale('log')
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # Overlapping 2x10^4 labels otherwise.
  ax.set_xlabel('non-embedding parameters N' if x_is_n else 'training tokens D')
  ax.set_ylabel('final loss (nats / token)')
  ax.legend(fontsize=7)


def loss_figure(path, modality, rows, entry):
  law = scaling.law_of(entry)
  n, d, loss = (np.array([float(r[k]) for r in rows]) for k in ('params', 'tokens', 'loss'))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  _panel(axes[0], n, d, loss, law, True, plt.get_cmap('viridis'))
  _panel(axes[1], d, n, loss, law, False, plt.get_cmap('plasma'))
  fig.suptitle(f'{modality}: L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3g} + {law.B:.3g}/D^{law.beta:.3g}'
               f' ({len(rows)} runs)')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _band(ax, x, curves, level):
  """The central `level` share of the bootstrap laws' curves."""
  if len(curves):
    band = np.nanpercentile(np.array(curves), [50 * (1 - level), 50 * (1 + level)], axis=0)
    ax.fill_between(x, band[0], band[1], color='C0', alpha=0.2, label=f'{round(100 * level)}% bootstrap band')


def frontier_figure(path, modality, rows, entry):
  law = scaling.law_of(entry)
  n, d = (np.array([float(r[k]) for r in rows]) for k in ('params', 'tokens'))
  c_runs = 6 * n * d
  c = np.geomspace(c_runs.min() / 10, c_runs.max() * 1000, 100)
  n_grid = np.geomspace(n.min() / 3, n.max() * 30, 100)
  boots = [scaling.law_of(b) for b in entry.get('bootstrap', [])]
  level = entry.get('interval_level', 0.9)
  with np.errstate(all='ignore'):  # A degenerate fit (beta -> 0) sends the frontier to 0 or inf.
    n_opt, d_opt = law.optimal(c)
    opt = [b.optimal(c) for b in boots]
    panels = (
        (c, n_opt, [o[0] for o in opt], c_runs, n, 'N*(C)', 'training FLOPs C = 6 N D', 'non-embedding parameters'),
        (c, d_opt, [o[1] for o in opt], c_runs, d, 'D*(C)', 'training FLOPs C = 6 N D', 'tokens'),
        (n_grid, law.tokens_for(n_grid), [b.tokens_for(n_grid) for b in boots], n, d, 'D*(N)',
         'non-embedding parameters N', 'tokens'))
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for ax, (x, best, curves, run_x, run_y, name, xlabel, ylabel) in zip(axes, panels):
    power = entry['frontier'][name]
    ax.plot(x, best, color='C0', lw=1.5, label=f'{name} = {power["coef"]:.3g} x^{power["exponent"]:.3f}')
    _band(ax, x, curves, level)
    ax.scatter(run_x, run_y, s=14, color='C3', zorder=3, label='runs')
    ax.set_xscale('log')
    ax.set_yscale('log')
    shown = np.concatenate([best[np.isfinite(best) & (best > 0)], run_y])
    ax.set_ylim(shown.min() / 10, shown.max() * 10)  # A wide bootstrap band is cut, not allowed to flatten all.
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
  fig.suptitle(f'{modality}: compute-optimal frontier (C = 6 N D)')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_all(out_dir, rows, report, prefix=''):
  """Both figures per fitted modality; returns the paths written."""
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  groups = scaling.by_modality(rows)
  for modality, entry in report.items():
    for kind, draw in (('loss', loss_figure), ('frontier', frontier_figure)):
      path = os.path.join(out_dir, f'{prefix}{modality}_{kind}.png')
      draw(path, modality, groups[modality], entry)
      paths.append(path)
  return paths
