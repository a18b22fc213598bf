"""The training loop, in named stages: setup, data, init-or-restore, compile, loop.

Everything pure lives elsewhere (train_step, model, loss); this module touches files, clocks and
mutable state. Metrics of step s are fetched after step s+1 is dispatched, so the host never waits
for the device except at checkpoints and evaluations.
"""

import dataclasses
import json
import logging
import os
import sys
import time

import jax
import numpy as np
import tqdm

from tmdm import checkpoint as checkpoint_lib
from tmdm import config_lib, metrics as metrics_lib, optim, perf, resilience, sharding as sharding_lib
from tmdm import train_state, train_step
from tmdm.data import mixture, pipeline, store
from tmdm.diffusion import corruption, loss as loss_lib
from tmdm.modalities import spec, text
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
  mesh = sharding_lib.make_mesh(mesh_shape.as_tuple())
  try:
    sharding_lib.check_tensor_within_process(mesh.devices)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  sharder = sharding_lib.Sharder(mesh, gather_on_use=cfg.mesh.gather_on_use)
  vocab = spec.VocabSpec.from_config(cfg.vocab)
  model_cfg = model_config.ModelConfig.from_config(cfg.model, vocab.size)
  t = cfg.train
  plan = optim.plan(cfg.optim, num_steps=t.num_steps, batch_size=t.batch_size, seq_len=cfg.data.seq_len)
  optim.check_critical_batch(plan, cfg.optim.on_exceeding_crit)
  log.info(plan.describe())
  tx = optim.build(cfg.optim, t.num_steps, model_cfg.group_multipliers(), batch_size=t.batch_size,
                   seq_len=cfg.data.seq_len)
  return Setup(cfg, mesh_shape, sharder, vocab, model_cfg, transformer.Transformer(model_cfg, sharder), tx,
               corruption.DiffusionConfig.from_config(cfg.diffusion))


def text_root(cfg):
  return mixture.root(cfg, 'text')


def check_data(cfg) -> dict:
  """Fails before any compilation when a dataset is missing or does not match the config."""
  try:
    return mixture.check(cfg)
  except store.DataError as e:
    raise config_lib.ConfigError(str(e)) from None


def data_seed(cfg) -> int:
  return cfg.data.seed if cfg.data.seed >= 0 else cfg.seed


def data_shards(cfg) -> checkpoint_lib.DataShards:
  """The data shards this process reads (data.num_shards fixed: the same order on any process count)."""
  total = config_lib.num_data_shards(cfg, jax.process_count())
  owned = pipeline.owned_shards(total, jax.process_index(), jax.process_count())
  return checkpoint_lib.DataShards(tuple(owned), total)


def train_iterator(s: Setup, shards: checkpoint_lib.DataShards):
  """(iterator of process-local batches, the SkipCounter of its bad records)."""
  skips = pipeline.SkipCounter(s.cfg.data.max_skip_fraction)
  rows_per_shard = config_lib.rows_per_step(s.cfg) // shards.num_shards
  iterators = {}
  for shard in shards.indices:
    rows = mixture.train_rows(s.cfg, s.vocab, seed=data_seed(s.cfg), shard_index=shard,
                              shard_count=shards.num_shards, skips=skips)
    iterators[shard] = iter(pipeline.batched(rows, rows_per_shard, s.cfg.data.prefetch))
  return pipeline.ShardedBatches(iterators), skips


def eval_batches(s: Setup, shards: checkpoint_lib.DataShards) -> dict:
  """Per mixture component: the first `train.eval_batches` batches of its validation split."""
  cfg = s.cfg
  rows_per_shard = config_lib.rows_per_step(cfg) // shards.num_shards
  out = {}
  for name in mixture.weights(cfg) if cfg.train.eval_batches else ():
    iterators = {
        shard: iter(pipeline.batched(mixture.component(cfg, name, s.vocab, 'val', seed=0, shard_index=shard,
                                                       shard_count=shards.num_shards, repeat=False),
                                     rows_per_shard, prefetch=0))
        for shard in shards.indices}
    batches = []
    for local in pipeline.ShardedBatches(iterators):
      batches.append(pipeline.to_global(local, s.sharder))
      if len(batches) == cfg.train.eval_batches:
        break
    out[name] = batches
  return out


def evaluate(eval_fn, params, components: dict, seed) -> dict:
  """Validation ELBO per mixture component and corruption mode (train_step.eval_sums):
    eval/<component>/joint/loss/<m>        every position of the row at one t: the ELBO of the row,
                                           comparable to other models' perplexity bounds
    eval/<component>/conditional/loss/<m>  pair components: condition clean, target masked, a bound
                                           on -log p(target | condition) (T2I rows give it for image,
                                           I2T rows for text)
    eval/loss/<m>, eval/loss               joint, all components together
  Every mode sees the same batches with the same keys."""
  out, total = {}, None
  for name, batches in components.items():
    for mode in ('joint', 'conditional') if mixture.is_pairs(name) else ('joint',):
      sums = None
      for i, batch in enumerate(batches):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
        part = jax.device_get(eval_fn(params, batch, key, mode=mode))
        sums = part if sums is None else jax.tree.map(np.add, sums, part)
      if sums is None:
        continue
      if mode == 'joint':
        total = sums if total is None else jax.tree.map(np.add, total, sums)
      out.update({f'eval/{name}/{mode}/{k}': v for k, v in loss_lib.finalize(sums).items()})
  if total is not None:
    out.update({f'eval/{k}': v for k, v in loss_lib.finalize(total).items()})
  return out


def focus_ids(cfg, manifests: dict, vocab: spec.VocabSpec) -> tuple:
  """Joint-vocabulary ids of train.eval_focus_words under the runs' text tokenizer (every dataset
  uses the same one: mixture.check), for validation's loss/focus."""
  words = [w.strip() for w in cfg.train.eval_focus_words.split(',') if w.strip()]
  if not words:
    return ()
  name, manifest = next(iter(manifests.items()))
  tok = text.TextTokenizer(os.path.join(mixture.root(cfg, name), manifest['tokenizers']['text']['file']))
  return tuple(vocab.text_start + i for i in tok.word_ids(words))


def _tokenizer_hashes(manifests: dict) -> dict:
  return {name: {field: tok['sha256'] for field, tok in m['tokenizers'].items()} for name, m in manifests.items()}


def _check_resumable(meta: dict, cfg, manifests, shards, ckpt_dir):
  """Config-level mismatches between a checkpoint and this run: one-line errors, nothing moved."""
  changed = config_lib.changed_keys(meta.get('config', {}), cfg, ('model', 'vocab'))
  if changed:
    name, value, now = changed[0]
    raise config_lib.ConfigError(f'the checkpoint in {ckpt_dir} has {name}={value!r} but the config says {now!r}; '
                                 'use a new --workdir or the same model')
  hashes = _tokenizer_hashes(manifests)
  for name, fields in meta.get('tokenizers', {}).items():
    for field, digest in fields.items():
      if name in hashes and hashes[name].get(field) != digest:
        raise config_lib.ConfigError(
            f'the {field} tokenizer of the {name} data ({mixture.root(cfg, name)}) is not the one the checkpoint in '
            f'{ckpt_dir} was trained with (sha256 {digest[:12]}... vs {hashes[name].get(field, "none")[:12]}...)')
  if meta.get('num_shards', shards.num_shards) != shards.num_shards:
    raise config_lib.ConfigError(f'the checkpoint in {ckpt_dir} was written with {meta["num_shards"]} data shards, '
                                 f'this run has {shards.num_shards}: set --config.data.num_shards={meta["num_shards"]}')


def _mismatch_error(e: checkpoint_lib.StateMismatch, cfg, ckpt_dir) -> config_lib.ConfigError:
  """The config keys behind a train state that differs from the checkpoint's, in one line."""
  changed = config_lib.changed_keys(e.saved_config, cfg, config_lib.STATE_SECTIONS)
  keys = ', '.join(f'{name} ({value!r} in the checkpoint, {now!r} now)' for name, value, now in changed)
  cause = (f'the config differs from the checkpoint\'s in {keys}: set them back or use a new --workdir' if keys else
           'no config key differs from the checkpoint\'s (was the code changed?)')
  return config_lib.ConfigError(f'checkpoint {e.step} in {ckpt_dir} holds another train state than this run builds; '
                                f'{cause} (nothing was moved; {e.detail})')


def _restore(s: Setup, ckpt, shards):
  """restore_latest_good's answer, with its refusals in the config's terms."""
  target = train_state.abstract_state(s.model, s.tx, s.sharder, s.seq_len)
  try:
    return ckpt.restore_latest_good(target, s.mesh_shape.as_tuple(), shards)
  except checkpoint_lib.StateMismatch as e:
    raise _mismatch_error(e, s.cfg, ckpt.directory) from None
  except checkpoint_lib.NothingRestorable as e:
    if not s.cfg.checkpoint.allow_fresh_start:  # A run never starts over by itself: it would lose the run.
      raise checkpoint_lib.NothingRestorable(
          f'{e}; not starting over from step 0: put a good checkpoint back, or set '
          '--config.checkpoint.allow_fresh_start=true to train from scratch') from None
    log.warning('%s; starting from step 0 (checkpoint.allow_fresh_start)', e)
    return None


def init_or_restore(s: Setup, ckpt, data_iter, manifests, shards, *, restore_data=True):
  """(state, first step): the newest good checkpoint, or a fresh sharded init when there is no
  checkpoint (or none restores and checkpoint.allow_fresh_start is set)."""
  latest = ckpt.latest_step()
  if latest is not None:
    try:
      meta = ckpt.read_meta(latest)
    except Exception:  # pylint: disable=broad-except  (unreadable meta: restore_latest_good handles it)
      meta = {}
    _check_resumable(meta, s.cfg, manifests, shards, ckpt.directory)
  found = _restore(s, ckpt, shards)
  if found is None:
    return train_state.create(s.model, s.tx, s.sharder, s.seq_len, s.cfg.seed), 0
  state, data_state, _, step = found
  if restore_data:
    data_iter.set_state(data_state)
  log.info('resumed from step %d in %s', step, ckpt.directory)
  return state, step


def _global_batch(local: dict, sharder, stop_vote: int) -> dict:
  """A process-local batch as global arrays, plus this process's stop vote in each of its rows
  (resilience.Preemption)."""
  batch = pipeline.to_global(local, sharder)
  votes = np.full((len(local['tokens']),), stop_vote, np.int32)
  batch['stop'] = jax.make_array_from_process_local_data(sharder.batch(1), votes)
  return batch


class _Window:
  """Sums of one logging interval, kept on device until fetched."""

  def __init__(self):
    self.sums, self.hparams, self.steps = None, None, 0

  def add(self, metrics):
    metrics = dict(metrics)
    self.hparams = metrics.pop('hparams')  # Not summed: the newest step's values are logged.
    metrics.pop('stop', None)  # Read by the loop, not logged.
    self.sums = metrics if self.sums is None else jax.tree.map(lambda a, b: a + b, self.sums, metrics)
    self.steps += 1


def run(cfg, workdir: str) -> dict:
  """Trains (or resumes) to cfg.train.num_steps; returns the last logged metrics. With
  train.rollbacks > 0, a streak of non-finite steps restarts from the last checkpoint with a new
  data seed instead of stopping."""
  for attempt in range(cfg.train.rollbacks + 1):
    try:
      return _run(cfg, workdir, fresh_data=attempt > 0)
    except resilience.NonFiniteError as e:
      if attempt == cfg.train.rollbacks:
        raise
      cfg = cfg.copy_and_resolve_references()
      cfg.data.seed = data_seed(cfg) + 7919 * (attempt + 1)
      cfg.train.fault_nonfinite_steps = ()  # Injected faults model a transient problem of the first attempt.
      log.error('%s: rolling back to the last checkpoint with data seed %d', e, cfg.data.seed)
  raise AssertionError('unreachable')


def _run(cfg, workdir: str, fresh_data: bool) -> dict:
  primary = jax.process_index() == 0
  manifests = check_data(cfg)
  s = setup(cfg)
  os.makedirs(workdir, exist_ok=True)
  if primary:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(cfg.to_dict(), f, indent=2)

  shards = data_shards(cfg)
  data_iter, skips = train_iterator(s, shards)
  val = eval_batches(s, shards)
  ckpt = checkpoint_lib.Checkpointer(cfg.checkpoint.dir or os.path.join(workdir, 'checkpoints'),
                                     keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
  state, start = init_or_restore(s, ckpt, data_iter, manifests, shards, restore_data=not fresh_data)
  meta = {'config': cfg.to_dict(), 'tokenizers': _tokenizer_hashes(manifests), 'mesh': s.mesh_shape.as_tuple(),
          'num_shards': shards.num_shards}

  state_sh = train_state.state_shardings(s.model, s.tx, s.sharder, s.seq_len)
  step_fn, eval_fn = train_step.jit_steps(s.model, s.tx, s.diffusion, s.vocab, s.sharder, state_sh,
                                          cfg.train.microbatches, cfg.train.fault_nonfinite_steps,
                                          focus_ids=focus_ids(cfg, manifests, s.vocab))
  batch = _global_batch(next(data_iter), s.sharder, stop_vote=0)
  t0 = time.perf_counter()
  step_fn = step_fn.lower(state, batch).compile()
  jax.block_until_ready(checkpoint_lib.fingerprint(state))  # Compiled now, not inside the first save.
  compile_s = time.perf_counter() - t0

  tokens_per_step = cfg.train.batch_size * s.seq_len
  flops_per_step = s.model_cfg.flops_per_token(s.seq_len) * tokens_per_step
  peak = perf.peak_tflops_per_device(cfg.train.peak_tflops)
  log.info('mesh %s on %d devices | %.2fM params (%.2fM non-embedding) | %.3g FLOPs/step | compile %.1fs',
           s.mesh_shape.as_tuple(), jax.device_count(), s.model_cfg.num_params / 1e6,
           s.model_cfg.non_embedding_params / 1e6, flops_per_step, compile_s)

  writer = metrics_lib.MetricWriter(workdir, tensorboard=cfg.train.tensorboard, enabled=primary)
  bar = tqdm.tqdm(total=cfg.train.num_steps, initial=start, disable=not (primary and cfg.train.progress),
                  unit='step', dynamic_ncols=True)
  window, pending, previous, last = _Window(), None, None, {}
  streak = resilience.NonFiniteStreak(cfg.train.max_nonfinite_streak)
  failed_saves = 0
  clock = time.perf_counter()

  def flush(pending):
    nonlocal clock
    step, win = pending
    host, hparams = jax.device_get((win.sums, win.hparams))
    now = time.perf_counter()
    dt = (now - clock) / win.steps
    clock = now
    out = loss_lib.finalize(host)
    out.update({k: float(v) for k, v in hparams.items()})  # lr, b1, b2, eps, weight_decay, kappa
    out.update(grad_norm=float(host['grad_norm']) / max(win.steps - float(host['nonfinite']), 1),
               nonfinite=float(host['nonfinite']), step_time_s=dt, tokens_per_s=tokens_per_step / dt,
               mfu=perf.mfu(flops_per_step, dt, jax.device_count(), peak),
               **{f'data/skipped/{k}': v for k, v in skips.counts.items()})
    if failed_saves:
      out['checkpoint/failed_saves'] = failed_saves
    writer.write(step, out)
    bar.set_postfix(loss=f'{out.get("loss", float("nan")):.3f}', refresh=False)
    return out

  def save(step, data_state):
    nonlocal failed_saves
    if streak.active:  # Never checkpoint inside a non-finite streak: a rollback must land before it.
      log.warning('step %d: checkpoint skipped during a non-finite streak', step)
      return
    try:
      ckpt.save(step, state, data_state, shards.num_shards, cfg.to_dict(), meta)
    except checkpoint_lib.CheckpointError as e:
      if cfg.checkpoint.on_error == 'stop':
        raise
      failed_saves += 1
      log.error('%s -- TRAINING CONTINUES WITHOUT THIS CHECKPOINT (checkpoint.on_error=warn)', e)

  try:
    with resilience.Preemption() as preemption:
      for step in range(start, cfg.train.num_steps):
        if step > start:
          batch = _global_batch(next(data_iter), s.sharder, preemption.vote())
        data_state = data_iter.get_state()
        state, metrics = step_fn(state, batch)
        window.add(metrics)
        if previous is not None:  # One step late: the device is already busy with this step.
          streak.update(previous['nonfinite'], step)
          preemption.count(previous['stop'])
        previous = metrics
        if pending is not None:
          last = flush(pending)
          pending = None
        done = step + 1
        bar.update(1)
        scheduled = done % cfg.checkpoint.every_steps == 0 or done == cfg.train.num_steps
        if scheduled:  # Know this step's flags before saving it (every process reads the same values).
          flags = jax.device_get({k: metrics[k] for k in ('nonfinite', 'stop')})
          streak.update(flags['nonfinite'], done)
          preemption.count(flags['stop'])
          previous = None
        stopping = preemption.reached(done)
        if done % cfg.train.log_every_steps == 0 or done == cfg.train.num_steps or stopping:
          pending, window = (done, window), _Window()
        if scheduled or stopping:
          if previous is not None:
            streak.update(jax.device_get(metrics['nonfinite']), done)
            previous = None
          save(done, data_state)
        if stopping:
          log.warning('stopped by %s after step %d; the next `tmdm train` resumes from it', preemption.reason,
                      done)
          break
        if cfg.train.eval_every_steps and done % cfg.train.eval_every_steps == 0 and done < cfg.train.num_steps:
          writer.write(done, evaluate(eval_fn, state.params, val, cfg.seed + 1))
        if cfg.eval.every_steps and done % cfg.eval.every_steps == 0:  # Generation metrics (evaluate.py).
          from tmdm import evaluate as evaluate_lib  # pylint: disable=import-outside-toplevel  (it imports train)
          writer.write(done, evaluate_lib.during_training(s, state.params, done))
      if pending is not None:
        last = flush(pending)
      if val and not preemption.stop:
        final_eval = evaluate(eval_fn, state.params, val, cfg.seed + 1)
        writer.write(cfg.train.num_steps, final_eval)
        last.update(final_eval)
  finally:  # Whatever stops the loop, finish the background saves: the last good checkpoint counts.
    bar.close()
    writer.close()
    try:
      ckpt.close()
    except checkpoint_lib.CheckpointError as e:
      if cfg.checkpoint.on_error == 'stop' and sys.exc_info()[0] is None:
        raise
      log.error('%s', e)
  if preemption.stop:
    last['preempted'] = 1.0
  return last
