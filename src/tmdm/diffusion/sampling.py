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
  entropy     entropy-bounded (after the EB-sampler of Ben-Hamu et al., 2025): order the masked
              positions by the entropy of the model's distribution there, lowest first, and reveal the
              longest prefix whose entropies, all but the prefix's last, sum to at most the budget
              gamma (so at least one); a step reveals as many tokens as the model is jointly sure of
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
  cache                a cache of keys and values (after Fast-dLLM's dual cache, Wu et al., 2025): a
                       full pass at the start of each block keeps every layer's keys and values of the
                       whole canvas; the block's other steps run the transformer on the block's
                       generated positions only (W of them, `window`, static), attending to the cached
                       keys and values of every other position (the condition, decoded blocks and the
                       blocks not yet started) and to their own fresh ones. `refresh` = k > 0 also
                       refreshes every k-th step of a block; k = 1 is exactly the uncached sampler.
                       The unconditional branch of guidance keeps its own cache. Approximate (the cached
                       positions do not see this block's newest tokens until the next refresh), so its
                       cost in quality is measured: `tmdm bench-sample`.

Static choices (a recompile) live in `SamplerSpec`; `Knobs` (steps, temperature, guidance, threshold,
entropy budget, refresh) are traced, so a sweep over them reuses one compiled sampler. The forward-pass
count is per row and counts a cached step as W / L of a pass (the share of positions it runs).

A canvas is a dict of [B, L] int32 arrays: tokens ([MASK] where to generate), segment_ids, positions,
modality, cond (1 on the condition's positions, which the unconditional branch masks).

Legend: B rows, L positions, W positions a cached step runs, V vocabulary (sharded over 'tensor'),
M modalities, N layers.
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
from tmdm.model import layers, transformer

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
  cache: bool = False  # keys and values of unchanged positions kept; steps between refreshes run W positions
  window: int = 0  # W: positions a cached step runs (>= a block's generated positions; `fit_window`)

  def __post_init__(self):
    for value, table, what in ((self.sampler, SAMPLERS, 'sampler'), (self.schedule, COUNT_SCHEDULES, 'schedule'),
                               (self.guidance_schedule, GUIDANCE_SCHEDULES, 'guidance_schedule')):
      if value not in table:
        raise ValueError(f'unknown {what} {value!r} (choices: {", ".join(table)})')
    if not 0 < self.top_p <= 1 or self.block_len < 0:
      raise ValueError(f'top_p must be in (0, 1] and block_len >= 0 (got {self.top_p}, {self.block_len})')
    if self.window < 0:
      raise ValueError(f'window must be >= 0 (got {self.window})')


class Knobs(NamedTuple):
  """Traced scalars: changing them does not recompile."""
  steps: int = 64  # steps in all (split across blocks)
  temperature: float = 1.0  # 0: greedy
  guidance: float = 0.0  # classifier-free guidance weight w (needs SamplerSpec.guided)
  threshold: float = 0.9  # tau of the threshold sampler
  entropy_budget: float = 1.0  # gamma of the entropy sampler, in nats
  refresh: int = 0  # cached sampler: also refresh the cache every this many steps of a block (0: at block starts)

  def as_arrays(self) -> 'Knobs':
    """Fixed dtypes, so one compiled sampler accepts any values (an int temperature would not match)."""
    return Knobs(np.int32(self.steps), np.float32(self.temperature), np.float32(self.guidance),
                 np.float32(self.threshold), np.float32(self.entropy_budget), np.int32(self.refresh))


def block_bounds(length: int, block_len: int) -> tuple[int, int]:
  """(positions per block, blocks) of a row of `length` (block_len 0 or >= length: one block)."""
  per = block_len if 0 < block_len < length else length
  return per, -(-length // per)


def fit_window(spec_: SamplerSpec, tokens_NL, mask_id: int, multiple: int = 8) -> SamplerSpec:
  """The spec with `window` set for a canvas (numpy, before jit): the most generated positions any
  row has in any one block, rounded up to `multiple` (fewer recompiles across canvases) and capped
  at the block. Unchanged without a cache."""
  if not spec_.cache:
    return spec_
  tokens_NL = np.asarray(tokens_NL)
  per, n_blocks = block_bounds(tokens_NL.shape[1], spec_.block_len)
  masked = np.pad(tokens_NL == mask_id, ((0, 0), (0, per * n_blocks - tokens_NL.shape[1])))
  most = int(masked.reshape(len(masked), n_blocks, per).sum(-1).max(initial=1))
  return dataclasses.replace(spec_, window=min(per, -(-max(most, 1) // multiple) * multiple))


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
  entropy_BL: jax.Array | None = None  # entropy of the model's distribution per position (nats; 'entropy')


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


def _entropy(st: Step, diff_cfg, knobs):
  del diff_cfg
  score_BL = jnp.where(st.open_BL, -st.entropy_BL, -jnp.inf)
  order_BL = jnp.argsort(-score_BL, axis=-1, stable=True)  # lowest entropy first (ties: position)
  sorted_BL = jnp.take_along_axis(jnp.where(st.open_BL, st.entropy_BL, jnp.inf), order_BL, axis=-1)
  before_BL = jnp.cumsum(sorted_BL, axis=-1) - sorted_BL  # entropy of the positions ranked ahead
  take_sorted_BL = before_BL <= knobs.entropy_budget
  return jnp.take_along_axis(take_sorted_BL, _rank(score_BL), axis=-1)


SAMPLERS = {'ancestral': _ancestral, 'confidence': _confidence, 'threshold': _threshold, 'entropy': _entropy}


def entropy(logits_BLV):
  """Entropy (nats) of softmax(logits) per position; -inf logits (restricted ids) contribute 0."""
  logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.where(jnp.isfinite(logp_BLV), jnp.exp(logp_BLV) * logp_BLV, 0.0), axis=-1)


def _row_modality(canvas, mask_id):
  """Modality of each row's first masked position (what the row generates; 0 when none)."""
  masked_BL = canvas['tokens'] == mask_id
  first_B = jnp.argmax(masked_BL, axis=-1)
  return jnp.take_along_axis(canvas['modality'], first_B[:, None], axis=-1)[:, 0].clip(0, 2)


def _time_of_share(share_B, row_modality_B, diff_cfg):
  """The time whose masking rate is the row's masked share (for time-conditioned models and w(t))."""
  ts_M = [diff_cfg.schedule(m).alpha_inv(1.0 - share_B) for m in range(len(vocab_lib.MODALITIES))]
  return jnp.take_along_axis(jnp.stack(ts_M, axis=1), row_modality_B[:, None], axis=1)[:, 0]


def _gather_rows(x_BL, slots_BW):
  """x at each row's slots (slot L, padding: the last position, whose result is discarded)."""
  return jnp.take_along_axis(x_BL, jnp.minimum(slots_BW, x_BL.shape[1] - 1), axis=1)


def block_slots(in_block_BL, window: int):
  """[B, W] positions of each row's block (in order), padded with L."""
  L = in_block_BL.shape[1]
  order_BL = jnp.argsort(~in_block_BL, axis=-1, stable=True)[:, :window]
  return jnp.where(jnp.take_along_axis(in_block_BL, order_BL, axis=-1), order_BL, L).astype(jnp.int32)


def sample(params, canvas, rng, knobs: Knobs, *, model, vocab, diff_cfg, sharder, spec: SamplerSpec):
  """Fills every [MASK] of canvas['tokens']; returns (tokens int32 [B, L], forward passes per row
  float32: a cached step counts W / L)."""
  mask_id = vocab.mask_id
  x0_BL = canvas['tokens']
  B, L = x0_BL.shape
  allowed_MV = loss_lib.allowed_table(vocab, sharder)
  row_modality_B = _row_modality(canvas, mask_id)
  generate_BL = x0_BL == mask_id
  cond_BL = canvas['cond'].astype(bool)
  reuse = spec.reuse and not model.cfg.time_conditioning
  block_len, n_blocks = block_bounds(L, spec.block_len)
  block_steps = jnp.maximum(1, -(-jnp.asarray(knobs.steps, jnp.int32) // n_blocks))
  column_BL = jnp.broadcast_to(jnp.arange(L), (B, L))
  passes_per_predict = 2 if spec.guided else 1
  W = spec.window
  if spec.cache and not 0 < W <= L:
    raise ValueError(f'a cached sampler needs 0 < window <= {L} (got {W}): set it with fit_window')
  want_entropy = spec.sampler == 'entropy'

  def unconditional(x_BL, cond_BL):  # The condition masked whole, as in training's drop mode.
    return jnp.where(cond_BL, mask_id, x_BL)

  def finish(logits_BLV, uncond_BLV, t_B, modality_BL, rng):
    """Guided, restricted logits -> (drawn tokens, their log-probabilities, entropies)."""
    if spec.guided:
      w_B = knobs.guidance * GUIDANCE_SCHEDULES[spec.guidance_schedule](t_B)
      logits_BLV = guide(logits_BLV, uncond_BLV, w_B)
    logits_BLV = vocab_lib.restrict(logits_BLV, modality_BL, allowed_MV)
    tokens_BL, conf_BL = draw(rng, logits_BLV, knobs.temperature, spec.top_p)
    entropy_BL = entropy(logits_BLV) if want_entropy else jnp.zeros_like(conf_BL)
    return tokens_BL, conf_BL, entropy_BL

  def full(x_BL, t_B, rng):
    """A pass over the whole canvas: (prediction, caches: the (k, v) of each branch, or ())."""
    kw = {'return_kv': True} if spec.cache else {}
    run = lambda x: model.apply({'params': params}, x, canvas['segment_ids'], canvas['positions'], t_B, **kw)
    out, uncond, caches = run(x_BL), None, ()
    if spec.cache:
      out, kv = out
      caches = (kv,)
    if spec.guided:
      uncond = run(unconditional(x_BL, cond_BL))
      if spec.cache:
        uncond, kv_u = uncond
        caches += (kv_u,)
    return finish(out, uncond, t_B, canvas['modality'], rng), caches

  def partial(x_BL, t_B, rng, caches, slots_BW):
    """A cached step: the transformer on the W slots only; the prediction scattered back to [B, L]."""
    seg_BW, pos_BW = _gather_rows(canvas['segment_ids'], slots_BW), _gather_rows(canvas['positions'], slots_BW)
    seg_BW, pos_BW = sharder.constrain(seg_BW, ('batch', None)), sharder.constrain(pos_BW, ('batch', None))

    def run(x, kv):
      cache = transformer.KVCache(*kv, canvas['segment_ids'], slots_BW)
      return model.apply({'params': params}, _gather_rows(x, slots_BW), seg_BW, pos_BW, t_B, cache=cache)

    out = run(x_BL, caches[0])
    uncond = run(unconditional(x_BL, cond_BL), caches[1]) if spec.guided else None
    tokens_BW, conf_BW, entropy_BW = finish(out, uncond, t_B, _gather_rows(canvas['modality'], slots_BW), rng)
    return (layers.put_rows(jnp.zeros((B, L), jnp.int32), slots_BW, tokens_BW),
            layers.put_rows(jnp.full((B, L), -jnp.inf), slots_BW, conf_BW),
            layers.put_rows(jnp.full((B, L), jnp.inf), slots_BW, entropy_BW))

  rule = SAMPLERS[spec.sampler]
  if spec.sampler == 'confidence':
    rule = lambda st, d, k: _confidence(st, d, k, spec.schedule)

  def block(b, carry):
    x_BL, rng, pred, caches, whole, dirty, passes = carry
    in_block_BL = generate_BL & (column_BL >= b * block_len) & (column_BL < (b + 1) * block_len)
    n0_B = jnp.sum(in_block_BL & (x_BL == mask_id), axis=-1)
    slots_BW = block_slots(in_block_BL, W) if spec.cache else None

    def more(c):
      x_BL, i = c[0], c[-1]
      return (i < block_steps) & jnp.any(in_block_BL & (x_BL == mask_id))

    def step(c):
      x_BL, rng, pred, caches, whole, dirty, passes, i = c
      rng, k_draw, k_rule = jax.random.split(rng, 3)
      open_BL = in_block_BL & (x_BL == mask_id)
      if spec.sampler == 'ancestral':  # The time grid of this block.
        t_B = jnp.full((B,), 1.0 - i / block_steps)
        s_B = jnp.full((B,), 1.0 - (i + 1) / block_steps)
      else:
        share_B = jnp.sum(open_BL, axis=-1) / jnp.maximum(n0_B, 1)
        t_B = _time_of_share(share_B, row_modality_B, diff_cfg)
        s_B = t_B
      keep = lambda: (pred, caches, whole, 0.0)
      fresh = lambda: full(x_BL, t_B, k_draw) + (jnp.asarray(True), float(passes_per_predict))
      if spec.cache:
        # 0: reuse (nothing changed, and the prediction covers this block: a cached one covers only the
        # block it was made in); 1: a full pass, at a block's first step and at each refresh; 2: cached.
        cached = lambda: (partial(x_BL, t_B, k_draw, caches, slots_BW), caches, jnp.asarray(False),
                          passes_per_predict * W / L)
        can_keep = reuse & ~dirty & (whole | (i > 0))
        refresh_now = (i == 0) | ((knobs.refresh > 0) & (i % jnp.maximum(knobs.refresh, 1) == 0))
        branch = jnp.where(can_keep, 0, jnp.where(refresh_now, 1, 2))
        pred, caches, whole, cost = jax.lax.switch(branch, (keep, fresh, cached))
      elif reuse:
        pred, caches, whole, cost = jax.lax.cond(dirty, fresh, keep)
      else:
        pred, caches, whole, cost = fresh()
      proposal_BL, conf_BL, entropy_BL = pred
      st = Step(i, block_steps, open_BL, n0_B, conf_BL, t_B, s_B, canvas['modality'], row_modality_B, k_rule,
                entropy_BL)
      last = i == block_steps - 1
      reveal_BL = open_BL & (rule(st, diff_cfg, knobs) | last)
      x_BL = jnp.where(reveal_BL, proposal_BL, x_BL)
      return x_BL, rng, pred, caches, whole, jnp.any(reveal_BL), passes + cost, i + 1

    x_BL, rng, pred, caches, whole, dirty, passes, _ = jax.lax.while_loop(
        more, step, (x_BL, rng, pred, caches, whole, dirty, passes, 0))
    return x_BL, rng, pred, caches, whole, dirty, passes

  empty_pred = (jnp.zeros((B, L), jnp.int32), jnp.zeros((B, L), jnp.float32), jnp.zeros((B, L), jnp.float32))
  empty_caches = ()
  if spec.cache:
    c = model.cfg
    shape = (c.n_layers, B, L, c.n_heads, c.d_head)
    kv_axes = ('layers', 'batch', 'length', 'heads', 'kv')
    zeros = lambda: sharder.constrain(jnp.zeros(shape, c.dtype), kv_axes)
    empty_caches = tuple((zeros(), zeros()) for _ in range(passes_per_predict))
  init = (x0_BL, rng, empty_pred, empty_caches, jnp.asarray(False), jnp.asarray(True), jnp.asarray(0.0, jnp.float32))
  x_BL, _, _, _, _, _, passes = jax.lax.fori_loop(0, n_blocks, block, init)
  return x_BL, passes


def spec_and_knobs(section, guided: bool) -> tuple[SamplerSpec, Knobs]:
  """A config section of sampler keys (base_config `sample` or `sample.<task>`) -> (spec, knobs)."""
  spec = SamplerSpec(sampler=section.sampler, schedule=section.schedule, top_p=section.top_p,
                     block_len=section.block_len, guided=guided and section.guidance != 0,
                     guidance_schedule=section.guidance_schedule, reuse=section.reuse, cache=section.cache)
  return spec, Knobs(steps=section.steps, temperature=section.temperature, guidance=section.guidance,
                     threshold=section.threshold, entropy_budget=section.entropy_budget, refresh=section.refresh)


def jit_sampler(*, model, vocab, diff_cfg, sharder, spec: SamplerSpec):
  """jit(sample): canvas and samples sharded over the batch axes, knobs and the pass count replicated."""
  fn = lambda params, canvas, rng, knobs: sample(params, canvas, rng, knobs, model=model, vocab=vocab,
                                                 diff_cfg=diff_cfg, sharder=sharder, spec=spec)
  if sharder.mesh is None:
    return jax.jit(fn)
  rows = sharder.batch()
  return jax.jit(fn, in_shardings=(None, {k: rows for k in CANVAS_KEYS}, sharder.replicated, sharder.replicated),
                 out_shardings=(rows, sharder.replicated))
