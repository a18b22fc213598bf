"""`tmdm bench-sample`: sampling throughput and latency against the number of steps.

Canvases are synthetic (random caption ids, every target position masked) in a task's training
layout, so the benchmark needs no dataset: with --config it times a freshly initialized model (the
cost of a step does not depend on the weights), with --workdir the trained one (which matters for
the 'threshold' sampler and for forward passes skipped by reuse, both driven by the model's
confidence). Each row: one compile (steps are a traced input), one warm-up call, then `repeats`
timed calls of one batch.

  tokens/s            generated (masked) tokens per second of wall time
  latency/batch       seconds per sampling call of `batch` rows
  ms/sample           the same per row
  passes              forward passes of the batch (fewer than steps when reuse skips some)
"""

import time

import jax
import numpy as np

from tmdm import vocab as vocab_lib
from tmdm.config import loader as config_loader
from tmdm.generation import generate, tasks as tasks_lib
from tmdm.training import setup as setup_lib, state as train_state


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
    out.append({'steps': int(steps), 'passes': int(passes), 'tokens_per_s': masked / dt, 'latency_s': dt,
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
