"""The scaling-law fitter: synthetic laws are recovered, real published points reproduce the Epoch AI
replication of Chinchilla's approach 3, the frontier is the constrained optimum, and the CLI writes
fit.json and plots."""

import csv
import json
import os

import numpy as np
import pytest

from tmdm import cli
from tmdm.scaling import laws as scaling
from tmdm.training import setup as setup_lib

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'chinchilla_fig4_points.csv')
# Hoffmann et al. 2022's published approach-3 law: a realistic target for the synthetic tests.
TRUE = scaling.Law(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28)


def _synthetic(noise=0.0, seed=0):
  n, d = (g.ravel() for g in np.meshgrid(np.geomspace(1e7, 1e10, 7), np.geomspace(1e9, 1e12, 7)))
  loss = TRUE.loss(n, d) * np.exp(noise * np.random.default_rng(seed).standard_normal(n.shape))
  return n, d, loss


def test_fit_recovers_noise_free_law():
  # Tolerance: 0.1% on every coefficient (the optimum is exact; only the stopping rule is not).
  law, _, _ = scaling.fit(*_synthetic(), starts=16)
  for k in scaling.NAMES:
    assert getattr(law, k) == pytest.approx(getattr(TRUE, k), rel=1e-3), k


def test_fit_recovers_law_from_noisy_losses():
  # 49 runs with 0.5% multiplicative noise (about what seeds give): exponents within 0.03, E within
  # 2%, and the loss predicted at a 100x larger run within 1%.
  law, _, _ = scaling.fit(*_synthetic(noise=0.005, seed=1), starts=16)
  assert law.alpha == pytest.approx(TRUE.alpha, abs=0.03)
  assert law.beta == pytest.approx(TRUE.beta, abs=0.03)
  assert law.E == pytest.approx(TRUE.E, rel=0.02)
  assert law.loss(1e12, 1e13) == pytest.approx(TRUE.loss(1e12, 1e13), rel=0.01)


def _chinchilla():
  with open(DATA, encoding='utf-8') as f:
    rows = list(csv.DictReader(f))
  n = np.array([float(r['Model Size']) for r in rows])
  c = np.array([float(r['Training FLOP']) for r in rows])
  loss = np.array([float(r['loss']) for r in rows])
  keep = np.argsort(loss)[:-5]  # As Epoch AI did: drop the 5 highest losses (tiny, unconverged runs).
  return n[keep], c[keep] / (6 * n[keep]), loss[keep]


def test_chinchilla_points_reproduce_epoch_replication():
  """Epoch AI's fit on these 240 points: E 1.82, A 482, alpha 0.348, B 2085, beta 0.366. Tolerance:
  exponents within 0.005, E within 1%, A and B within 5% (they trade off against the exponents)."""
  n, d, loss = _chinchilla()
  assert len(n) == 240
  law, _, _ = scaling.fit(n, d, loss, starts=16)
  assert law.E == pytest.approx(1.82, rel=0.01)
  assert law.alpha == pytest.approx(0.348, abs=0.005)
  assert law.beta == pytest.approx(0.366, abs=0.005)
  assert law.A == pytest.approx(482, rel=0.05)
  assert law.B == pytest.approx(2085, rel=0.05)


def test_frontier_is_the_constrained_optimum():
  for c in (1e20, 5.76e23):
    n_opt, d_opt = TRUE.optimal(c)
    assert 6 * n_opt * d_opt == pytest.approx(c, rel=1e-9)
    grid = n_opt * np.geomspace(0.5, 2.0, 401)  # L(N, C / 6N) along the iso-FLOP line.
    best = grid[np.argmin(TRUE.loss(grid, c / (6 * grid)))]
    assert best == pytest.approx(n_opt, rel=0.01)
    assert TRUE.tokens_for(n_opt) == pytest.approx(d_opt, rel=1e-6)  # D*(N) passes through (N*, D*).


def test_cli_fit_writes_json_and_plots_and_plan_reads_them(tmp_path, capsys):
  n, d, loss = _synthetic(noise=0.003, seed=2)
  results = tmp_path / 'results.jsonl'
  with open(results, 'w', encoding='utf-8') as f:
    for i, (a, b, y) in enumerate(zip(n, d, loss)):
      f.write(json.dumps(dict(name=f'r{i}', params=a, tokens=b, modality='text', loss=y)) + '\n')
      f.write(json.dumps(dict(name=f'r{i}', params=a, tokens=b, modality='image', loss=y + 0.5)) + '\n')
  out = tmp_path / 'fit'
  assert cli.main(['scaling', 'fit', str(results), '--out', str(out), '--bootstrap', '3', '--starts', '4']) == 0
  fit = json.loads((out / 'fit.json').read_text())['modalities']
  assert sorted(fit) == ['image', 'text']
  text = fit['text']
  for k in scaling.NAMES:
    lo, hi = text['intervals'][k]
    assert lo <= hi and k in text
  assert len(text['bootstrap']) == 3
  assert text['determined'] is True and text['undetermined_reasons'] == [] and text['degenerate_draws'] == 0
  assert fit['image']['E'] == pytest.approx(TRUE.E + 0.5, rel=0.05)
  assert sorted(p.name for p in out.glob('*.png')) == ['image_frontier.png', 'image_loss.png', 'text_frontier.png',
                                                       'text_loss.png']
  assert 'not determined' not in capsys.readouterr().out
  assert cli.main(['scaling', 'plan', '--fit', str(out / 'fit.json'), '--flops', '1e21', '--modality', 'text']) == 0
  printed = capsys.readouterr().out
  n_opt, d_opt = scaling.law_of(text).optimal(1e21)
  assert f'N* = {n_opt:.4g}' in printed and f'D* = {d_opt:.4g}' in printed and 'nearest model preset' in printed


def test_results_rows_need_the_required_keys(tmp_path):
  bad = tmp_path / 'r.jsonl'
  bad.write_text(json.dumps(dict(params=1, tokens=2, loss=3)) + '\n')
  with pytest.raises(ValueError, match='modality'):
    scaling.read_results(str(bad))


def test_compile_check_reports_memory_without_allocating():
  """The real train step compiled for a 2x2x2 mesh from ShapeDtypeStructs: per-device parameter
  bytes are the sharded shares, Adam keeps two moments per parameter, and the formula FLOPs match."""
  from tmdm.tools import compile_check  # pylint: disable=import-outside-toplevel
  from helpers import tiny_config  # pylint: disable=import-outside-toplevel
  cfg = tiny_config()
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  report = compile_check.check(cfg)
  model_cfg = setup_lib.build(cfg).model_cfg
  total = 4 * model_cfg.num_params  # float32 parameters
  assert report.mesh == (2, 2, 2) and report.devices == 8
  assert total / 4 <= report.params < total  # Sharded over fsdp x tensor = 4, norms replicated.
  assert 2 * report.params <= report.opt_state <= 2 * report.params + 4096
  assert report.temp > 0 and report.peak >= report.params + report.opt_state
  assert report.formula_flops == model_cfg.flops_per_token(13) * 8 * 13
  text = compile_check.format_report(report, hbm_gib=16)
  assert 'activations + temporaries' in text and 'fits in 16 GiB' in text


def test_compile_check_cli_rejects_a_bad_mesh(capsys):
  smoke = os.path.join(os.path.dirname(DATA), '..', '..', 'experiments', 'smoke.py')
  assert cli.main(['compile-check', f'--config={smoke}', '--mesh=2,2']) == 2
  assert '--mesh takes DATA,FSDP,TENSOR' in capsys.readouterr().err


# Sweeps the law cannot be fitted to (issue 24, item 8): `tmdm scaling fit` must flag them, not crash
# (a flat sweep's bootstrap once died in `intervals` dividing by alpha + beta = 0).
def _flat():
  """3 sizes x 3 horizons, every loss 3.0 within 1e-6 relative noise: no trend to fit."""
  n, d = (g.ravel() for g in np.meshgrid(np.geomspace(1e6, 1e8, 3), np.geomspace(1e8, 1e10, 3)))
  return n, d, 3.0 * np.exp(1e-6 * np.random.default_rng(0).standard_normal(n.shape))


def _single_size():
  """One model size, six token counts: A, alpha and E cannot be told apart."""
  d = np.geomspace(1e8, 1e10, 6)
  n = np.full_like(d, 1e7)
  return n, d, TRUE.loss(n, d) * np.exp(1e-3 * np.random.default_rng(1).standard_normal(n.shape))


def _single_horizon():
  """Six model sizes, one token count: B, beta and E cannot be told apart."""
  n = np.geomspace(1e6, 1e8, 6)
  d = np.full_like(n, 1e9)
  return n, d, TRUE.loss(n, d) * np.exp(1e-3 * np.random.default_rng(2).standard_normal(n.shape))


def _write_results(path, n, d, loss):
  with open(path, 'w', encoding='utf-8') as f:
    for i, (a, b, y) in enumerate(zip(n, d, loss)):
      f.write(json.dumps(dict(name=f'r{i}', params=a, tokens=b, modality='text', loss=y)) + '\n')


def _strict(constant):
  raise ValueError(f'fit.json holds {constant}: not strict JSON')


def _assert_flagged_not_crashed(sweep, tmp_path, capsys, reason):
  """`tmdm scaling fit` (in-process) exits 0 with the warning and the degenerate-draw count printed
  and in fit.json; `tmdm scaling plan` then refuses the fit in one line. Returns fit.json's entry."""
  results, out = tmp_path / 'results.jsonl', tmp_path / 'fit'
  _write_results(results, *sweep)
  capsys.readouterr()
  assert cli.main(['scaling', 'fit', str(results), '--out', str(out), '--bootstrap', '8', '--starts', '4']) == 0
  text = capsys.readouterr().out
  entry = json.loads((out / 'fit.json').read_text(), parse_constant=_strict)['modalities']['text']
  assert entry['determined'] is False
  assert any(reason in r for r in entry['undetermined_reasons']), entry['undetermined_reasons']
  assert 0 <= entry['degenerate_draws'] <= 8 and len(entry['bootstrap']) == 8
  assert 'WARNING: text: the fit is not determined by these data' in text and reason in text
  assert f'{entry["degenerate_draws"]} of 8 bootstrap resamples gave a degenerate law' in text
  assert sorted(p.name for p in out.glob('*.png')) == ['text_frontier.png', 'text_loss.png']
  # Planning from it is refused in one line (status 2), not done from an arbitrary law.
  assert cli.main(['scaling', 'plan', '--fit', str(out / 'fit.json'), '--flops', '1e21']) == 2
  err = capsys.readouterr()
  assert 'N* =' not in err.out
  assert err.err.count('\n') == 1 and 'error:' in err.err and 'not determined' in err.err
  return entry


def test_flat_sweep_is_flagged_not_crashed(tmp_path, capsys):
  entry = _assert_flagged_not_crashed(_flat(), tmp_path, capsys, 'bootstrap resamples give a degenerate law')
  assert entry['degenerate_draws'] > 0  # The draws that divided by alpha + beta = 0 before.


def test_single_size_sweep_is_flagged_not_crashed(tmp_path, capsys):
  _assert_flagged_not_crashed(_single_size(), tmp_path, capsys, '1 distinct model size')


def test_single_horizon_sweep_is_flagged_not_crashed(tmp_path, capsys):
  _assert_flagged_not_crashed(_single_horizon(), tmp_path, capsys, '1 distinct token count')


def test_degenerate_point_fit_is_flagged_not_crashed(tmp_path, capsys, monkeypatch):
  """The point fit itself with alpha = beta = 0 (no compute-optimal allocation at all): the entry,
  the printout, fit.json and the plots are still written."""
  real_fit = scaling.fit

  def degenerate_fit(*args, **kwargs):
    _, value, theta = real_fit(*args, **kwargs)
    theta = np.array(theta)
    theta[3:] = 0.0
    return scaling.Law.from_theta(theta), value, theta

  monkeypatch.setattr(scaling, 'fit', degenerate_fit)
  n, d = (g.ravel() for g in np.meshgrid(np.geomspace(1e7, 1e9, 3), np.geomspace(1e9, 1e11, 3)))
  entry = _assert_flagged_not_crashed((n, d, TRUE.loss(n, d)), tmp_path, capsys, 'alpha + beta = 0')
  assert entry['degenerate_draws'] == 8 and entry['a'] is None and entry['b'] is None
  assert 'a' not in entry['intervals'] and 'alpha' in entry['intervals']
  assert entry['frontier']['N*(C)']['coef'] is None  # nan in memory, null in fit.json.


def test_law_degenerate_names_why():
  assert TRUE.degenerate() == ''
  assert 'alpha + beta = 0' in scaling.Law(E=1, A=1, alpha=0, B=1, beta=0).degenerate()
  assert 'alpha = 0' in scaling.Law(E=1, A=1, alpha=0, B=1, beta=0.3).degenerate()
  assert 'beta = 0' in scaling.Law(E=1, A=1, alpha=0.3, B=1, beta=0).degenerate()
  assert 'overflow' in scaling.Law(E=1, A=1e300, alpha=1e-3, B=1e-300, beta=1e-3).degenerate()
