"""The train step compiled for real TPU chips on this CPU host (libtpu's compile-only v5e devices).

The compiles run only where libtpu is importable (`pip install -e '.[tpu]'`) and are skipped
otherwise. Small models only: a 3B compile takes minutes and is a command (BUILD_NOTES), not a test.
"""

import os

import pytest

from tmdm import cli
from tmdm.tools import compile_check
from helpers import REPO, tiny_config

needs_libtpu = pytest.mark.skipif(not compile_check.libtpu_available(),
                                  reason="libtpu is not installed (pip install -e '.[tpu]')")

SMOKE = os.path.join(REPO, 'experiments', 'smoke.py')
MIB = 2.0**20


@pytest.fixture(scope='module')
def v5e_2x2():
  return compile_check.topology_devices('v5e:2x2')


@needs_libtpu
def test_tiny_step_compiles_for_v5e_with_splash(v5e_2x2):
  """fsdp 2 x tensor 2 over 4 v5e chips; 'auto' attention is the splash kernel there (Mosaic
  compiles it), and the TPU compiler's memory figures come back."""
  assert len(v5e_2x2) == 4 and v5e_2x2[0].device_kind == 'TPU v5 lite'
  cfg = tiny_config()
  cfg.model.update(attention_impl='auto', compute_dtype='bfloat16', remat='dots')
  cfg.mesh.update(data=1, fsdp=2, tensor=2)
  r = compile_check.check(cfg, v5e_2x2)
  assert (r.platform, r.attention, r.mesh, r.oom) == ('tpu', 'splash', (1, 2, 2), '')
  assert 0 < r.temp and r.params + r.opt_state <= r.peak < 64 * MIB
  assert compile_check.usable_hbm_gib(v5e_2x2) == 15.75  # what v5e's compiler allows of its 16 GiB
  assert compile_check.fits(r, 15.75) and 'splash attention' in compile_check.format_report(r, 15.75)


@needs_libtpu
def test_cli_exit_status_says_whether_it_fits(capsys):
  """Rows of 8192 positions, 64 per chip: dense attention's [B, H, L, L] scores are refused by the
  compiler (exit 1, its numbers printed); the splash kernel never holds them and fits (exit 0)."""
  long_rows = ['--config.data.seq_len=8192', '--config.train.batch_size=256', '--config.model.compute_dtype=bfloat16']
  assert cli.main(['compile-check', f'--config={SMOKE}', '--topology=v5e-4', *long_rows,
                   '--config.model.attention_impl=xla']) == 1
  out = capsys.readouterr().out
  assert 'TPU topology v5e:2x2: 4 x TPU v5 lite, 15.75 GiB usable HBM per chip' in out
  assert 'DOES NOT FIT: the compiler needs' in out and 'exceeds available HBM (15.75G)' in out
  assert cli.main(['compile-check', f'--config={SMOKE}', '--topology=v5e:2x2', *long_rows]) == 0
  out = capsys.readouterr().out
  assert 'splash attention' in out and 'fits in 15.75 GiB per device' in out


def test_topology_names_and_aliases():
  resolve = compile_check.resolve_topology
  assert resolve('v5e:16x16') == 'v5e:16x16' and resolve('v5e-256') == 'v5e:16x16' and resolve('v6e-8') == 'v6e:2x4'
  assert resolve('v5p-256') == 'v5p:4x4x8' and resolve('v5p-8') == 'v5p:2x2x1' and resolve('v4-128') == 'v4:4x4x4'
  assert resolve('v5litepod-64') == 'v5e:8x8'
  with pytest.raises(compile_check.errors.ConfigError, match='unknown TPU topology'):
    resolve('tpu-please')


def test_without_libtpu_one_line_says_how_to_install(monkeypatch, capsys):
  monkeypatch.setattr(compile_check, 'libtpu_available', lambda: False)
  assert cli.main(['compile-check', f'--config={SMOKE}', '--topology=v5e:2x2']) == 2
  err = capsys.readouterr().err.strip()
  assert err == "tmdm compile-check: error: " + compile_check.INSTALL_HINT and "pip install -e '.[tpu]'" in err


def test_fit_needs_a_topology(capsys):
  assert cli.main(['compile-check', f'--config={SMOKE}', '--fit']) == 2
  assert '--fit searches a TPU topology' in capsys.readouterr().err


def test_fit_candidates_and_recompute_ranking():
  """Knob settings respect the mesh and batch; recomputed FLOPs follow the formula's pieces."""
  from tmdm.model import config as model_config  # pylint: disable=import-outside-toplevel
  cfg = compile_check.config_loader.load_file(SMOKE)  # batch 16, 2 heads
  cands = compile_check.candidates(cfg, 4)
  assert {k.mesh for k in cands} == {(1, 4, 1), (1, 2, 2)}  # tensor 4 does not divide 2 heads
  assert all((16 // k.microbatches) % k.mesh[1] == 0 for k in cands)
  m = model_config.ModelConfig(vocab_size=1024, d_model=64, n_layers=2, n_heads=2, d_head=32, d_ff=176)
  knobs = lambda remat, chunk=0: compile_check.Knobs(remat, chunk, 1, (1, 4, 1))
  flops = lambda k, attention='splash': compile_check.recompute_flops(m, 64, 1000, k, attention)
  attn = 4 * 2 * 64 * 2 * 32 * 1000
  assert flops(knobs('none')) == 0 and flops(knobs('dots'), 'xla') == 0 and flops(knobs('dots')) == attn
  assert flops(knobs('dots_no_batch'), 'xla') == attn
  assert flops(knobs('full')) == 2 * 2 * m.block_matmul_params * 1000 + attn
  assert flops(knobs('none', 512)) == 2 * 64 * 1024 * 1000
  assert knobs('dots').no_leaner_than(knobs('full', 512)) and not knobs('full').no_leaner_than(knobs('dots'))


def test_size_presets_name_the_slice_they_were_fitted_for():
  """experiments/sizes.py: each preset's topology is a valid name and its config validates on that
  many chips at the paper's batch (the fit itself is BUILD_NOTES' compile-check table)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  import math  # pylint: disable=import-outside-toplevel
  path = os.path.join(REPO, 'experiments', 'sizes.py')
  module_spec = importlib.util.spec_from_file_location('_sizes', path)
  sizes = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(sizes)
  assert {'pilot-320m', '1b', '3b'} <= set(sizes.PRESETS)
  for name, preset in sizes.PRESETS.items():
    topology = compile_check.resolve_topology(preset['topology'])
    chips = math.prod(int(x) for x in topology.split(':')[1].split('x'))
    cfg = compile_check.config_loader.load(f'{path}:{name}', num_devices=chips)
    assert cfg.data.seq_len == 2048 and cfg.train.batch_size == preset['batch'], name
    assert cfg.model.attention_impl == 'auto' and cfg.model.remat == preset['exec']['remat'], name
