"""Optimizer construction: an optax chain from the `optim` config section.

Per parameter group (model.config.GROUPS) the base lr, Adam eps and weight decay are multiplied by
the model's group multipliers (CompleteP); the learning-rate schedule is shared. Warmup is a
fraction of the run (capped), so it does not move when the batch size changes.
"""

import optax

from tmdm.model import transformer


def lr_schedule(o, num_steps: int):
  """Peak-normalized schedule (multiply by the lr): linear warmup, then cosine/linear/constant."""
  warmup = min(int(round(o.warmup_frac * num_steps)), o.max_warmup_steps)
  decay_steps = max(num_steps - warmup, 1)
  if o.decay == 'cosine':
    after = optax.cosine_decay_schedule(1.0, decay_steps, alpha=o.min_lr_ratio)
  elif o.decay == 'linear':
    after = optax.linear_schedule(1.0, o.min_lr_ratio, decay_steps)
  else:
    after = optax.constant_schedule(1.0)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup), after], [warmup])


def _adamw(o, schedule, mult):
  lr, eps, wd = o.lr * mult['lr'], o.eps * mult['eps'], o.weight_decay * mult['wd']
  parts = [optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=eps)]
  if wd > 0:
    parts.append(optax.add_decayed_weights(wd))
  parts.append(optax.scale_by_learning_rate(lambda step: lr * schedule(step)))
  return optax.chain(*parts)


OPTIMIZERS = {'adamw': _adamw}


def build(o, num_steps: int, group_multipliers: dict) -> optax.GradientTransformation:
  """o: the `optim` config section; group_multipliers: ModelConfig.group_multipliers()."""
  if o.name not in OPTIMIZERS:
    raise ValueError(f'optim.name must be one of {tuple(OPTIMIZERS)}, got {o.name!r}')
  schedule = lr_schedule(o, num_steps)
  per_group = {g: OPTIMIZERS[o.name](o, schedule, mult) for g, mult in group_multipliers.items()}
  tx = optax.multi_transform(per_group, transformer.param_groups)
  if o.clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), tx)
  return tx
