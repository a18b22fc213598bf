"""The training loop, in named stages: setup, data, init-or-restore, compile, loop.

Everything pure lives elsewhere (train_step, model, loss); this module touches files, clocks and
mutable state. Metrics of step s are fetched after step s+1 is dispatched, so the host never waits
for the device except at checkpoints and evaluations.
"""

import dataclasses
import json
import logging
import os
import time

import jax
import numpy as np
import tqdm

from tmdm import checkpoint as checkpoint_lib
from tmdm import config_lib, metrics as metrics_lib, optim, perf, sharding as sharding_lib
from tmdm import train_state, train_step
from tmdm.data import pipeline, store
from tmdm.diffusion import corruption, loss as loss_lib
from tmdm.modalities import spec
from tmdm.model import config as model_config, transformer

log = logging.getLogger('tmdm')


@dataclasses.dataclass
class Setup:
  """What every stage needs: built once from the config."""
  cfg: object
  mesh_shape: config_lib.MeshShape
  sharder: sharding_lib.Sharder
  vocab: spec.VocabSpec
  model_cfg: model_config.ModelConfig
  model: transformer.Transformer
  tx: object
  diffusion: corruption.DiffusionConfig

  @property
  def seq_len(self):
    return self.cfg.data.seq_len


def setup(cfg) -> Setup:
  mesh_shape = config_lib.resolve_mesh(cfg.mesh, jax.device_count())
  sharder = sharding_lib.Sharder(sharding_lib.make_mesh(mesh_shape.as_tuple()),
                                 gather_on_use=cfg.mesh.gather_on_use)
  vocab = spec.VocabSpec.from_config(cfg.vocab)
  model_cfg = model_config.ModelConfig.from_config(cfg.model, vocab.size)
  tx = optim.build(cfg.optim, cfg.train.num_steps, model_cfg.group_multipliers())
  return Setup(cfg, mesh_shape, sharder, vocab, model_cfg, transformer.Transformer(model_cfg, sharder), tx,
               corruption.DiffusionConfig.from_config(cfg.diffusion))


def text_root(cfg):
  return os.path.join(cfg.data.root, cfg.data.text_name)


def check_data(cfg) -> dict:
  """Fails before any compilation when the dataset is missing or does not match the config."""
  root = text_root(cfg)
  manifest = store.read_manifest(root)
  tokenizer = manifest['tokenizers']['text']
  if tokenizer['vocab_size'] != cfg.vocab.text_size:
    raise config_lib.ConfigError(
        f'vocab.text_size is {cfg.vocab.text_size} but the text tokenizer of {root} has '
        f'{tokenizer["vocab_size"]} ids (set --config.vocab.text_size={tokenizer["vocab_size"]} or re-run prepare)')
  return manifest


def data_seed(cfg) -> int:
  return cfg.data.seed if cfg.data.seed >= 0 else cfg.seed


def train_iterator(s: Setup):
  cfg = s.cfg
  rows = pipeline.text_dataset(text_root(cfg), 'train', s.vocab, seq_len=s.seq_len, seed=data_seed(cfg),
                               shard_index=jax.process_index(), shard_count=jax.process_count(),
                               num_workers=cfg.data.num_workers)
  local_rows = config_lib.rows_per_step(cfg) // jax.process_count()
  return iter(pipeline.batched(rows, local_rows, cfg.data.prefetch))


def eval_batches(s: Setup) -> list:
  """The first `train.eval_batches` batches of the validation split, as global arrays."""
  cfg = s.cfg
  if cfg.train.eval_batches == 0:
    return []
  rows = pipeline.text_dataset(text_root(cfg), 'val', s.vocab, seq_len=s.seq_len, seed=0,
                               shard_index=jax.process_index(), shard_count=jax.process_count(), repeat=False)
  local_rows = config_lib.rows_per_step(cfg) // jax.process_count()
  out = []
  for local in pipeline.batched(rows, local_rows, prefetch=0):
    out.append(pipeline.to_global(local, s.sharder))
    if len(out) == cfg.train.eval_batches:
      break
  return out


def evaluate(eval_fn, params, batches, seed) -> dict:
  total = None
  for i, batch in enumerate(batches):
    sums = eval_fn(params, batch, jax.random.fold_in(jax.random.PRNGKey(seed), i))
    total = sums if total is None else jax.tree.map(np.add, total, sums)
  if total is None:
    return {}
  return {f'eval/{k}': v for k, v in loss_lib.finalize(jax.device_get(total)).items()}


def _check_compatible(saved: dict, cfg, workdir):
  for section in ('model', 'vocab'):
    now = cfg[section].to_dict()
    for key, value in saved.get(section, {}).items():
      if now.get(key) != value:
        raise config_lib.ConfigError(
            f'the checkpoint in {workdir} has {section}.{key}={value!r} but the config says {now.get(key)!r}; '
            'use a new --workdir or the same model')


def init_or_restore(s: Setup, ckpt: checkpoint_lib.Checkpointer, data_iter, workdir):
  step = ckpt.latest_step()
  if step is None:
    return train_state.create(s.model, s.tx, s.sharder, s.seq_len, s.cfg.seed), 0
  target = train_state.abstract_state(s.model, s.tx, s.sharder, s.seq_len)
  state, data_state, saved_cfg = ckpt.restore(step, target)
  _check_compatible(saved_cfg, s.cfg, workdir)
  data_iter.set_state(data_state)
  log.info('resumed from step %d of %s', step, workdir)
  return state, step


class _Window:
  """Sums of one logging interval, kept on device until fetched."""

  def __init__(self):
    self.sums, self.steps = None, 0

  def add(self, metrics):
    self.sums = metrics if self.sums is None else jax.tree.map(lambda a, b: a + b, self.sums, metrics)
    self.steps += 1


def run(cfg, workdir: str) -> dict:
  """Trains (or resumes) to cfg.train.num_steps; returns the last logged metrics."""
  primary = jax.process_index() == 0
  check_data(cfg)
  s = setup(cfg)
  os.makedirs(workdir, exist_ok=True)
  if primary:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(cfg.to_dict(), f, indent=2)

  data_iter = train_iterator(s)
  val = eval_batches(s)
  ckpt = checkpoint_lib.Checkpointer(os.path.abspath(os.path.join(workdir, 'checkpoints')),
                                     keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
  state, start = init_or_restore(s, ckpt, data_iter, workdir)

  state_sh = train_state.state_shardings(s.model, s.tx, s.sharder, s.seq_len)
  step_fn, eval_fn = train_step.jit_steps(s.model, s.tx, s.diffusion, s.vocab, s.sharder, state_sh,
                                          cfg.train.microbatches)
  batch = pipeline.to_global(next(data_iter), s.sharder)
  t0 = time.perf_counter()
  step_fn = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0

  tokens_per_step = cfg.train.batch_size * s.seq_len
  flops_per_step = s.model_cfg.flops_per_token(s.seq_len) * tokens_per_step
  peak = perf.peak_tflops_per_device(cfg.train.peak_tflops)
  schedule = optim.lr_schedule(cfg.optim, cfg.train.num_steps)
  log.info('mesh %s on %d devices | %.2fM params (%.2fM non-embedding) | %.3g FLOPs/step | compile %.1fs',
           s.mesh_shape.as_tuple(), jax.device_count(), s.model_cfg.num_params / 1e6,
           s.model_cfg.non_embedding_params / 1e6, flops_per_step, compile_s)

  writer = metrics_lib.MetricWriter(workdir, tensorboard=cfg.train.tensorboard, enabled=primary)
  bar = tqdm.tqdm(total=cfg.train.num_steps, initial=start, disable=not (primary and cfg.train.progress),
                  unit='step', dynamic_ncols=True)
  window, pending, last = _Window(), None, {}
  clock = time.perf_counter()

  def flush(pending):
    nonlocal clock
    step, win = pending
    host = jax.device_get(win.sums)
    now = time.perf_counter()
    dt = (now - clock) / win.steps
    clock = now
    out = loss_lib.finalize(host)
    out.update(grad_norm=float(host['grad_norm']) / win.steps, lr=float(schedule(step - 1)) * cfg.optim.lr,
               step_time_s=dt, tokens_per_s=tokens_per_step / dt,
               mfu=perf.mfu(flops_per_step, dt, jax.device_count(), peak))
    writer.write(step, out)
    bar.set_postfix(loss=f'{out.get("loss", float("nan")):.3f}', refresh=False)
    return out

  for step in range(start, cfg.train.num_steps):
    if step > start:
      batch = pipeline.to_global(next(data_iter), s.sharder)
    data_state = data_iter.get_state()
    state, metrics = step_fn(state, batch)
    window.add(metrics)
    if pending is not None:
      last = flush(pending)
      pending = None
    done = step + 1
    bar.update(1)
    if done % cfg.train.log_every_steps == 0 or done == cfg.train.num_steps:
      pending, window = (done, window), _Window()
    if done % cfg.checkpoint.every_steps == 0 or done == cfg.train.num_steps:
      ckpt.save(done, state, data_state, cfg.to_dict())
    if cfg.train.eval_every_steps and done % cfg.train.eval_every_steps == 0 and done < cfg.train.num_steps:
      writer.write(done, evaluate(eval_fn, state.params, val, cfg.seed + 1))
  if pending is not None:
    last = flush(pending)
  if val:
    final_eval = evaluate(eval_fn, state.params, val, cfg.seed + 1)
    writer.write(cfg.train.num_steps, final_eval)
    last.update(final_eval)
  bar.close()
  ckpt.close()
  writer.close()
  return last
