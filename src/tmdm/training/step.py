"""The pure train and eval steps.

A batch is a dict of [B, L] int32 arrays: tokens, segment_ids, positions, role, modality (see
data/pipeline.py). Corruption is drawn for the whole physical batch first, so that splitting it into
k accumulated microbatches changes nothing but peak memory: the summed gradient of
sum_mb(ELBO terms) / count(whole batch) equals the gradient of the whole batch.
"""

import functools

import jax
import jax.numpy as jnp
import optax

from tmdm import optim, vocab as vocab_lib
from tmdm.diffusion import corruption, loss as loss_lib
from tmdm.model import transformer
from tmdm.parallel import sharding as sharding_lib
from tmdm.training.state import TrainState



def _corrupt_batch(rng, batch, diff_cfg, mask_id):
  if diff_cfg.complementary:  # Rows arrive once; the pair is [x; x] with complementary masks.
    batch = {k: jnp.concatenate([v, v]) for k, v in batch.items()}
  c = corruption.corrupt(rng, batch['tokens'], batch['role'], batch['modality'], diff_cfg, mask_id)
  return batch, c


def _sums(params, model, batch, c, allowed_MV, sharder, focus_BL=None):
  args = (c['x_t_BL'], batch['segment_ids'], batch['positions'], c['t_B'])
  if model.cfg.loss_chunk:  # Memory-lean: logits of `loss_chunk` positions at a time.
    x_BLD, w_DV = model.apply({'params': params}, *args, return_hidden=True)
    unembed_fn = functools.partial(transformer.unembed, model.cfg, sharder, w_DV=w_DV)
    nll_BL = loss_lib.chunked_nll(unembed_fn, x_BLD, batch['tokens'], batch['modality'], allowed_MV, sharder,
                                  model.cfg.loss_chunk)
  else:
    logits_BLV = model.apply({'params': params}, *args)
    nll_BL = loss_lib.vocab_parallel_nll(logits_BLV, batch['tokens'], batch['modality'], allowed_MV, sharder)
  return loss_lib.elbo_sums(nll_BL, c['masked_BL'], c['weight_BL'], c['supervised_BL'], batch['modality'], focus_BL)


def _split_microbatches(tree, k, sharder):
  """[B, ...] -> [k, B/k, ...] where microbatch i holds rows i, i+k, ...: every device keeps an
  equal share of every microbatch (contiguous splits would leave devices idle)."""
  def split(x):
    x = x.reshape((x.shape[0] // k, k) + x.shape[1:])
    x = sharder.constrain(x, ('batch',) + (None,) * (x.ndim - 1))
    x = jnp.swapaxes(x, 0, 1)
    return sharder.constrain(x, (None, 'batch') + (None,) * (x.ndim - 2))
  return jax.tree.map(split, tree)


def grads_and_sums(params, batch, rng, *, model, diff_cfg, vocab, sharder, microbatches):
  """Gradient of the batch's per-token ELBO and its sums (loss_lib.elbo_sums), accumulated over
  `microbatches` slices of the batch."""
  batch, c = _corrupt_batch(rng, batch, diff_cfg, vocab.mask_id)
  allowed_MV = loss_lib.allowed_table(vocab, sharder)
  count = jnp.maximum(jnp.sum(c['supervised_BL'], dtype=jnp.float32), 1.0)

  def objective(p, mb, mc):
    sums = _sums(p, model, mb, mc, allowed_MV, sharder)
    return sums['elbo_sum'] / count, sums

  grad_fn = jax.value_and_grad(objective, has_aux=True)
  if microbatches == 1:
    (_, sums), grads = grad_fn(params, batch, c)
    return grads, sums
  slices = _split_microbatches((batch, c), microbatches, sharder)

  def accumulate(carry, xs):
    (_, sums), grads = grad_fn(params, *xs)
    return jax.tree.map(jnp.add, carry, (grads, sums)), None

  first = jax.tree.map(lambda x: x[0], slices)
  (_, sums_shape), grads_shape = jax.eval_shape(grad_fn, params, *first)
  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (grads_shape, sums_shape))
  (grads, sums), _ = jax.lax.scan(accumulate, zeros, slices)
  return grads, sums


def _skip_unless(finite, new, old):
  """A skipped step keeps every float leaf (parameters, moments, EMA) as it was, but integer leaves
  (the step counts of optax's schedules and of Adam's bias correction) advance: they stay equal to
  state.step, so a skip does not shift the lr schedule or the bias correction of later steps."""
  return new if jnp.issubdtype(old.dtype, jnp.integer) else jnp.where(finite, new, old)


def train_step(state: TrainState, batch, *, model, tx, diff_cfg, vocab, sharder, microbatches,
               fault_steps=()):
  """One optimizer step. A non-finite loss or gradient skips the update (parameters and optimizer
  moments stay as they were, step counts advance: `_skip_unless`) and reports `nonfinite` = 1;
  `fault_steps` injects NaN gradients at those steps (fault-injection tests). A batch key 'stop'
  ([B] votes, resilience.Preemption) comes back as the metric 'stop', the max over all rows."""
  batch = dict(batch)
  votes = batch.pop('stop', None)  # resilience.Preemption: every process's stop vote, one per row
  rng = jax.random.fold_in(state.rng, state.step)
  grads, sums = grads_and_sums(state.params, batch, rng, model=model, diff_cfg=diff_cfg, vocab=vocab,
                               sharder=sharder, microbatches=microbatches)
  if fault_steps:
    poisoned = jnp.isin(state.step, jnp.asarray(fault_steps, jnp.int32))
    grads = jax.tree.map(lambda g: jnp.where(poisoned, jnp.nan, g), grads)
  grad_norm = optax.tree_utils.tree_norm(grads)
  finite = jnp.isfinite(grad_norm) & jnp.isfinite(sums['elbo_sum'])
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  params, opt_state = jax.tree.map(functools.partial(_skip_unless, finite), (params, opt_state),
                                   (state.params, state.opt_state))
  metrics = jax.tree.map(lambda x: jnp.where(finite, x, 0.0), dict(sums, grad_norm=grad_norm))
  metrics['nonfinite'] = 1.0 - finite.astype(jnp.float32)
  metrics['hparams'] = optim.live_hyperparams(opt_state)  # lr, b1, b2, eps, ... this update used
  if votes is not None:
    metrics['stop'] = jnp.max(votes).astype(jnp.float32)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_sums(params, batch, rng, *, model, diff_cfg, vocab, sharder, mode='joint', focus_ids=()):
  """ELBO sums of one batch at a fixed corruption key (for validation), every row in one corruption
  `mode` (corruption.DiffusionConfig.for_eval): 'joint' is the ELBO of the whole row, 'conditional'
  a bound on -log p(target | condition). Training's mixture of modes is not a validation number.
  focus_ids: joint-vocabulary text ids whose positions are also summed alone ('loss/focus'; e.g. the
  digit words of the demo's captions, train.eval_focus_words)."""
  batch, c = _corrupt_batch(rng, batch, diff_cfg.for_eval(mode), vocab.mask_id)
  focus_BL = None
  if focus_ids:
    focus_BL = jnp.isin(batch['tokens'], jnp.asarray(focus_ids, jnp.int32)) & (batch['modality'] == vocab_lib.TEXT)
  return _sums(params, model, batch, c, loss_lib.allowed_table(vocab, sharder), sharder, focus_BL)


def jit_steps(model, tx, diff_cfg, vocab_spec, sharder: sharding_lib.Sharder, state_sh, microbatches: int,
              fault_steps=(), focus_ids=()):
  """Jitted (train_step, eval_sums) with explicit shardings; the train step donates the state.
  The eval function takes `mode=` (corruption.EVAL_MODES), one compiled program per mode."""
  common = dict(model=model, diff_cfg=diff_cfg, vocab=vocab_spec, sharder=sharder)
  batch_sh = sharder.batch(1)  # A prefix: rows over the batch axes for every key ([B, L] rows, [B] votes).
  step = jax.jit(functools.partial(train_step, tx=tx, microbatches=microbatches, fault_steps=tuple(fault_steps),
                                   **common),
                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, sharder.replicated), donate_argnums=0)
  return step, jit_eval(model, diff_cfg, vocab_spec, sharder, state_sh.params, focus_ids)


def jit_eval(model, diff_cfg, vocab_spec, sharder: sharding_lib.Sharder, param_sh, focus_ids=()):
  """evaluate(params, batch, rng, mode='joint') -> eval_sums; one compiled program per mode
  (corruption.EVAL_MODES), each compiled on first use."""
  common = dict(model=model, diff_cfg=diff_cfg, vocab=vocab_spec, sharder=sharder)
  rep = sharder.replicated
  evals = {mode: jax.jit(functools.partial(eval_sums, mode=mode, focus_ids=tuple(focus_ids), **common),
                         in_shardings=(param_sh, sharder.batch(1), rep), out_shardings=rep)
           for mode in corruption.EVAL_MODES}

  def evaluate(params, batch, rng, mode='joint'):
    return evals[mode](params, batch, rng)
  return evaluate
