"""Samplers for the masked-diffusion model: pure, jittable, sharded like the model (docs/design.md 2.6).

One engine runs every sampler: a loop of steps that each predict x0 for the masked positions and
reveal some of them; the samplers differ only in WHICH masked positions a step reveals (SAMPLERS):
  ancestral   the reverse process on a time grid 1 = t_0 > ... > t_S = 0: from t to s each masked
              position is revealed with probability (alpha(s) - alpha(t)) / (1 - alpha(t)) of its own
              modality's schedule (exact in distribution)
  confidence  the k most confident masked positions, k from a count schedule (COUNT_SCHEDULES):
              after step i a share gamma(i / S) of the positions is still masked
  threshold   every masked position whose drawn token has probability >= tau, at least one per row
              (the number of steps adapts to the model's certainty; S caps it)
The last step reveals whatever is left, so no [MASK] survives. Given (clean) tokens are never
touched, and logits are restricted to each position's modality before any draw (docs/design.md 2.2).

Knobs of every sampler:
  temperature, top-p   the draw is argmax(logits / T + Gumbel) in float32 (docs/design.md 2.6: low-precision
                       Gumbel noise biases samples); T = 0 is greedy
  blocks               semi-autoregressive: the row is cut into blocks of `block_len` positions filled
                       left to right, each with ceil(steps / blocks) steps (long text)
  guidance             classifier-free guidance on logits, (1 + w) cond - w uncond, where uncond sees
                       the same canvas with the whole condition replaced by [MASK] (training's drop
                       mode); w may vary with t (GUIDANCE_SCHEDULES, each averaging to w over t)
  reuse                when a step reveals nothing the canvas is unchanged, so the previous prediction
                       (drawn tokens and confidences) is reused and the forward pass skipped. For the
                       ancestral sampler this is exact in distribution: the reveal coin is independent
                       of the draw. Off for time-conditioned models, whose prediction moves with t.

Static choices (a recompile) live in `SamplerSpec`; `Knobs` (steps, temperature, guidance, threshold)
are traced, so a sweep over them reuses one compiled sampler.

A canvas is a dict of [B, L] int32 arrays: tokens ([MASK] where to generate), segment_ids, positions,
modality, cond (1 on the condition's positions, which the unconditional branch masks).

Legend: B rows, L positions, V vocabulary (sharded over 'tensor'), M modalities.
"""

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tmdm import vocab as vocab_lib
from tmdm.data import pipeline
from tmdm.diffusion import corruption, loss as loss_lib
from tmdm.model import transformer

CANVAS_KEYS = tuple(k for k in pipeline.ROW_KEYS if k != 'role') + ('cond',)  # Rows without roles, plus cond.

# gamma(r): share of a block's positions still masked after a fraction r of its steps; gamma(0) = 1,
# gamma(1) = 0. 'noise' follows each row's own training schedule (the ancestral sampler's mean path).
COUNT_SCHEDULES = {
    'linear': lambda r, sched: 1.0 - r,
    'cosine': lambda r, sched: jnp.cos(0.5 * math.pi * r),  # MaskGIT: few tokens first, many last
    'noise': lambda r, sched: sched.mask_prob(1.0 - r),
}

# Shape g(t) of the guidance weight w(t) = w g(t); each averages to 1 over t in [0, 1].
GUIDANCE_SCHEDULES = {
    'constant': lambda t: jnp.ones_like(t),
    'increasing': lambda t: 2.0 * (1.0 - t),  # weak while the canvas is mostly masked, strong at the end
    'decreasing': lambda t: 2.0 * t,
}


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """What changes the compiled program."""
  sampler: str = 'confidence'  # SAMPLERS
  schedule: str = 'cosine'  # COUNT_SCHEDULES (confidence sampler)
  top_p: float = 1.0  # nucleus mass; 1 skips the sort
  block_len: int = 0  # semi-autoregressive block length; 0: one block
  guided: bool = False  # compile the unconditional branch (classifier-free guidance)
  guidance_schedule: str = 'constant'  # GUIDANCE_SCHEDULES
  reuse: bool = True  # skip the forward pass when the previous step revealed nothing

  def __post_init__(self):
    for value, table, what in ((self.sampler, SAMPLERS, 'sampler'), (self.schedule, COUNT_SCHEDULES, 'schedule'),
                               (self.guidance_schedule, GUIDANCE_SCHEDULES, 'guidance_schedule')):
      if value not in table:
        raise ValueError(f'unknown {what} {value!r} (choices: {", ".join(table)})')
    if not 0 < self.top_p <= 1 or self.block_len < 0:
      raise ValueError(f'top_p must be in (0, 1] and block_len >= 0 (got {self.top_p}, {self.block_len})')


class Knobs(NamedTuple):
  """Traced scalars: changing them does not recompile."""
  steps: int = 64  # steps in all (split across blocks)
  temperature: float = 1.0  # 0: greedy
  guidance: float = 0.0  # classifier-free guidance weight w (needs SamplerSpec.guided)
  threshold: float = 0.9  # tau of the threshold sampler

  def as_arrays(self) -> 'Knobs':
    """Fixed dtypes, so one compiled sampler accepts any values (an int temperature would not match)."""
    return Knobs(np.int32(self.steps), np.float32(self.temperature), np.float32(self.guidance),
                 np.float32(self.threshold))


def top_p_filter(logits_BLV, top_p: float):
  """Keeps the smallest set of ids whose probability reaches top_p (nucleus sampling)."""
  if top_p >= 1.0:
    return logits_BLV
  sorted_desc = jnp.sort(logits_BLV, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(sorted_desc, axis=-1)
  cum_before = jnp.cumsum(probs, axis=-1) - probs
  kept = jnp.where(cum_before < top_p, sorted_desc, jnp.inf)
  threshold = jnp.min(kept, axis=-1, keepdims=True)
  return jnp.where(logits_BLV >= threshold, logits_BLV, -jnp.inf)


def guide(cond_BLV, uncond_BLV, w_B):
  """(1 + w) cond - w uncond on unrestricted (finite) logits: w = 0 returns cond exactly."""
  w = w_B[:, None, None]
  return (1.0 + w) * cond_BLV - w * uncond_BLV


def draw(rng, logits_BLV, temperature, top_p: float):
  """(tokens_BL, log-probability of each drawn token under the tempered, filtered distribution)."""
  greedy = temperature <= 0
  logits_BLV = logits_BLV.astype(jnp.float32)
  tempered = jnp.where(greedy, logits_BLV, logits_BLV / jnp.maximum(temperature, 1e-6))
  tempered = top_p_filter(tempered, top_p)
  gumbel = jax.random.gumbel(rng, tempered.shape, jnp.float32)
  tokens_BL = jnp.argmax(tempered + jnp.where(greedy, 0.0, gumbel), axis=-1).astype(jnp.int32)
  logp_BLV = tempered - jax.nn.logsumexp(tempered, axis=-1, keepdims=True)
  return tokens_BL, jnp.take_along_axis(logp_BLV, tokens_BL[..., None], axis=-1)[..., 0]


@dataclasses.dataclass(frozen=True)
class Step:
  """What a reveal rule sees at step i of S of one block."""
  i: jax.Array  # int32 scalar
  steps: jax.Array  # int32 scalar S of this block
  open_BL: jax.Array  # masked positions of this block (the candidates)
  n0_B: jax.Array  # candidates at the block's start
  conf_BL: jax.Array  # log-probability of each drawn token
  t_B: jax.Array  # time now
  s_B: jax.Array  # time after this step
  modality_BL: jax.Array
  row_modality_B: jax.Array
  rng: jax.Array


def _rank(score_BL):
  """0 for each row's highest score, 1 for the next, ... (ties broken by position)."""
  order = jnp.argsort(-score_BL, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1, stable=True)


def _ancestral(st: Step, diff_cfg, knobs):
  del knobs
  alpha = lambda t: corruption.per_position(lambda sch, tt: sch.alpha(tt), diff_cfg, t, st.modality_BL)
  alpha_t, alpha_s = alpha(st.t_B), alpha(st.s_B)
  p_BL = (alpha_s - alpha_t) / jnp.maximum(1.0 - alpha_t, 1e-12)
  return jax.random.uniform(st.rng, st.open_BL.shape) < p_BL


def _confidence(st: Step, diff_cfg, knobs, schedule):
  del knobs
  r = (st.i + 1).astype(jnp.float32) / st.steps
  gammas_M = [COUNT_SCHEDULES[schedule](r, diff_cfg.schedule(m)) for m in range(len(vocab_lib.MODALITIES))]
  gamma_B = jnp.stack(gammas_M)[st.row_modality_B]
  # Tolerance: gamma(1) = cos(pi / 2) is 6e-17, not 0, and must not keep a position masked.
  keep_B = jnp.ceil(st.n0_B * gamma_B - 1e-4)
  k_B = jnp.sum(st.open_BL, axis=-1) - keep_B
  rank_BL = _rank(jnp.where(st.open_BL, st.conf_BL, -jnp.inf))
  return rank_BL < k_B[:, None]


def _threshold(st: Step, diff_cfg, knobs):
  del diff_cfg
  rank_BL = _rank(jnp.where(st.open_BL, st.conf_BL, -jnp.inf))
  return (st.conf_BL >= jnp.log(jnp.maximum(knobs.threshold, 1e-12))) | (rank_BL == 0)


SAMPLERS = {'ancestral': _ancestral, 'confidence': _confidence, 'threshold': _threshold}


def _row_modality(canvas, mask_id):
  """Modality of each row's first masked position (what the row generates; 0 when none)."""
  masked_BL = canvas['tokens'] == mask_id
  first_B = jnp.argmax(masked_BL, axis=-1)
  return jnp.take_along_axis(canvas['modality'], first_B[:, None], axis=-1)[:, 0].clip(0, 2)


def _time_of_share(share_B, row_modality_B, diff_cfg):
  """The time whose masking rate is the row's masked share (for time-conditioned models and w(t))."""
  ts_M = [diff_cfg.schedule(m).alpha_inv(1.0 - share_B) for m in range(len(vocab_lib.MODALITIES))]
  return jnp.take_along_axis(jnp.stack(ts_M, axis=1), row_modality_B[:, None], axis=1)[:, 0]


def sample(params, canvas, rng, knobs: Knobs, *, model, vocab, diff_cfg, sharder, spec: SamplerSpec):
  """Fills every [MASK] of canvas['tokens']; returns (tokens int32 [B, L], forward passes int32)."""
  mask_id = vocab.mask_id
  x0_BL = canvas['tokens']
  B, L = x0_BL.shape
  allowed_MV = loss_lib.allowed_table(vocab, sharder)
  row_modality_B = _row_modality(canvas, mask_id)
  generate_BL = x0_BL == mask_id
  cond_BL = canvas['cond'].astype(bool)
  reuse = spec.reuse and not model.cfg.time_conditioning
  block_len = spec.block_len if 0 < spec.block_len < L else L
  n_blocks = -(-L // block_len)
  block_steps = jnp.maximum(1, -(-jnp.asarray(knobs.steps, jnp.int32) // n_blocks))
  column_BL = jnp.broadcast_to(jnp.arange(L), (B, L))
  passes_per_predict = 2 if spec.guided else 1

  def forward(x_BL, t_B):
    return model.apply({'params': params}, x_BL, canvas['segment_ids'], canvas['positions'], t_B)

  def predict(x_BL, t_B, rng):
    logits_BLV = forward(x_BL, t_B)
    if spec.guided:  # Unconditional branch: the condition masked whole, as in training's drop mode.
      uncond_BLV = forward(jnp.where(cond_BL, mask_id, x_BL), t_B)
      w_B = knobs.guidance * GUIDANCE_SCHEDULES[spec.guidance_schedule](t_B)
      logits_BLV = guide(logits_BLV, uncond_BLV, w_B)
    logits_BLV = transformer.restrict(logits_BLV, canvas['modality'], allowed_MV)
    return draw(rng, logits_BLV, knobs.temperature, spec.top_p)

  rule = SAMPLERS[spec.sampler]
  if spec.sampler == 'confidence':
    rule = lambda st, d, k: _confidence(st, d, k, spec.schedule)

  def block(b, carry):
    x_BL, rng, cache, dirty, passes = carry
    in_block_BL = generate_BL & (column_BL >= b * block_len) & (column_BL < (b + 1) * block_len)
    n0_B = jnp.sum(in_block_BL & (x_BL == mask_id), axis=-1)

    def more(c):
      x_BL, i = c[0], c[5]
      return (i < block_steps) & jnp.any(in_block_BL & (x_BL == mask_id))

    def step(c):
      x_BL, rng, cache, dirty, passes, i = c
      rng, k_draw, k_rule = jax.random.split(rng, 3)
      open_BL = in_block_BL & (x_BL == mask_id)
      if spec.sampler == 'ancestral':  # The time grid of this block.
        t_B = jnp.full((B,), 1.0 - i / block_steps)
        s_B = jnp.full((B,), 1.0 - (i + 1) / block_steps)
      else:
        share_B = jnp.sum(open_BL, axis=-1) / jnp.maximum(n0_B, 1)
        t_B = _time_of_share(share_B, row_modality_B, diff_cfg)
        s_B = t_B
      if reuse:
        cache, fresh = jax.lax.cond(dirty, lambda: (predict(x_BL, t_B, k_draw), 1), lambda: (cache, 0))
      else:
        cache, fresh = predict(x_BL, t_B, k_draw), 1
      proposal_BL, conf_BL = cache
      st = Step(i, block_steps, open_BL, n0_B, conf_BL, t_B, s_B, canvas['modality'], row_modality_B, k_rule)
      last = i == block_steps - 1
      reveal_BL = open_BL & (rule(st, diff_cfg, knobs) | last)
      x_BL = jnp.where(reveal_BL, proposal_BL, x_BL)
      return x_BL, rng, cache, jnp.any(reveal_BL), passes + fresh * passes_per_predict, i + 1

    x_BL, rng, cache, dirty, passes, _ = jax.lax.while_loop(more, step, (x_BL, rng, cache, dirty, passes, 0))
    return x_BL, rng, cache, dirty, passes

  empty_cache = (jnp.zeros((B, L), jnp.int32), jnp.zeros((B, L), jnp.float32))
  init = (x0_BL, rng, empty_cache, jnp.asarray(True), jnp.asarray(0, jnp.int32))
  x_BL, _, _, _, passes = jax.lax.fori_loop(0, n_blocks, block, init)
  return x_BL, passes


def spec_and_knobs(section, guided: bool) -> tuple[SamplerSpec, Knobs]:
  """A config section of sampler keys (base_config `sample` or `sample.<task>`) -> (spec, knobs)."""
  spec = SamplerSpec(sampler=section.sampler, schedule=section.schedule, top_p=section.top_p,
                     block_len=section.block_len, guided=guided and section.guidance != 0,
                     guidance_schedule=section.guidance_schedule, reuse=section.reuse)
  return spec, Knobs(steps=section.steps, temperature=section.temperature, guidance=section.guidance,
                     threshold=section.threshold)


def jit_sampler(*, model, vocab, diff_cfg, sharder, spec: SamplerSpec):
  """jit(sample): canvas and samples sharded over the batch axes, knobs and the pass count replicated."""
  fn = lambda params, canvas, rng, knobs: sample(params, canvas, rng, knobs, model=model, vocab=vocab,
                                                 diff_cfg=diff_cfg, sharder=sharder, spec=spec)
  if sharder.mesh is None:
    return jax.jit(fn)
  rows = sharder.batch()
  return jax.jit(fn, in_shardings=(None, {k: rows for k in CANVAS_KEYS}, sharder.replicated, sharder.replicated),
                 out_shardings=(rows, sharder.replicated))
