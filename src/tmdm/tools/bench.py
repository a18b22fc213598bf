"""`tmdm bench step`: tmdm's real train step (model, loss, optimizer, sharding of the trainer) on
synthetic tokens at the shapes of the performance yardstick (docs/design.md 3), one JSON
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

from tmdm import errors, vocab as vocab_lib
from tmdm.config import base as base_config, checks as config_checks, loader as config_loader
from tmdm.data import shards as shards_lib
from tmdm.model import config as model_config
from tmdm.training import perf, setup as setup_lib, state as train_state, step as train_step

log = logging.getLogger('tmdm')

# preset -> (model preset, vocabulary size, batch, seq); the yardstick's shapes and batch.
SHAPES = {
    'cpu-small': ('cpu-small', 4096, 8, 256),
    'bench-0.5b': ('bench-0.5b', 65536, 8, 2048),
    'bench-1b': ('bench-1b', 65536, 8, 2048),
}


def bench_config(preset: str, *, batch=0, remat='', microbatches=1, overrides=()):
  """A config whose joint vocabulary has exactly the yardstick's size (text ids fill the rest)."""
  from tmdm.config import loader as config_loader  # pylint: disable=import-outside-toplevel
  model_preset, vocab, default_batch, seq = SHAPES[preset]
  c = base_config.get_config()
  c.model.update(model_config.PRESETS[model_preset])
  c.vocab.update(image_size=1000, audio_size=1000, multiple=128)
  c.vocab.text_size = vocab - vocab_lib.VocabSpec(1, 1000, 1000).num_special - 2000
  c.data.seq_len = seq
  c.train.update(batch_size=batch or default_batch, microbatches=microbatches, num_steps=1000)
  # On CPU an unrolled 4-layer stack ran 15% faster than nn.scan (BUILD_NOTES "Unrolled layers on CPU, `nn.scan` elsewhere"); accelerators
  # keep the scan (one compiled block).
  c.model.scan_layers = jax.default_backend() != 'cpu'
  if remat:
    c.model.remat = remat
  config_loader.apply_overrides(c, overrides)
  config_checks.validate(c, jax.device_count())
  assert vocab_lib.VocabSpec.from_config(c.vocab).size == vocab
  return c


def synthetic_batch(s: setup_lib.Setup, rows: int, segments: int, seed=0):
  """Random text ids; `segments` packed documents per row (1: no packing)."""
  L = s.seq_len
  rng = np.random.default_rng(seed)
  lo, hi = s.vocab.range(vocab_lib.TEXT)
  seg = np.repeat(np.arange(1, segments + 1), -(-L // segments))[:L]
  starts = np.searchsorted(seg, seg)
  return {'tokens': rng.integers(lo, hi, (rows, L)).astype(np.int32),
          'segment_ids': np.tile(seg, (rows, 1)).astype(np.int32),
          'positions': np.tile(np.arange(L) - starts, (rows, 1)).astype(np.int32),
          'role': np.full((rows, L), vocab_lib.TARGET, np.int32), 'modality': np.zeros((rows, L), np.int32)}


def _peak_bytes(compiled):
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use']
  mem = compiled.memory_analysis()  # CPU: what the compiled step needs, per device
  return mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes


def _fresh_state_and_step(s: setup_lib.Setup, cfg):
  """A freshly initialized train state and the trainer's jitted (not yet compiled) train step."""
  state = train_state.create(s.model, s.tx, s.sharder, s.seq_len, seed=0)
  state_sh = train_state.state_shardings(s.model, s.tx, s.sharder, s.seq_len)
  step_fn, _ = train_step.jit_steps(s.model, s.tx, s.diffusion, s.vocab, s.sharder, state_sh,
                                    cfg.train.microbatches)
  return state, step_fn


def step(preset, *, steps=10, warmup=3, segments=1, **config_kwargs) -> dict:
  cfg = bench_config(preset, **config_kwargs)
  s = setup_lib.build(cfg)
  state, step_fn = _fresh_state_and_step(s, cfg)
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


def pipeline_throughput(cfg, batches=50) -> list:
  """Rows and tokens per second of the Grain pipeline alone, per mixture component and mixed,
  in one process (main thread plus Grain's prefetch thread; data.num_workers adds processes)."""
  from tmdm.data import mixture, pipeline  # pylint: disable=import-outside-toplevel
  vocab = vocab_lib.VocabSpec.from_config(cfg.vocab)
  rows = cfg.train.batch_size
  sources = {name: mixture.component(cfg, name, vocab, 'train', seed=0, shard_index=0, shard_count=1,
                                     repeat=True, num_workers=cfg.data.num_workers)
             for name in mixture.weights(cfg)}
  if len(sources) > 1:
    sources['mixture'] = mixture.train_rows(cfg, vocab, seed=0, shard_index=0, shard_count=1)
  out = []
  for name, ds in sources.items():
    it = iter(pipeline.batched(ds, rows, cfg.data.prefetch))
    next(it)  # start-up (worker processes, first reads) is not throughput
    t0 = time.perf_counter()
    real = 0
    for _ in range(batches):
      real += int((next(it)['segment_ids'] > 0).sum())
    dt = time.perf_counter() - t0
    out.append({'bench': 'pipeline', 'source': name, 'workers': cfg.data.num_workers,
                'rows_s': round(batches * rows / dt, 1), 'tok_s': round(batches * rows * cfg.data.seq_len / dt),
                'non_pad_tok_s': round(real / dt)})
  return out


def input_overhead(cfg, steps=30) -> dict:
  """Training tokens/s with the real pipeline against the same compiled step fed one in-memory batch."""
  from tmdm.data import pipeline  # pylint: disable=import-outside-toplevel
  s = setup_lib.build(cfg)
  shards = shards_lib.owned(cfg)
  data_iter, _ = shards_lib.train_iterator(s.cfg, s.vocab, shards)
  state, step_fn = _fresh_state_and_step(s, cfg)
  fixed = pipeline.to_global(next(data_iter), s.sharder)
  step_fn = step_fn.lower(state, fixed).compile()

  def timed(feed):
    nonlocal state
    for _ in range(3):  # warm-up
      state, m = step_fn(state, feed())
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = step_fn(state, feed())  # the next batch is prepared while this step runs
    jax.block_until_ready(m)
    return (time.perf_counter() - t0) / steps

  in_memory = timed(lambda: fixed)
  real = timed(lambda: pipeline.to_global(next(data_iter), s.sharder))
  tokens = cfg.train.batch_size * cfg.data.seq_len
  return {'bench': 'input', 'in_memory_tok_s': round(tokens / in_memory), 'pipeline_tok_s': round(tokens / real),
          'pipeline_over_in_memory': round(in_memory / real, 4), 'steps': steps}


def checkpoint_cost(cfg, saves=5, steps_between=5, workdir=None) -> dict:
  """Time the loop is blocked per async save (against the step time, steps_between steps apart), and
  the restore time."""
  import tempfile  # pylint: disable=import-outside-toplevel
  from tmdm.training import checkpoint as checkpoint_lib, local_tier  # pylint: disable=import-outside-toplevel
  s = setup_lib.build(cfg)
  state, step_fn = _fresh_state_and_step(s, cfg)
  batch = {k: jax.device_put(v, s.sharder.batch()) for k, v in
           synthetic_batch(s, cfg.train.batch_size, 1).items()}
  step_fn = step_fn.lower(state, batch).compile()
  jax.block_until_ready(checkpoint_lib.fingerprint(state))  # As the loop does: compiled before the first save.
  folder = workdir or tempfile.mkdtemp(prefix='tmdm-bench-ckpt-')
  ckpt = checkpoint_lib.Checkpointer(folder, keep=2, async_save=cfg.checkpoint.async_save)
  blocked, step_times = [], []
  for i in range(saves):
    for _ in range(steps_between):  # The loop's pattern: steps (overlapping the last background write), a save.
      t0 = time.perf_counter()
      state, m = step_fn(state, batch)
      jax.block_until_ready(m)
      step_times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    ckpt.save(i + 1, state, {'0': {}}, 1, {}, {'mesh': s.mesh_shape.as_tuple()})  # One data shard, no iterator.
    blocked.append(time.perf_counter() - t0)
  ckpt.wait()
  target = train_state.abstract_state(s.model, s.tx, s.sharder, s.seq_len)
  t0 = time.perf_counter()
  ckpt.restore_state(target)
  restore_s = time.perf_counter() - t0
  ckpt.close()
  local = local_tier.LocalTier(tempfile.mkdtemp(prefix='tmdm-bench-local-'), folder, keep=2)
  local_blocked = []
  for i in range(saves):  # The local tier: the host copy blocks, the file write runs in the background.
    state, m = step_fn(state, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    local.save(i + 1, state, {'0': {}}, {})
    local_blocked.append(time.perf_counter() - t0)
  local.wait()
  t0 = time.perf_counter()
  if local.restore(target, None) is None:
    raise RuntimeError(f'the local tier in {local.directory} did not restore')
  local_restore_s = time.perf_counter() - t0
  return {'bench': 'checkpoint', 'async': cfg.checkpoint.async_save, 'saves': saves, 'steps_between': steps_between,
          'blocked_ms_median': round(statistics.median(blocked) * 1e3, 1),
          'blocked_ms_max': round(max(blocked) * 1e3, 1), 'step_ms_median': round(statistics.median(step_times) * 1e3, 1),
          'restore_s': round(restore_s, 2), 'local_blocked_ms_median': round(statistics.median(local_blocked) * 1e3, 1),
          'local_restore_s': round(local_restore_s, 2),
          'state_mb': round(sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20, 1)}


def bench_command(args, overrides) -> int:
  """`tmdm bench WHAT`: prints one JSON line per result."""
  if args.what != 'step':
    if not args.config:
      raise errors.ConfigError(f'tmdm bench {args.what} needs --config (e.g. experiments/demo.py)')
    cfg = config_loader.load(args.config, overrides, num_devices=jax.device_count())
    shards_lib.check_data(cfg)
    results = {'pipeline': lambda: pipeline_throughput(cfg),
               'input': lambda: [input_overhead(cfg, steps=max(args.steps, 30))],
               'checkpoint': lambda: [checkpoint_cost(cfg)]}[args.what]()
    for r in results:
      print(json.dumps(r))
    return 0
  result = step(args.preset, steps=args.steps, segments=args.segments, batch=args.batch, remat=args.remat,
                      microbatches=args.microbatches, overrides=overrides)
  print(json.dumps(result))
  if args.yardstick:
    base = yardstick(args.yardstick, args.preset)
    print(json.dumps(base))
    print(json.dumps({'preset': args.preset, 'tok_s_ratio_tmdm_over_yardstick': round(result['tok_s'] / base['tok_s'], 3)}))
  return 0
