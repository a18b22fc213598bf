"""The benchmarks run end to end on tiny shapes and report figures that make sense (no timing goals:
those live in BUILD_NOTES, measured on quiet machines)."""

import os

from tmdm.config import loader as config_loader
from tmdm.tools import bench
from helpers import REPO


def test_bench_step_reports_the_yardstick_figures():
  r = bench.step('cpu-small', steps=2, warmup=1, batch=8,
                 overrides=['--config.model.n_layers=1', '--config.model.d_model=32', '--config.model.d_ff=48',
                            '--config.model.n_heads=2', '--config.model.d_head=16', '--config.data.seq_len=32'])
  assert r['impl'] == 'tmdm' and r['seq'] == 32 and r['batch'] == 8
  assert r['step_ms'] > 0 and abs(r['tok_s'] - 8 * 32 / (r['step_ms'] / 1e3)) < 0.01 * r['tok_s']
  assert r['peak_mem_gb'] > 0 and r['model_tflops'] >= 0 and 'mfu' in r


def _smoke(text_data):
  cfg = config_loader.load(os.path.join(REPO, 'experiments', 'smoke.py'), num_devices=8)
  cfg.data.root = text_data
  return cfg


def test_checkpoint_bench_measures_blocking_and_restore(text_data, tmp_path):
  r = bench.checkpoint_cost(_smoke(text_data), saves=2, steps_between=1, workdir=str(tmp_path / 'ck'))
  assert r['saves'] == 2 and 0 < r['blocked_ms_median'] <= r['blocked_ms_max'] and r['step_ms_median'] > 0
  assert r['restore_s'] > 0 and r['state_mb'] > 0 and r['local_blocked_ms_median'] > 0 and r['local_restore_s'] > 0
  assert sorted(os.listdir(tmp_path / 'ck')) == ['1', '2']


def test_input_and_pipeline_benches(text_data):
  cfg = _smoke(text_data)
  r = bench.input_overhead(cfg, steps=3)
  assert r['in_memory_tok_s'] > 0 and r['pipeline_tok_s'] > 0 and 0 < r['pipeline_over_in_memory'] < 3
  (p,) = bench.pipeline_throughput(cfg, batches=3)
  assert p['source'] == 'text' and p['rows_s'] > 0 and 0 < p['non_pad_tok_s'] <= p['tok_s']


def test_sampling_bench_table(text_data):
  from tmdm.config import base as base_config  # pylint: disable=import-outside-toplevel
  from tmdm.tools import sample_bench
  c = base_config.get_config()
  assert (sample_bench.tokens_per_item(c, 'image'), sample_bench.tokens_per_item(c, 'audio')) == (64, 100)
  ctx = sample_bench.context('', os.path.join(REPO, 'experiments', 'smoke.py'),
                             [f'--config.data.root={text_data}', '--config.sample.text_len=16'])
  rows, info = sample_bench.bench(ctx, 'text', [2, 4], batch=8, repeats=1)
  assert [r['steps'] for r in rows] == [2, 4] and info['masked_per_row'] == 14
  assert all(1 <= r['passes'] <= r['steps'] and r['tokens_per_s'] > 0 for r in rows)
  assert '14 generated tokens' in sample_bench.format_table(rows, info, 'text')
