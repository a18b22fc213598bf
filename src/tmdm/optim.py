"""Optimizer construction: the logical/physical batch SDE scaler, CompleteP group multipliers, and
the optax chain built from the `optim` config section (docs/design.md 2.1, 2.4).

Logical vs physical batch. Adam at batch B follows, to first order, one SDE; running it at batch
kappa * B leaves that SDE unchanged under the square-root rule (Malladi et al. 2022, "On the SDEs and
Scaling Rules for Adaptive Gradient Algorithms"):
  lr -> sqrt(kappa) lr,   b1 -> b1**kappa,   b2 -> b2**kappa,   eps -> eps / sqrt(kappa).
The hyperparameters in a config are those of the logical batch, which the notes' rule picks from
the run's token horizon D (total training tokens):
  B_logical(D) = base_batch * (D / base_tokens)**gamma          (gamma ~ 0.44, fitted)
  kappa        = B_physical / B_logical(D)
Ours, from the same argument (BUILD_NOTES "Logical vs physical batch: the square-root SDE rule"): decoupled weight decay that optax
multiplies by the lr -> sqrt(kappa) wd; weight-EMA decay -> ema**kappa; warmup and decay of the lr
schedule are fractions of D, so changing B does not move them in tokens.
The rule holds while B <= B_crit = D / (L * S_crit), i.e. while the run takes at least S_crit steps.

CompleteP. Each parameter group g (model.config.GROUPS) multiplies the already scaled lr, eps and
weight decay by ModelConfig.group_multipliers()[g]: lr_g = lr * sqrt(kappa) * m_lr[g],
eps_g = eps / sqrt(kappa) * m_eps[g], wd_g = wd(kappa) * m_wd[g]. Both factors are multiplicative
and independent, so a config tuned at (base width, base depth, base batch, base horizon) transfers
to a wider, deeper model at another batch and horizon.

Every hyperparameter enters the optimizer through optax.inject_hyperparams as a schedule (a
function of the step), so the values the update uses live in the optimizer state (read by
`live_hyperparams` for the metrics) and are recomputed from the config after a restore.
"""

import dataclasses
import logging
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tmdm import errors
from tmdm.model import config as model_config

log = logging.getLogger('tmdm')

HYPERPARAMS = ('lr', 'b1', 'b2', 'eps', 'weight_decay')

# Weight decay as a function of kappa. optax's add_decayed_weights is followed by the lr, so one
# step shrinks the weights by lr * wd; matching kappa small steps needs lr' wd' = kappa lr wd, and
# with lr' = sqrt(kappa) lr that is wd' = sqrt(kappa) wd.
WEIGHT_DECAY_RULES = {
    'sqrt': lambda wd, kappa: wd * math.sqrt(kappa),  # decay multiplied by the lr (optax AdamW)
    'linear': lambda wd, kappa: wd * kappa,  # decay not multiplied by the lr (shrink wd per step)
    'constant': lambda wd, kappa: wd,  # ignore the batch (decay per token falls as 1/sqrt(kappa))
}
ON_EXCEEDING_CRIT = ('warn', 'error')


def _power(beta: float, kappa: float) -> float:
  """beta**kappa, kept inside (0, 1) for beta in (0, 1): float64 underflows to 0 past kappa ~ 7e3
  (beta = 0.9) and rounds to 1 below kappa ~ 1e-15, where Adam's bias correction divides by 0."""
  if beta == 0.0:
    return 0.0
  return min(max(math.pow(beta, kappa), math.ulp(0.0)), 1.0 - 2.0**-53)


def logical_batch_size(*, tokens, base_batch, base_tokens, gamma=0.44) -> float:
  """B_logical(D) = base_batch * (D / base_tokens)**gamma, in sequences (the notes' rule)."""
  return base_batch * (tokens / base_tokens)**gamma


def scale_hyperparams(base: dict, *, batch, tokens, base_batch, base_tokens, gamma=0.44, logical_batch=None,
                      weight_decay_rule='sqrt') -> dict:
  """The base hyperparameters (those of the logical batch) rescaled to the physical batch.

  base: lr, b1, b2, eps, weight_decay and optionally ema. Batches in sequences, tokens in tokens.
    B_logical = logical_batch if given, else base_batch * (tokens / base_tokens)**gamma
    kappa     = batch / B_logical
    lr * sqrt(kappa), b1**kappa, b2**kappa, eps / sqrt(kappa), WEIGHT_DECAY_RULES[rule](wd, kappa),
    ema**kappa.
  Returns the same keys plus `kappa` and `logical_batch`.
  """
  if weight_decay_rule not in WEIGHT_DECAY_RULES:
    raise ValueError(f'weight_decay_rule must be one of {tuple(WEIGHT_DECAY_RULES)}, got {weight_decay_rule!r}')
  if logical_batch is None:
    if not (base_batch > 0 and base_tokens > 0 and tokens > 0):
      raise ValueError(f'need base_batch, base_tokens, tokens > 0, got {base_batch}, {base_tokens}, {tokens}')
    logical_batch = logical_batch_size(tokens=tokens, base_batch=base_batch, base_tokens=base_tokens, gamma=gamma)
  if not (batch > 0 and logical_batch > 0):
    raise ValueError(f'need batch, logical_batch > 0, got {batch}, {logical_batch}')
  kappa = batch / logical_batch
  root = math.sqrt(kappa)
  out = {
      'lr': base['lr'] * root,
      'b1': _power(base['b1'], kappa),
      'b2': _power(base['b2'], kappa),
      'eps': base['eps'] / root,
      'weight_decay': WEIGHT_DECAY_RULES[weight_decay_rule](base['weight_decay'], kappa),
  }
  if 'ema' in base:
    out['ema'] = _power(base['ema'], kappa)
  out.update(kappa=kappa, logical_batch=float(logical_batch))
  return out


def critical_batch(tokens, seq_len, s_crit) -> float:
  """B_crit = D / (L * S_crit) sequences: above it the run takes fewer than S_crit steps."""
  return tokens / (seq_len * s_crit) if s_crit > 0 else math.inf


@dataclasses.dataclass(frozen=True)
class Plan:
  """One run's resolved optimizer hyperparameters (host floats) and the numbers behind them."""
  batch: int  # physical batch, sequences per optimizer step
  seq_len: int
  num_steps: int
  tokens: int  # token horizon D = num_steps * batch * seq_len
  base_batch: float
  base_tokens: float
  logical_batch: float
  kappa: float  # B / B_logical, whether or not it is applied
  applied: bool  # optim.sde_scaling: False keeps the base values (kappa reported as 1)
  hyper: dict  # what the optimizer uses: lr, b1, b2, eps, weight_decay, kappa (and ema)
  warmup_frac: float  # warmup as a fraction of D, after the cap
  critical_batch: float
  s_crit: int

  @property
  def exceeds_crit(self) -> bool:
    return self.batch > self.critical_batch

  def crit_message(self) -> str:
    return (f'train.batch_size {self.batch} exceeds B_crit = D / (seq_len * optim.s_crit) = {self.tokens} / '
            f'({self.seq_len} * {self.s_crit}) = {self.critical_batch:.4g} sequences ({self.num_steps} optimizer '
            f'steps < {self.s_crit}), where the SDE batch-scaling rule no longer holds; raise train.num_steps, lower '
            'train.batch_size, or set optim.on_exceeding_crit=warn')

  def describe(self) -> str:
    h, state = self.hyper, 'on' if self.applied else 'OFF'
    text = (f'SDE batch scaler {state}: batch {self.batch}, logical batch {self.logical_batch:.4g}, kappa '
            f'{self.kappa:.4g}{"" if self.applied else " (not applied)"} | D {self.tokens:.4g} tokens, B_crit '
            f'{self.critical_batch:.4g} | lr {h["lr"]:.4g} b1 {h["b1"]:.6g} b2 {h["b2"]:.6g} eps {h["eps"]:.4g} '
            f'wd {h["weight_decay"]:.4g}')
    if 'ema' in h:
      text += f' ema {h["ema"]:.6g}'
    return text + f' | warmup {self.warmup_frac:.4g} of D'


def base_hyperparams(o) -> dict:
  base = {k: float(o[k]) for k in HYPERPARAMS}
  if o.ema > 0:
    base['ema'] = float(o.ema)
  return base


def plan(o, *, num_steps: int, batch_size: int, seq_len: int) -> Plan:
  """Resolves the `optim` section for a run; base_batch / base_tokens of 0 mean this run's own."""
  tokens = num_steps * batch_size * seq_len
  base_batch = o.base_batch or batch_size
  base_tokens = o.base_tokens or tokens
  scaled = scale_hyperparams(base_hyperparams(o), batch=batch_size, tokens=tokens, base_batch=base_batch,
                             base_tokens=base_tokens, gamma=o.gamma, logical_batch=o.logical_batch or None,
                             weight_decay_rule=o.weight_decay_rule)
  kappa, logical = scaled.pop('kappa'), scaled.pop('logical_batch')
  hyper = dict(scaled, kappa=kappa) if o.sde_scaling else dict(base_hyperparams(o), kappa=1.0)
  # The warmup cap counts steps of the logical batch, so it too is fixed in tokens.
  warmup = min(o.warmup_frac, o.max_warmup_steps * logical * seq_len / tokens)
  return Plan(batch_size, seq_len, num_steps, tokens, float(base_batch), float(base_tokens), logical, kappa,
              bool(o.sde_scaling), hyper, warmup, critical_batch(tokens, seq_len, o.s_crit), o.s_crit)


def check_critical_batch(p: Plan, on_exceeding: str) -> bool:
  """Raises (on_exceeding='error') or logs a warning when the physical batch exceeds B_crit;
  returns whether it does."""
  if not p.exceeds_crit:
    return False
  if on_exceeding == 'error':
    raise errors.ConfigError(p.crit_message())
  log.warning(p.crit_message())
  return True


def _decay_cosine(u, r):
  return r + (1.0 - r) * 0.5 * (1.0 + jnp.cos(jnp.pi * u))


DECAY_SHAPES = {
    'cosine': _decay_cosine,
    'linear': lambda u, r: 1.0 - (1.0 - r) * u,
    'constant': lambda u, r: jnp.ones_like(u),
}


def lr_schedule(o, num_steps: int, warmup_frac=None):
  """Peak-normalized schedule of the step s through the share of D seen, x = s / num_steps:
    x < w:   x / w                                         (linear warmup)
    x >= w:  u = (x - w) / (1 - w), then cosine r + (1 - r)(1 + cos(pi u)) / 2, linear 1 - (1 - r) u,
             or constant 1;  r = min_lr_ratio.
  w defaults to min(warmup_frac, max_warmup_steps / num_steps) (the cap in physical steps); `plan`
  passes the cap in logical-batch steps instead."""
  w = min(o.warmup_frac, o.max_warmup_steps / num_steps) if warmup_frac is None else warmup_frac
  r, shape = o.min_lr_ratio, DECAY_SHAPES[o.decay]

  def schedule(count):
    x = jnp.asarray(count, jnp.float32) / num_steps
    after = shape(jnp.clip((x - w) / max(1.0 - w, 1e-12), 0.0, 1.0), r)
    return jnp.where(x < w, x / max(w, 1e-12), after) if w > 0 else after
  return schedule


class EmaState(NamedTuple):
  ema_params: Any


EMA_FIELD = EmaState._fields[0]  # Where checkpoints keep the weight EMA (training/checkpoint.restore_params).


def params_ema(decay) -> optax.GradientTransformation:
  """Keeps ema <- decay * ema + (1 - decay) * (params + updates): an EMA of the weights after each
  step. Last in a chain (it sees the final updates); passes the updates through unchanged."""
  def init(params):
    return EmaState(jax.tree.map(jnp.copy, params))

  def update(updates, state, params=None):
    new = jax.tree.map(lambda e, p, u: decay * e + (1.0 - decay) * (p + u), state.ema_params, params, updates)
    return updates, EmaState(new)
  return optax.GradientTransformation(init, update)


def _adamw(lr, b1, b2, eps, weight_decay, decay_on: bool):
  parts = [optax.scale_by_adam(b1=b1, b2=b2, eps=eps)]
  if decay_on:
    parts.append(optax.add_decayed_weights(weight_decay))
  parts.append(optax.scale(-lr))
  return optax.chain(*parts)


OPTIMIZERS = {'adamw': _adamw}


def sde_scaled(p: Plan, schedule, group_multipliers: dict, family: str = 'adamw') -> optax.GradientTransformation:
  """The optimizer at the plan's (scaled) hyperparameters, with CompleteP group multipliers on top.

  Per group g: family(lr_t * m_lr[g], b1, b2, eps * m_eps[g], wd * m_wd[g]) with
  lr_t = p.hyper['lr'] * schedule(step); then the weight EMA (decay p.hyper['ema']) if kept.
  Wrapped in optax.inject_hyperparams: the state holds the live lr, b1, b2, eps, weight_decay, kappa.
  """
  h, make = p.hyper, OPTIMIZERS[family]
  decay_on = {g: h['weight_decay'] > 0 and m['wd'] > 0 for g, m in group_multipliers.items()}

  def factory(lr, b1, b2, eps, weight_decay, kappa, ema=None):
    del kappa  # Carried for the metrics only; already folded into the other values.
    per_group = {g: make(lr * m['lr'], b1, b2, eps * m['eps'], weight_decay * m['wd'], decay_on[g])
                 for g, m in group_multipliers.items()}
    tx = optax.multi_transform(per_group, model_config.param_groups)
    return tx if ema is None else optax.chain(tx, params_ema(ema))

  # Every value is a schedule (a function of the step), not a number: inject_hyperparams would read
  # numbers back from a restored state, silently keeping an old run's kappa.
  constant = lambda v: (lambda count: jnp.full((), v, jnp.float32))
  values = {k: constant(v) for k, v in h.items() if k != 'lr'}
  values['lr'] = lambda count: h['lr'] * schedule(count)
  return optax.inject_hyperparams(factory, hyperparam_dtype=jnp.float32)(**values)


def build(o, num_steps: int, group_multipliers: dict, *, batch_size=None, seq_len=None,
          run_plan: Plan | None = None) -> optax.GradientTransformation:
  """o: the `optim` config section; group_multipliers: ModelConfig.group_multipliers().
  run_plan: the run's Plan (training.setup computes it once); without it, batch_size and seq_len are
  needed once the config pins a base (base_batch or logical_batch)."""
  if o.name not in OPTIMIZERS:
    raise ValueError(f'optim.name must be one of {tuple(OPTIMIZERS)}, got {o.name!r}')
  if run_plan is not None:
    p = run_plan
  elif batch_size is None or seq_len is None:
    if o.sde_scaling and (o.base_batch or o.base_tokens or o.logical_batch):
      raise ValueError('optim.build needs batch_size and seq_len when optim.base_batch, base_tokens or '
                       'logical_batch is set')
    p = plan(o, num_steps=num_steps, batch_size=1, seq_len=1)  # Its own base: kappa = 1.
    p = dataclasses.replace(p, warmup_frac=min(o.warmup_frac, o.max_warmup_steps / num_steps))
  else:
    p = plan(o, num_steps=num_steps, batch_size=batch_size, seq_len=seq_len)
  tx = sde_scaled(p, lr_schedule(o, num_steps, p.warmup_frac), group_multipliers, o.name)
  if o.clip_norm > 0:  # No SDE counterpart (docs/design.md 2.4): applied to the raw gradient, unscaled.
    tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), tx)
  return tx


def live_hyperparams(opt_state) -> dict:
  """The values the last update used, from the optimizer state: lr (of the base groups, embed and
  unembed; CompleteP multiplies it per group), b1, b2, eps, weight_decay, kappa (and ema)."""
  found = optax.tree_utils.tree_get(opt_state, 'hyperparams')
  if found is None:
    raise ValueError('the optimizer state holds no injected hyperparameters')
  return dict(found)


def ema_params(opt_state):
  """The weight EMA kept in the optimizer state (None without optim.ema)."""
  return optax.tree_utils.tree_get(opt_state, EMA_FIELD)
