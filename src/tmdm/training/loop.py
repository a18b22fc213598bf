"""The training loop, top to bottom: set up, restore, compile, then steps until done or stopped.

Everything pure lives elsewhere (training/step, model, diffusion); this module touches files, clocks
and mutable state. Metrics of step s are fetched after step s+1 is dispatched, so the host never
waits for the device except at checkpoints and evaluations. Generation metrics during training
(eval.every_steps) come from a callable the caller passes (evaluation/ sits above this layer).
"""

import json
import logging
import sys
import time
from typing import Callable

import jax
import numpy as np
import tqdm

from tmdm import errors, storage
from tmdm.config import checks as config_checks
from tmdm.data import mixture, pipeline, shards as shards_lib
from tmdm.diffusion import loss as loss_lib
from tmdm.training import checkpoint as checkpoint_lib, goodput, local_tier, metrics as metrics_lib, perf, resilience
from tmdm.training import setup as setup_lib, state as train_state, step as train_step, validation

log = logging.getLogger('tmdm')

# (setup, params, step) -> metrics: generation metrics every eval.every_steps (evaluation.evaluators).
GenerationEval = Callable[[setup_lib.Setup, object, int], dict]


def _tokenizer_hashes(manifests: dict) -> dict:
  return {name: {field: tok['sha256'] for field, tok in m['tokenizers'].items()} for name, m in manifests.items()}


def _check_resumable(meta: dict, cfg, manifests, shards, ckpt_dir):
  """Config-level mismatches between a checkpoint and this run: one-line errors, nothing moved."""
  changed = config_checks.changed_keys(meta.get('config', {}), cfg, ('model', 'vocab'))
  if changed:
    name, value, now = changed[0]
    raise errors.ConfigError(f'the checkpoint in {ckpt_dir} has {name}={value!r} but the config says {now!r}; '
                                 'use a new --workdir or the same model')
  hashes = _tokenizer_hashes(manifests)
  for name, fields in meta.get('tokenizers', {}).items():
    for field, digest in fields.items():
      if name in hashes and hashes[name].get(field) != digest:
        raise errors.ConfigError(
            f'the {field} tokenizer of the {name} data ({mixture.root(cfg, name)}) is not the one the checkpoint in '
            f'{ckpt_dir} was trained with (sha256 {digest[:12]}... vs {hashes[name].get(field, "none")[:12]}...)')
  if meta.get('num_shards', shards.num_shards) != shards.num_shards:
    raise errors.ConfigError(f'the checkpoint in {ckpt_dir} was written with {meta["num_shards"]} data shards, '
                                 f'this run has {shards.num_shards}: set --config.data.num_shards={meta["num_shards"]}')
  saved_data = {} if meta.get('imported_from') else meta.get('config', {}).get('data', {})
  was = sorted(k for k in mixture.COMPONENTS if saved_data.get(f'mix_{k}', 0) > 0)
  if saved_data and was != sorted(mixture.weights(cfg)):  # The iterator state holds one state per component.
    keys = ', '.join(f'data.mix_{k} ({saved_data.get(f"mix_{k}", 0)!r} in the checkpoint, {cfg.data[f"mix_{k}"]!r} '
                     'now)' for k in mixture.COMPONENTS if (k in was) != (cfg.data[f'mix_{k}'] > 0))
    raise errors.ConfigError(f'the checkpoint in {ckpt_dir} was trained on another data mixture: {keys}; its '
                             'data-iterator state cannot be resumed: set them back or use a new --workdir')


def _mismatch_error(e: checkpoint_lib.StateMismatch, cfg, ckpt_dir) -> errors.ConfigError:
  """The config keys behind a train state that differs from the checkpoint's, in one line."""
  changed = config_checks.changed_keys(e.saved_config, cfg, config_checks.STATE_SECTIONS)
  keys = ', '.join(f'{name} ({value!r} in the checkpoint, {now!r} now)' for name, value, now in changed)
  cause = (f'the config differs from the checkpoint\'s in {keys}: set them back or use a new --workdir' if keys else
           'no config key differs from the checkpoint\'s (was the code changed?)')
  return errors.ConfigError(f'checkpoint {e.step} in {ckpt_dir} holds another train state than this run builds; '
                                f'{cause} (nothing was moved; {e.detail})')


def _restore(s: setup_lib.Setup, ckpt, shards):
  """restore_latest_good's answer, with its refusals in the config's terms."""
  target = train_state.abstract_state(s.model, s.tx, s.sharder, s.seq_len)
  try:
    return ckpt.restore_latest_good(target, shards)
  except checkpoint_lib.DataLayoutMismatch as e:
    raise errors.ConfigError(str(e)) from None
  except checkpoint_lib.StateMismatch as e:
    raise _mismatch_error(e, s.cfg, ckpt.directory) from None
  except checkpoint_lib.NothingRestorable as e:
    if not s.cfg.checkpoint.allow_fresh_start:  # A run never starts over by itself: it would lose the run.
      raise checkpoint_lib.NothingRestorable(
          f'{e}; not starting over from step 0: put a good checkpoint back, or set '
          '--config.checkpoint.allow_fresh_start=true to train from scratch') from None
    log.warning('%s; starting from step 0 (checkpoint.allow_fresh_start)', e)
    return None


def _newest_readable_meta(ckpt):
  """The meta of the newest step whose meta reads (an unreadable one is left to the restore, which
  proves it damaged or not); None when there is none."""
  for step in sorted(ckpt.steps(), reverse=True):
    try:
      return ckpt.read_meta(step)
    except Exception:  # pylint: disable=broad-except
      continue
  return None


def _restore_local(s: setup_lib.Setup, ckpt, local, manifests, shards):
  """restore_latest_good's answer from the local tier when every process holds a newer step there."""
  latest = ckpt.latest_step()
  persistent = checkpoint_lib.from_process_0(-1 if latest is None else latest)  # Process 0's listing rules.
  target = train_state.abstract_state(s.model, s.tx, s.sharder, s.seq_len)
  found = local.restore(target, persistent if persistent >= 0 else None)
  if found is not None:
    _check_resumable(found[2], s.cfg, manifests, shards, local.directory)
  return found


def init_or_restore(s: setup_lib.Setup, ckpt, data_iter, manifests, shards, *, restore_data=True, local=None):
  """(state, first step): the newest good checkpoint (of the local tier when every process holds a
  newer one there, else of the persistent tier), or a fresh sharded init when there is no checkpoint
  (or none restores and checkpoint.allow_fresh_start is set)."""
  meta = _newest_readable_meta(ckpt)
  if meta is not None:  # Config changes are named before any step is read, so none can pass for damage.
    _check_resumable(meta, s.cfg, manifests, shards, ckpt.directory)
  found = _restore_local(s, ckpt, local, manifests, shards) if local is not None else None
  tier = 'local tier' if found is not None else 'persistent tier'
  found = found or _restore(s, ckpt, shards)
  if found is None:
    return train_state.create(s.model, s.tx, s.sharder, s.seq_len, s.cfg.seed), 0
  state, data_state, _, step = found
  if data_state is None:
    log.info('checkpoint %d has no data position (imported weights): the data starts from its beginning', step)
  elif restore_data:
    try:
      data_iter.set_state(data_state)
    except Exception as e:  # pylint: disable=broad-except  (a pipeline change; the checkpoint read fine)
      raise errors.ConfigError(f'the data-iterator state of checkpoint {step} in {ckpt.directory} does not fit '
                               f'this run\'s data pipeline ({type(e).__name__}: {str(e).splitlines()[0][:200]}); '
                               'was the data mixture changed? (nothing was moved)') from None
  log.info('resumed from step %d (%s) in %s', step, tier, local.directory if tier == 'local tier' else ckpt.directory)
  return state, step


def _global_batch(local: dict, sharder, stop_vote: int) -> dict:
  """A process-local batch as global arrays, plus this process's stop vote in each of its rows
  (resilience.Preemption)."""
  batch = pipeline.to_global(local, sharder)
  votes = np.full((len(local['tokens']),), stop_vote, np.int32)
  batch['stop'] = jax.make_array_from_process_local_data(sharder.batch(1), votes)
  return batch


def due(done: int, every: int, num_steps: int, stopping: bool = False) -> bool:
  """Whether a periodic action (log, checkpoint) runs after `done` steps: every `every` steps, at
  the last step and when stopping."""
  return done % every == 0 or done == num_steps or stopping


class MetricsWindow:
  """The sums of one logging interval, kept on device until `flush` fetches them one step late."""

  def __init__(self, writer, bar, skips, tokens_per_step: int, flops_per_step: float, peak: float, account):
    self.writer, self.bar, self.skips, self.account = writer, bar, skips, account
    self.tokens_per_step, self.flops_per_step, self.peak = tokens_per_step, flops_per_step, peak
    self._start()
    self.pending = None  # (step, sums, hparams, steps) closed, not yet fetched
    self.clock = time.perf_counter()
    self.failed_saves = 0

  def _start(self):
    self.sums, self.hparams, self.steps = None, None, 0

  def add(self, metrics):
    metrics = dict(metrics)
    self.hparams = metrics.pop('hparams')  # Not summed: the newest step's values are logged.
    metrics.pop('stop', None)  # Read by the loop, not logged.
    self.sums = metrics if self.sums is None else jax.tree.map(lambda a, b: a + b, self.sums, metrics)
    self.steps += 1

  def close(self, step: int):
    """Ends the interval at `step`; it is written by the next flush()."""
    self.pending = (step, self.sums, self.hparams, self.steps)
    self._start()

  def flush(self) -> dict | None:
    """Fetches and writes the closed interval (None if there is none); returns its metrics."""
    if self.pending is None:
      return None
    step, sums, hparams, steps = self.pending
    self.pending = None
    host, hparams = jax.device_get((sums, hparams))
    now = time.perf_counter()
    dt, self.clock = (now - self.clock) / steps, now
    out = loss_lib.finalize(host)
    out.update({k: float(v) for k, v in hparams.items()})  # lr, b1, b2, eps, weight_decay, kappa
    out.update(grad_norm=float(host['grad_norm']) / max(steps - float(host['nonfinite']), 1),
               nonfinite=float(host['nonfinite']), step_time_s=dt, tokens_per_s=self.tokens_per_step / dt,
               mfu=perf.mfu(self.flops_per_step, dt, jax.device_count(), self.peak),
               **{f'data/skipped/{k}': v for k, v in self.skips.counts.items()})
    if self.failed_saves:
      out['checkpoint/failed_saves'] = self.failed_saves
    out.update(self.account.row())  # goodput/<cause>_s of the interval since the last row
    self.writer.write(step, out)
    self.bar.set_postfix(loss=f'{out.get("loss", float("nan")):.3f}', refresh=False)
    return out


class Saver:
  """Checkpoints of the loop: never inside a non-finite streak; failures stop the run or, with
  checkpoint.on_error=warn, are counted and training goes on."""

  def __init__(self, cfg, ckpt, shards, meta: dict, streak, window: MetricsWindow, local=None):
    self.cfg, self.ckpt, self.shards, self.meta, self.streak, self.window = cfg, ckpt, shards, meta, streak, window
    self.local = local  # local_tier.LocalTier, or None

  def save_local(self, step: int, state, data_state):
    """A save to the local tier (this process's shards); failures as for the persistent tier."""
    if self.streak.active:
      return
    try:
      self.local.save(step, state, data_state, self.meta)
    except checkpoint_lib.CheckpointError as e:
      if self.cfg.checkpoint.on_error == 'stop':
        raise
      self.window.failed_saves += 1
      log.error('%s -- TRAINING CONTINUES WITHOUT THIS LOCAL CHECKPOINT (checkpoint.on_error=warn)', e)

  def save(self, step: int, state, data_state):
    if self.streak.active:  # A rollback must land before the streak.
      log.warning('step %d: checkpoint skipped during a non-finite streak', step)
      return
    try:
      self.ckpt.save(step, state, data_state, self.shards.num_shards, self.cfg.to_dict(), self.meta)
    except checkpoint_lib.CheckpointError as e:
      if self.cfg.checkpoint.on_error == 'stop':
        raise
      self.window.failed_saves += 1
      log.error('%s -- TRAINING CONTINUES WITHOUT THIS CHECKPOINT (checkpoint.on_error=warn)', e)
      # A row of its own: the step's training row was written before this save was tried.
      self.window.writer.write(step, {'checkpoint/failed_saves': self.window.failed_saves})

  def close(self):
    """Finishes the background saves whatever stopped the loop: the last good checkpoint counts."""
    try:
      if self.local is not None:
        _close_all(self.local.close, self.ckpt.close)
        return
      self.ckpt.close()
    except checkpoint_lib.CheckpointError as e:
      if self.cfg.checkpoint.on_error == 'stop' and sys.exc_info()[0] is None:
        raise
      log.error('%s', e)


class Flags:
  """The two flags every process must agree on (non-finite streak, stop votes), read one step late
  so that the host does not wait for the device, and read at once before a checkpoint."""

  def __init__(self, streak, preemption):
    self.streak, self.preemption, self.previous = streak, preemption, None

  def after(self, metrics, step: int):
    """Step `step` was dispatched with `metrics`: reads the previous step's flags (already done)."""
    if self.previous is not None:
      self.streak.update(self.previous['nonfinite'], step)
      self.preemption.count(self.previous['stop'])
    self.previous = metrics

  def now(self, metrics, done: int):
    """Reads this step's flags before saving it (every process reads the same values)."""
    flags = jax.device_get({k: metrics[k] for k in ('nonfinite', 'stop')})
    self.streak.update(flags['nonfinite'], done)
    self.preemption.count(flags['stop'])
    self.previous = None


def run(cfg, workdir: str, *, generation_eval: GenerationEval | None = None) -> dict:
  """Trains (or resumes) to cfg.train.num_steps; returns the last logged metrics. With
  train.rollbacks > 0, a streak of non-finite steps restarts from the last checkpoint with a new
  data seed instead of stopping. generation_eval: see GenerationEval (needed by eval.every_steps)."""
  if cfg.eval.every_steps and generation_eval is None:
    raise errors.ConfigError('eval.every_steps needs a generation evaluator: run through `tmdm train`, or pass '
                             'generation_eval=evaluation.evaluators.TrainingEvaluator()')
  for attempt in range(cfg.train.rollbacks + 1):
    try:
      return _run(cfg, workdir, fresh_data=attempt > 0, generation_eval=generation_eval)
    except resilience.NonFiniteError as e:
      if attempt == cfg.train.rollbacks:
        raise
      cfg = cfg.copy_and_resolve_references()
      cfg.data.seed = shards_lib.data_seed(cfg) + 7919 * (attempt + 1)
      cfg.train.fault_nonfinite_steps = ()  # Injected faults model a transient problem of the first attempt.
      log.error('%s: rolling back to the last checkpoint with data seed %d', e, cfg.data.seed)
  raise AssertionError('unreachable')


def _close_all(*closers):
  """Calls every closer whatever the others raise (a metric writer whose upload times out must not
  keep the saver from finishing), then raises the first error unless another is already on its way."""
  failed = []
  for close in closers:
    try:
      close()
    except Exception as e:  # pylint: disable=broad-except  (reported below, after every closer ran)
      log.error('while stopping: %s: %s', type(e).__name__, e)
      failed.append(e)
  if failed and sys.exc_info()[0] is None:
    raise failed[0]


def _write_config(cfg, workdir):
  if jax.process_index() == 0:
    storage.makedirs(workdir)
    storage.write_text(storage.join(workdir, 'config.json'), json.dumps(cfg.to_dict(), indent=2))


def _compile(s: setup_lib.Setup, state, batch, manifests):
  """(compiled train step, eval function, seconds to compile)."""
  state_sh = train_state.state_shardings(s.model, s.tx, s.sharder, s.seq_len)
  step_fn, eval_fn = train_step.jit_steps(s.model, s.tx, s.diffusion, s.vocab, s.sharder, state_sh,
                                          s.cfg.train.microbatches, s.cfg.train.fault_nonfinite_steps,
                                          focus_ids=validation.focus_ids(s.cfg, manifests, s.vocab))
  t0 = time.perf_counter()
  step_fn = step_fn.lower(state, batch).compile()
  jax.block_until_ready(checkpoint_lib.fingerprint(state))  # Compiled now, not inside the first save.
  return step_fn, eval_fn, time.perf_counter() - t0


def _run(cfg, workdir: str, fresh_data: bool, generation_eval) -> dict:
  account = goodput.Account()
  primary = jax.process_index() == 0
  manifests = shards_lib.check_data(cfg)
  s = setup_lib.build(cfg)

  shards = shards_lib.owned(cfg)
  data_iter, skips = shards_lib.train_iterator(cfg, s.vocab, shards)
  val = shards_lib.eval_batches(cfg, s.vocab, s.sharder, shards)
  ckpt = checkpoint_lib.Checkpointer(cfg.checkpoint.dir or storage.join(workdir, 'checkpoints'),
                                     keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
  with account.timed('restore'):
    local = (local_tier.LocalTier(cfg.checkpoint.local_dir, workdir, cfg.checkpoint.local_keep)
             if cfg.checkpoint.local_dir else None)
    state, start = init_or_restore(s, ckpt, data_iter, manifests, shards, restore_data=not fresh_data, local=local)
  _write_config(cfg, workdir)  # Only now: a refused resume leaves the run's config.json as it was.
  meta = {'config': cfg.to_dict(), 'tokenizers': _tokenizer_hashes(manifests), 'mesh': s.mesh_shape.as_tuple(),
          'num_shards': shards.num_shards}

  with account.timed('data'):
    batch = _global_batch(next(data_iter), s.sharder, stop_vote=0)
  with account.timed('compile'):
    step_fn, eval_fn, compile_s = _compile(s, state, batch, manifests)
  tokens_per_step = cfg.train.batch_size * s.seq_len
  flops_per_step = s.model_cfg.flops_per_token(s.seq_len) * tokens_per_step
  log.info('mesh %s on %d devices | %.2fM params (%.2fM non-embedding) | %.3g FLOPs/step | compile %.1fs',
           s.mesh_shape.as_tuple(), jax.device_count(), s.model_cfg.num_params / 1e6,
           s.model_cfg.non_embedding_params / 1e6, flops_per_step, compile_s)

  t = cfg.train
  # Before the killed run's later rows are dropped; idle until this attempt began.
  restart = goodput.restart_row(workdir, start, account.start) if primary else None
  writer = metrics_lib.MetricWriter(workdir, tensorboard=t.tensorboard, enabled=primary, start_step=start)
  if restart:
    writer.write(start, restart)
  bar = tqdm.tqdm(total=t.num_steps, initial=start, disable=not (primary and t.progress), unit='step',
                  dynamic_ncols=True)
  window = MetricsWindow(writer, bar, skips, tokens_per_step, flops_per_step, perf.peak_tflops_per_device(t.peak_tflops),
                         account)
  streak = resilience.NonFiniteStreak(t.max_nonfinite_streak)
  saver = Saver(cfg, ckpt, shards, meta, streak, window, local)
  last_step = [start]  # The newest step done (the last goodput row's step).
  last = {}
  try:
    with resilience.Preemption() as preemption:
      flags = Flags(streak, preemption)
      account.started()
      for step in range(start, t.num_steps):
        if step > start:
          with account.timed('data'):
            batch = _global_batch(next(data_iter), s.sharder, preemption.vote())
        data_state = data_iter.get_state()
        state, metrics = step_fn(state, batch)
        window.add(metrics)
        flags.after(metrics, step)
        last = window.flush() or last  # The previous interval: the device is already busy with this step.
        done = last_step[0] = step + 1
        bar.update(1)
        checkpoint_due = due(done, cfg.checkpoint.every_steps, t.num_steps)
        local_due = bool(local and done % cfg.checkpoint.local_every_steps == 0 and not checkpoint_due)
        if checkpoint_due or local_due:
          flags.now(metrics, done)
        stopping = preemption.reached(done)
        if due(done, t.log_every_steps, t.num_steps, stopping):
          window.close(done)
        if checkpoint_due or local_due or stopping:
          if flags.previous is not None:  # Stopping between checkpoints: this step's streak flag first.
            flags.now(metrics, done)
          last = window.flush() or last  # The step's row is on file before its checkpoint commits.
        if stopping:
          with account.timed('checkpoint'):
            saver.save(done, state, data_state)
          log.warning('stopped by %s after step %d; the next `tmdm train` resumes from it', preemption.reason, done)
          break
        if t.eval_every_steps and done % t.eval_every_steps == 0 and done < t.num_steps:
          with account.timed('eval'):
            writer.write(done, validation.evaluate(eval_fn, state.params, val, cfg.seed + 1))
        if cfg.eval.every_steps and done % cfg.eval.every_steps == 0:
          with account.timed('eval'):
            writer.write(done, generation_eval(s, state.params, done))
        if local_due:
          with account.timed('checkpoint'):
            saver.save_local(done, state, data_state)
        if checkpoint_due:  # After the step's evaluations, so that a resume from it has their rows too.
          with account.timed('checkpoint'):
            saver.save(done, state, data_state)
          if window.failed_saves:
            last['checkpoint/failed_saves'] = window.failed_saves
      last = window.flush() or last
      if val and not preemption.stop:
        with account.timed('eval'):
          final_eval = validation.evaluate(eval_fn, state.params, val, cfg.seed + 1)
        writer.write(t.num_steps, final_eval)
        last.update(final_eval)
  finally:
    def close_saver():
      with account.timed('checkpoint'):  # The wait for background saves.
        saver.close()
    # The saver first: the last checkpoint matters most; then the time it took, in a last goodput row.
    _close_all(close_saver, lambda: writer.write(last_step[0], account.row()), writer.close, bar.close)
  if preemption.stop:
    last['preempted'] = 1.0
  return last
