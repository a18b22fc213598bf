"""`tmdm bench step`: tmdm's real train step (model, loss, optimizer, sharding of the trainer) on
synthetic tokens at the shapes of the performance yardstick (../shared/bench/plain_step.py), one JSON
line per run; with `--yardstick PATH` the yardstick runs in the same call and the ratio is printed.

FLOPs per token are the yardstick's: 6 x matmul parameters + 12 x layers x seq x d (no causal
halving), so model TFLOP/s and MFU compare directly.
"""

import json
import logging
import statistics
import subprocess
import sys
import time

import jax
import numpy as np

from tmdm import base_config, perf, train, train_state, train_step
from tmdm.model import config as model_config
from tmdm.modalities import spec

log = logging.getLogger('tmdm')

# preset -> (model preset, vocabulary size, batch, seq); the yardstick's shapes and batch.
SHAPES = {
    'cpu-small': ('cpu-small', 4096, 8, 256),
    'bench-0.5b': ('bench-0.5b', 65536, 8, 2048),
    'bench-1b': ('bench-1b', 65536, 8, 2048),
}


def bench_config(preset: str, *, batch=0, remat='', microbatches=1, overrides=()):
  """A config whose joint vocabulary has exactly the yardstick's size (text ids fill the rest)."""
  from tmdm import config_lib  # pylint: disable=import-outside-toplevel
  model_preset, vocab, default_batch, seq = SHAPES[preset]
  c = base_config.get_config()
  c.model.update(model_config.PRESETS[model_preset])
  c.vocab.update(image_size=1000, audio_size=1000, multiple=128)
  c.vocab.text_size = vocab - spec.VocabSpec(1, 1000, 1000).num_special - 2000
  c.data.seq_len = seq
  c.train.update(batch_size=batch or default_batch, microbatches=microbatches, num_steps=1000)
  if remat:
    c.model.remat = remat
  config_lib.apply_overrides(c, overrides)
  config_lib.validate(c, jax.device_count())
  assert spec.VocabSpec.from_config(c.vocab).size == vocab
  return c


def synthetic_batch(s: train.Setup, rows: int, segments: int, seed=0):
  """Random text ids; `segments` packed documents per row (1: no packing)."""
  L = s.seq_len
  rng = np.random.default_rng(seed)
  lo, hi = s.vocab.range(spec.TEXT)
  seg = np.repeat(np.arange(1, segments + 1), -(-L // segments))[:L]
  starts = np.searchsorted(seg, seg)
  return {'tokens': rng.integers(lo, hi, (rows, L)).astype(np.int32),
          'segment_ids': np.tile(seg, (rows, 1)).astype(np.int32),
          'positions': np.tile(np.arange(L) - starts, (rows, 1)).astype(np.int32),
          'role': np.full((rows, L), spec.TARGET, np.int32), 'modality': np.zeros((rows, L), np.int32)}


def _peak_bytes(compiled):
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use']
  mem = compiled.memory_analysis()  # CPU: what the compiled step needs, per device
  return mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes


def step(preset, *, steps=10, warmup=3, segments=1, **config_kwargs) -> dict:
  cfg = bench_config(preset, **config_kwargs)
  s = train.setup(cfg)
  state = train_state.create(s.model, s.tx, s.sharder, s.seq_len, seed=0)
  state_sh = train_state.state_shardings(s.model, s.tx, s.sharder, s.seq_len)
  step_fn, _ = train_step.jit_steps(s.model, s.tx, s.diffusion, s.vocab, s.sharder, state_sh,
                                    cfg.train.microbatches)
  batch = {k: jax.device_put(v, s.sharder.batch()) for k, v in
           synthetic_batch(s, cfg.train.batch_size, segments).items()}
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  tokens = cfg.train.batch_size * s.seq_len
  flops = s.model_cfg.flops_per_token(s.seq_len) * tokens
  peak = perf.peak_tflops_per_device()
  return {'impl': 'tmdm', 'preset': preset, 'batch': cfg.train.batch_size, 'seq': s.seq_len,
          'remat': cfg.model.remat, 'microbatches': cfg.train.microbatches, 'segments': segments,
          'step_ms': round(step_s * 1e3, 2), 'tok_s': round(tokens / step_s, 1),
          'model_tflops': round(flops / step_s / 1e12 / jax.device_count(), 3),
          'mfu': round(perf.mfu(flops, step_s, jax.device_count(), peak), 4), 'peak_tflops': round(peak, 2),
          'peak_mem_gb': round(_peak_bytes(compiled) / 2**30, 3), 'compile_s': round(compile_s, 1),
          'device': jax.devices()[0].device_kind, 'num_devices': jax.device_count()}


def yardstick(path, preset) -> dict:
  """Runs the yardstick script in a subprocess (same machine, same call) and parses its JSON line."""
  out = subprocess.run([sys.executable, path, '--preset', preset], capture_output=True, text=True, check=True)
  lines = [l for l in out.stdout.splitlines() if l.startswith('{')]
  return dict(json.loads(lines[-1]), impl='yardstick')
