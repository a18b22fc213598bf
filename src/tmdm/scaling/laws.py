"""Scaling laws: fit L(N, D) = E + A / N^alpha + B / D^beta per modality, derive the compute-optimal
frontier, and plan a run for a FLOP budget.

The fit follows Hoffmann et al. 2022 (approach 3), as replicated by Besiroglu et al. 2024:
  log L_hat(N, D) = LSE(a - alpha log N,  b - beta log D,  e)       A = e^a, B = e^b, E = e^e
  minimize  sum_i Huber_delta(log L_hat(N_i, D_i) - log L_i)        delta = 1e-3
with L-BFGS (scipy) started from a grid of (a, b, e, alpha, beta). Huber with so small a delta is
nearly an L1 fit in log space: robust to the odd diverged or unconverged run. The whole grid is
scored in one vectorized pass, and L-BFGS runs from the `starts` best grid points (every point when
starts=0); the lowest objective wins. Intervals come from refitting bootstrap resamples of the rows.

Compute-optimal frontier under C = 6 N D (minimize L at fixed C; Hoffmann et al. eq. 4):
  D*(N) = (beta B / (alpha A))^(1/beta) * N^(alpha/beta)
  N*(C) = G (C/6)^(beta/(alpha+beta)),  D*(C) = (C/6)^(alpha/(alpha+beta)) / G,
  G = (alpha A / (beta B))^(1/(alpha+beta))

A sweep that does not constrain the law (losses flat within noise, one model size, one token count)
is fitted all the same, but flagged: `determined: false` with `undetermined_reasons` in its entry
(fit.json), a WARNING line in the printout, and `tmdm scaling plan` refuses it. The reasons: fewer
than 3 distinct model sizes or token counts; a degenerate point fit; any degenerate bootstrap
resample. A law with alpha = 0 or beta = 0 has no compute-optimal allocation (`Law.degenerate`);
resamples that give one are counted (`degenerate_draws`) and left out of the intervals of the
frontier exponents a and b.
"""

import dataclasses
import itertools
import json
import math
import os

import numpy as np

from tmdm import errors

# L-BFGS-B calls BLAS on 5-vectors thousands of times; a multithreaded OpenBLAS spends ~15x longer
# waking threads than computing (measured on 2 shared cores). Only applies if scipy loads here first.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')
from scipy import optimize  # pylint: disable=wrong-import-position

HUBER_DELTA = 1e-3
# Starting grid (Hoffmann et al.'s ranges, a little wider in e): a, b, e, alpha, beta.
GRID = (np.arange(0.0, 30.0, 5.0), np.arange(0.0, 30.0, 5.0), np.arange(-1.0, 1.5, 0.5),
        np.arange(0.0, 2.5, 0.5), np.arange(0.0, 2.5, 0.5))
NAMES = ('E', 'A', 'alpha', 'B', 'beta')
# L-BFGS-B box for (a, b, e, alpha, beta): far outside any sensible law (Chinchilla: a 6.0, b 6.0,
# e 0.5, exponents 0.3), there only to stop a degenerate fit (few points, flat losses) from running
# A or B to overflow. A fit that ends on a bound is flagged (`at_bound`): its coefficients are not
# determined by the data.
BOUNDS = ((-20.0, 60.0), (-20.0, 60.0), (-10.0, 10.0), (0.0, 5.0), (0.0, 5.0))
THETA_NAMES = ('A', 'B', 'E', 'alpha', 'beta')


@dataclasses.dataclass(frozen=True)
class Law:
  """L(N, D) = E + A / N^alpha + B / D^beta (N non-embedding parameters, D training tokens)."""
  E: float
  A: float
  alpha: float
  B: float
  beta: float

  def loss(self, n, d):
    n, d = np.asarray(n, np.float64), np.asarray(d, np.float64)
    return self.E + self.A / n**self.alpha + self.B / d**self.beta

  def _f64(self):
    """Coefficients as numpy floats: a degenerate law gives inf or 0 (with a warning), never an
    OverflowError or ZeroDivisionError from Python floats."""
    return (np.float64(x) for x in (self.A, self.alpha, self.B, self.beta))

  def degenerate(self) -> str:
    """Why this law has no finite compute-optimal allocation; '' when it has one."""
    try:
      with np.errstate(all='ignore'):
        a, alpha, b, beta = self._f64()
        if not all(np.isfinite(x) for x in (a, alpha, b, beta, self.E)):
          return 'a coefficient is not finite'
        if alpha + beta == 0:
          return 'alpha + beta = 0: the loss falls with neither N nor D'
        if alpha == 0:
          return 'alpha = 0: the loss does not fall with N, so N* = 0'
        if beta == 0:
          return 'beta = 0: the loss does not fall with D, so N* is unbounded'
        g = (alpha * a / (beta * b))**(1 / (alpha + beta))
        if not (np.isfinite(g) and np.isfinite(1 / g) and g > 0):
          return 'the compute-optimal allocation overflows'
    except (OverflowError, ZeroDivisionError, FloatingPointError) as e:
      return f'the compute-optimal allocation fails ({type(e).__name__})'
    return ''

  def exponents(self):
    """(a, b): N*(C) ~ C^a and D*(C) ~ C^b; None when the law is degenerate."""
    if self.degenerate():
      return None, None
    return self.beta / (self.alpha + self.beta), self.alpha / (self.alpha + self.beta)

  def tokens_for(self, n):
    """D*(N): the token count where the loss falls equally fast per FLOP in N and in D."""
    a, alpha, b, beta = self._f64()
    return (beta * b / (alpha * a))**(1 / beta) * np.asarray(n, np.float64)**(alpha / beta)

  def optimal(self, flops):
    """(N*(C), D*(C)) under C = 6 N D."""
    a, alpha, b, beta = self._f64()
    c = np.asarray(flops, np.float64) / 6.0
    g = (alpha * a / (beta * b))**(1 / (alpha + beta))
    return g * c**(beta / (alpha + beta)), c**(alpha / (alpha + beta)) / g

  def frontier(self) -> dict:
    """The frontier as power laws y = coef * x^exponent (for fit.json and the printout)."""
    a, alpha, b, beta = self._f64()
    s = alpha + beta
    g = (alpha * a / (beta * b))**(1 / s)
    laws = {'D*(N)': ((beta * b / (alpha * a))**(1 / beta), alpha / beta),
            'N*(C)': (g * 6.0**(-beta / s), beta / s),
            'D*(C)': (6.0**(-alpha / s) / g, alpha / s)}
    return {k: dict(coef=float(coef), exponent=float(exponent)) for k, (coef, exponent) in laws.items()}

  def as_dict(self):
    return dataclasses.asdict(self)

  @classmethod
  def from_theta(cls, theta):
    a, b, e, alpha, beta = (float(x) for x in theta)
    return cls(E=math.exp(e), A=math.exp(a), alpha=alpha, B=math.exp(b), beta=beta)


def _huber(r, delta):
  small = np.abs(r) <= delta
  return np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))


def _objective(theta, log_n, log_d, log_l, delta):
  """Sum of Huber(LSE - log L) and its exact gradient in theta = (a, b, e, alpha, beta)."""
  a, b, e, alpha, beta = theta
  t1, t2 = a - alpha * log_n, b - beta * log_d
  top = np.maximum(np.maximum(t1, t2), e)  # Subtracted before exp: no overflow at large a, b.
  w = np.stack([np.exp(t1 - top), np.exp(t2 - top), np.exp(e - top)])
  total = w[0] + w[1] + w[2]
  lse = top + np.log(total)
  r = lse - log_l
  w /= total  # softmax weights: d lse / d term
  dr = np.clip(r, -delta, delta)  # Huber'(r)
  grad = np.array([np.sum(dr * w[0]), np.sum(dr * w[1]), np.sum(dr * w[2]),
                   -np.sum(dr * w[0] * log_n), -np.sum(dr * w[1] * log_d)])
  return float(np.sum(_huber(r, delta))), grad


def _grid_scores(grid, log_n, log_d, log_l, delta):
  """Objective at every grid point at once: [G]."""
  a, b, e, alpha, beta = (grid[:, i:i + 1] for i in range(5))
  lse = np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)
  return np.sum(_huber(lse - log_l, delta), axis=1)


def full_grid():
  return np.array(list(itertools.product(*GRID)), np.float64)


def _minimize(theta0, args):
  res = optimize.minimize(_objective, theta0, args=args, jac=True, method='L-BFGS-B', bounds=BOUNDS,
                          options=dict(maxiter=1000, ftol=1e-15, gtol=1e-12))
  return (res.fun if np.isfinite(res.fun) else math.inf), res.x


def at_bound(theta, tol=1e-6):
  """Names of the coefficients that ended on the BOUNDS box."""
  return [n for n, x, (lo, hi) in zip(THETA_NAMES, theta, BOUNDS) if x <= lo + tol or x >= hi - tol]


def fit(params, tokens, losses, *, delta=HUBER_DELTA, starts=64, extra_starts=()):
  """Fits one Law to arrays of N, D and L. Returns (law, objective value, theta)."""
  log_n, log_d, log_l = (np.log(np.asarray(x, np.float64)) for x in (params, tokens, losses))
  args = (log_n, log_d, log_l, delta)
  grid = full_grid()
  if starts and starts < len(grid):
    grid = grid[np.argsort(_grid_scores(grid, *args))[:starts]]
  best = (math.inf, None)
  for theta0 in itertools.chain(grid, extra_starts):
    best = min(best, _minimize(np.clip(theta0, *np.array(BOUNDS).T), args), key=lambda r: r[0])
  return Law.from_theta(best[1]), best[0], best[1]


def bootstrap(params, tokens, losses, *, theta, n_boot=100, seed=0, delta=HUBER_DELTA, starts=8):
  """Refits on n_boot resamples (rows drawn with replacement); starts from the full fit's theta and
  the resample's `starts` best grid points. Returns a list of Laws."""
  rng = np.random.default_rng(seed)
  arrays = [np.asarray(x, np.float64) for x in (params, tokens, losses)]
  out = []
  for _ in range(n_boot):
    idx = rng.integers(0, len(arrays[0]), len(arrays[0]))
    law, _, _ = fit(*(x[idx] for x in arrays), delta=delta, starts=starts, extra_starts=[theta])
    out.append(law)
  return out


def intervals(laws, level=0.9):
  """Percentile intervals of each coefficient over bootstrap laws, and of the frontier exponents over
  the non-degenerate ones (none when every law is degenerate)."""
  lo, hi = 50 * (1 - level), 50 * (1 + level)
  table = {k: [getattr(law, k) for law in laws] for k in NAMES}
  exponents = [law.exponents() for law in laws if not law.degenerate()]
  if exponents:
    table['a'] = [a for a, _ in exponents]  # N*(C) ~ C^a
    table['b'] = [b for _, b in exponents]  # D*(C) ~ C^b
  return {k: [float(np.percentile(v, lo)), float(np.percentile(v, hi))] for k, v in table.items()}


# The fewest distinct values of N (of D) that pin A and alpha (B and beta) apart from E: the N-term
# is seen only through differences between sizes, two per coefficient pair.
MIN_DISTINCT = 3


def _distinct(x):
  return len(np.unique(np.round(np.log(x), 9)))


def undetermined_reasons(n, d, law, boots):
  """Why these data do not determine the law ([] when nothing says so)."""
  reasons = []
  for values, what, coefs in ((n, 'model size', 'A, alpha'), (d, 'token count', 'B, beta')):
    k = _distinct(values)
    if k < MIN_DISTINCT:
      reasons.append(f'only {k} distinct {what}{"s" if k != 1 else ""} ({MIN_DISTINCT} needed): {coefs} and E cannot '
                     'be told apart')
  if law.degenerate():
    reasons.append(f'degenerate fitted law ({law.degenerate()})')
  bad = [b.degenerate() for b in boots if b.degenerate()]
  if bad:
    common = max(set(bad), key=bad.count)
    reasons.append(f'{len(bad)} of {len(boots)} bootstrap resamples give a degenerate law (most often {common})')
  return reasons


# Results files: one JSON object per finished run and modality.
REQUIRED = ('params', 'tokens', 'modality', 'loss')


def read_results(path):
  rows = []
  with open(path, encoding='utf-8') as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      row = json.loads(line)
      missing = [k for k in REQUIRED if k not in row]
      if missing:
        raise ValueError(f'{path}:{i}: row lacks {", ".join(missing)}')
      if all(math.isfinite(float(row[k])) and float(row[k]) > 0 for k in ('params', 'tokens', 'loss')):
        rows.append(row)
  return rows


def by_modality(rows):
  out = {}
  for r in rows:
    out.setdefault(r['modality'], []).append(r)
  return out


def fit_results(rows, *, n_boot=100, level=0.9, seed=0, starts=64, delta=HUBER_DELTA, log=print):
  """Per modality: the fit, its bootstrap intervals and samples, and frontier exponents."""
  report = {}
  for modality, group in sorted(by_modality(rows).items()):
    n, d, loss = (np.array([float(r[k]) for r in group]) for k in ('params', 'tokens', 'loss'))
    if len(group) < 5:
      log(f'{modality}: {len(group)} points cannot determine 5 coefficients; skipped')
      continue
    law, value, theta = fit(n, d, loss, starts=starts, delta=delta)
    boots = (bootstrap(n, d, loss, theta=theta, n_boot=n_boot, seed=seed, delta=delta, starts=min(starts or 8, 8))
             if n_boot else [])
    residual = law.loss(n, d) - loss  # In loss units: how well the form describes these runs at all.
    with np.errstate(all='ignore'):  # A degenerate fit may put the frontier at 0, inf or nan.
      frontier = law.frontier()
    a, b = law.exponents()
    reasons = undetermined_reasons(n, d, law, boots)
    entry = dict(law.as_dict(), points=len(group), objective=value, at_bound=at_bound(theta), huber_delta=delta,
                 rms_residual=float(np.sqrt(np.mean(residual**2))), max_residual=float(np.max(np.abs(residual))),
                 a=a, b=b, frontier=frontier, determined=not reasons, undetermined_reasons=reasons,
                 degenerate_draws=sum(1 for x in boots if x.degenerate()),
                 interval_level=level, intervals=intervals(boots, level) if boots else {},
                 bootstrap=[x.as_dict() for x in boots])
    report[modality] = entry
    log(describe(modality, entry))
  return report


def describe(modality, e):
  def fmt(k):
    iv = e['intervals'].get(k)
    return f'{k}={e[k]:.4g}' + (f' [{iv[0]:.4g}, {iv[1]:.4g}]' if iv else '')
  lines = [f'{modality}: L(N, D) = {e["E"]:.4g} + {e["A"]:.4g} / N^{e["alpha"]:.4g} + {e["B"]:.4g} / D^{e["beta"]:.4g}'
           f'  ({e["points"]} points; residual rms {e["rms_residual"]:.3g}, max {e["max_residual"]:.3g})',
           '  ' + '  '.join(fmt(k) for k in NAMES),
           '  frontier: ' + ', '.join(f'{k} = {v["coef"]:.4g} x^{v["exponent"]:.3f}' for k, v in e['frontier'].items())
           + (f'  ({round(100 * e["interval_level"])}% bootstrap intervals over {len(e["bootstrap"])} resamples)'
              if e['bootstrap'] else '')]
  if e['bootstrap'] and (e.get('degenerate_draws') or not e.get('determined', True)):
    lines.append(f'  {e["degenerate_draws"]} of {len(e["bootstrap"])} bootstrap resamples gave a degenerate law '
                 '(no compute-optimal allocation)' + ('; the intervals of a and b leave them out'
                                                      if e['degenerate_draws'] else ''))
  if e['at_bound']:
    lines.append(f'  WARNING: {", ".join(e["at_bound"])} ended on the search bounds: not determined by these data')
  if not e.get('determined', True):
    lines.append(f'  WARNING: {modality}: the fit is not determined by these data: '
                 f'{"; ".join(e["undetermined_reasons"])}. `tmdm scaling plan` will refuse it')
  return '\n'.join(lines)


def law_of(entry):
  return Law(**{k: entry[k] for k in NAMES})


def _finite_or_none(x):
  """A degenerate law's frontier holds inf and nan: written as null, so fit.json stays strict JSON."""
  if isinstance(x, dict):
    return {k: _finite_or_none(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite_or_none(v) for v in x]
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def write_fit(out_dir, report, source):
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, 'fit.json')
  with open(path, 'w', encoding='utf-8') as f:
    json.dump({'form': 'L(N, D) = E + A / N^alpha + B / D^beta', 'flops': 'C = 6 N D',
               'source': source, 'modalities': _finite_or_none(report)}, f, indent=1, allow_nan=False)
  return path


class Undetermined(errors.ConfigError):
  """A fit flagged `determined: false`: no plan can be drawn from it."""


def check_determined(entry, name, source='the fit'):
  """Raises Undetermined for a fit flagged as not determined by its data (fits from before the flag
  pass)."""
  if not entry.get('determined', True):
    reasons = '; '.join(entry.get('undetermined_reasons', [])) or 'flagged determined: false'
    raise Undetermined(f'{source}: the {name} fit is not determined by its data: {reasons}. '
                       'Refit on a sweep that constrains the law')


def plan(entry, flops, level=0.9, name='this modality'):
  """Compute-optimal (N, D) for a budget, the predicted loss, and bootstrap intervals of N and D."""
  check_determined(entry, name)
  law = law_of(entry)
  n, d = (float(x) for x in law.optimal(flops))
  out = dict(flops=float(flops), params=n, tokens=d, tokens_per_param=d / n, loss=float(law.loss(n, d)))
  if entry.get('bootstrap'):
    lo, hi = 50 * (1 - level), 50 * (1 + level)
    ns, ds = np.array([law_of(b).optimal(flops) for b in entry['bootstrap']]).T
    out.update(params_interval=[float(np.percentile(ns, lo)), float(np.percentile(ns, hi))],
               tokens_interval=[float(np.percentile(ds, lo)), float(np.percentile(ds, hi))])
  return out


def nearest_preset(n_params, vocab_size=1024):
  """The model preset (model/config.py) whose non-embedding parameter count is closest in log."""
  from tmdm.model import config as model_config  # pylint: disable=import-outside-toplevel
  sizes = {k: model_config.ModelConfig(vocab_size=vocab_size, **v).non_embedding_params
           for k, v in model_config.PRESETS.items()}
  name = min(sizes, key=lambda k: abs(math.log(sizes[k] / n_params)))
  return name, sizes[name]
