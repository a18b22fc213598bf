"""Cross-section checks of a config: every problem a one-line ConfigError before anything compiles.

The choice tables belong to the code that implements them (model.config, model.transformer,
diffusion.schedules, diffusion.corruption, optim); these checks ask them. Also the rules for what a
resume may change (EXECUTION_ONLY, STATE_SECTIONS, changed_keys).
"""

import json
import math

import numpy as np

from tmdm import optim, vocab as vocab_lib
from tmdm.data import shards as shards_lib
from tmdm.diffusion import corruption, schedules
from tmdm.errors import ConfigError
from tmdm.model import config as model_config, transformer
from tmdm.parallel import mesh as mesh_lib

# Keys that change how a step is computed, never what the train state holds: a resume may change
# them. model.scan_layers is not one: nn.scan stacks the blocks' parameters under `blocks` where the
# unrolled model has block_0, block_1, ...; nor is model.compute_dtype (it changes the function
# trained). Sections outside STATE_SECTIONS (train.microbatches, mesh.*, data.*, ...) are not compared.
EXECUTION_ONLY = frozenset({'model.remat', 'model.loss_chunk', 'model.attention_impl', 'model.splash_block_q',
                            'model.splash_block_kv', 'model.splash_block_q_bwd', 'model.splash_block_kv_bwd',
                            'model.splash_fused_bwd', 'model.flash_block_q', 'model.flash_block_k',
                            'model.flash_block_bwd'})
STATE_SECTIONS = ('model', 'vocab', 'optim')  # The sections that shape the train state.


def changed_keys(saved: dict, cfg, sections) -> list:
  """(key, saved value, config's value) of each key of `sections` whose value in `saved` (a config
  dict written to JSON, e.g. a checkpoint's) differs from cfg's; execution-only keys left out."""
  out = []
  for section in sections:
    now = cfg[section].to_dict()
    for key, value in saved.get(section, {}).items():
      name = f'{section}.{key}'
      if name not in EXECUTION_ONLY and json.loads(json.dumps(now.get(key))) != value:  # tuples saved as lists
        out.append((name, value, now.get(key)))
  return out




def _need(cond, msg):
  if not cond:
    raise ConfigError(msg)


def validate(cfg, num_devices=None, process_count=1):
  """Raises ConfigError on the first problem found. num_devices=None skips device-dependent checks."""
  m, d, o, t = cfg.model, cfg.diffusion, cfg.optim, cfg.train
  _need(m.parameterization in model_config.PARAMETERIZATIONS,
        f'model.parameterization must be one of {model_config.PARAMETERIZATIONS}, got {m.parameterization!r}')
  _need(m.attention_impl in model_config.ATTENTION_IMPLS,
        f'model.attention_impl must be one of {model_config.ATTENTION_IMPLS}, got {m.attention_impl!r}')
  _need(m.remat in transformer.REMAT_CHOICES, f'model.remat must be one of {transformer.REMAT_CHOICES}, got {m.remat!r}')
  for k in ('splash_block_q', 'splash_block_kv', 'splash_block_q_bwd', 'splash_block_kv_bwd'):
    _need(m[k] > 0 and m[k] % 128 == 0, f'model.{k} must be a positive multiple of 128 (TPU lanes), got {m[k]}')
  for k in ('flash_block_q', 'flash_block_k', 'flash_block_bwd'):
    _need(m[k] >= 16 and m[k] & (m[k] - 1) == 0, f'model.{k} must be a power of 2 of at least 16 (Triton tiles), '
                                                 f'got {m[k]}')
  for k in ('d_model', 'n_layers', 'n_heads', 'd_head', 'd_ff', 'base_width', 'base_depth'):
    _need(m[k] > 0, f'model.{k} must be positive, got {m[k]}')
  _need(m.d_head % 2 == 0, f'model.d_head must be even for rotary embeddings, got {m.d_head}')
  _need(m.compute_dtype in model_config.COMPUTE_DTYPES,
        f'model.compute_dtype must be one of {model_config.COMPUTE_DTYPES}, got {m.compute_dtype!r}')
  _need(m.loss_chunk >= 0, f'model.loss_chunk must be >= 0 (0: whole rows), got {m.loss_chunk}')
  for mod in vocab_lib.MODALITIES:
    name = d[f'schedule_{mod}']
    _need(name in schedules.SCHEDULES,
          f'diffusion.schedule_{mod} must be one of {tuple(schedules.SCHEDULES)}, got {name!r}')
  _need(0.0 <= d.t_min < 1.0, f'diffusion.t_min must be in [0, 1), got {d.t_min}')
  _need(d.t_sampling in corruption.T_SAMPLING, f'diffusion.t_sampling must be one of {corruption.T_SAMPLING}')
  _need(d.poly_power > 0, 'diffusion.poly_power must be positive')
  _need(0 < d.loglinear_eps < 1, 'diffusion.loglinear_eps must be in (0, 1)')
  _need(0 < d.pair_alpha_min < 1, f'diffusion.pair_alpha_min must be in (0, 1), got {d.pair_alpha_min}')
  probs = (d.p_joint, d.p_conditional, d.p_drop_condition)
  _need(min(probs) >= 0 and abs(sum(probs) - 1) < 1e-6,
        f'diffusion.p_joint + p_conditional + p_drop_condition must be 1, got {sum(probs):g}')
  for k in ('text_size', 'image_size', 'audio_size', 'multiple'):
    _need(cfg.vocab[k] > 0, f'vocab.{k} must be positive')
  _need(cfg.data.seq_len >= 4, f'data.seq_len must be at least 4, got {cfg.data.seq_len}')
  _need(0 <= cfg.data.val_fraction < 1, 'data.val_fraction must be in [0, 1)')
  _need(cfg.image.digit_captions in ('varied', 'word'),
        f"image.digit_captions must be 'varied' or 'word', got {cfg.image.digit_captions!r}")
  _need(cfg.image.fit in ('pad', 'crop', 'stretch'),
        f"image.fit must be 'pad', 'crop' or 'stretch', got {cfg.image.fit!r}")
  _need(cfg.data.num_workers >= 0 and cfg.data.prefetch >= 0, 'data.num_workers and data.prefetch must be >= 0')
  _need(o.lr > 0, f'optim.lr must be positive, got {o.lr}')
  _need(0 <= o.b1 < 1 and 0 < o.b2 < 1, f'optim.b1 and optim.b2 must be in [0, 1), got {o.b1}, {o.b2}')
  _need(o.eps > 0 and o.weight_decay >= 0 and o.clip_norm >= 0, 'optim.eps > 0, weight_decay >= 0, clip_norm >= 0')
  _need(0 <= o.warmup_frac <= 1, f'optim.warmup_frac must be in [0, 1], got {o.warmup_frac}')
  _need(o.decay in optim.DECAY_SHAPES, f'optim.decay must be one of {tuple(optim.DECAY_SHAPES)}, got {o.decay!r}')
  _need(0 <= o.min_lr_ratio <= 1, 'optim.min_lr_ratio must be in [0, 1]')
  _need(t.num_steps > 0, f'train.num_steps must be positive, got {t.num_steps}')
  _need(t.log_every_steps > 0, 'train.log_every_steps must be positive')
  _need(t.eval_every_steps >= 0 and t.eval_batches >= 0, 'train.eval_every_steps and eval_batches must be >= 0')
  _need(cfg.checkpoint.every_steps > 0 and cfg.checkpoint.keep > 0,
        'checkpoint.every_steps and checkpoint.keep must be positive')
  _need(0 < cfg.sample.top_p <= 1 and cfg.sample.temperature > 0 and cfg.sample.steps > 0,
        'sample.top_p in (0, 1], sample.temperature > 0, sample.steps > 0')
  for name in ('', '.t2i', '.t2s', '.i2t', '.s2t'):
    sec = cfg.sample if not name else cfg.sample[name[1:]]
    _need(sec.entropy_budget >= 0 and sec.refresh >= 0,
          f'sample{name}.entropy_budget and sample{name}.refresh must be >= 0 (got {sec.entropy_budget}, {sec.refresh})')
  _need(t.batch_size > 0 and t.microbatches > 0, 'train.batch_size and train.microbatches must be positive')
  if d.complementary:
    _need(t.batch_size % 2 == 0,
          f'train.batch_size {t.batch_size} must be even with diffusion.complementary (rows come in pairs)')
  _need(t.batch_size % t.microbatches == 0,
        f'train.batch_size {t.batch_size} is not divisible by train.microbatches {t.microbatches}')
  _need(cfg.checkpoint.on_error in ('stop', 'warn'), "checkpoint.on_error must be 'stop' or 'warn'")
  _need(not cfg.checkpoint.local_dir or (cfg.checkpoint.local_every_steps > 0 and cfg.checkpoint.local_keep > 0
                                         and '://' not in cfg.checkpoint.local_dir),
        'checkpoint.local_dir needs checkpoint.local_every_steps > 0 and checkpoint.local_keep > 0, and must be '
        'a local path on each host (not a URL)')
  _need(t.max_nonfinite_streak > 0 and t.rollbacks >= 0, 'train.max_nonfinite_streak > 0, train.rollbacks >= 0')
  _need(cfg.data.num_shards >= 0 and 0 <= cfg.data.max_skip_fraction <= 1,
        'data.num_shards >= 0 and data.max_skip_fraction in [0, 1]')
  _need(0 <= cfg.data.max_bad_fraction <= 1, f'data.max_bad_fraction must be in [0, 1], got {cfg.data.max_bad_fraction}')
  _validate_batch_scaling(cfg)
  for mod in ('image', 'audio'):  # The FSQ codebook is the modality's whole id range in the vocabulary.
    levels, size = tuple(cfg[mod].levels), cfg.vocab[f'{mod}_size']
    _need(all(isinstance(x, int) and x >= 2 for x in levels) and math.prod(levels) == size,
          f'{mod}.levels {levels} give {math.prod(levels)} codes but vocab.{mod}_size is {size}; they must be equal')
  if num_devices is None:
    return
  mesh = mesh_lib.resolve_mesh(cfg.mesh, num_devices)
  micro = t.batch_size // t.microbatches
  _need(micro % mesh.batch_shards == 0,
        f'batch of {micro} rows per microbatch (train.batch_size {t.batch_size} / microbatches {t.microbatches}) '
        f'is not divisible by the {mesh.batch_shards} batch shards (mesh.data {mesh.data} x mesh.fsdp {mesh.fsdp})')
  rows = shards_lib.rows_per_step(cfg)
  _need(rows % mesh.batch_shards == 0 and rows % process_count == 0,
        f'{rows} input rows per step do not divide over {mesh.batch_shards} batch shards and {process_count} processes')
  shards = shards_lib.num_data_shards(cfg, process_count)
  _need(shards % process_count == 0 and rows % shards == 0,
        f'data.num_shards {shards} must be a multiple of the {process_count} processes and divide the {rows} '
        'input rows per step')
  _need(m.d_model % mesh.fsdp == 0, f'model.d_model {m.d_model} is not divisible by mesh.fsdp {mesh.fsdp}')
  for k in ('n_heads', 'd_ff'):
    _need(m[k] % mesh.tensor == 0, f'model.{k} {m[k]} is not divisible by mesh.tensor {mesh.tensor}')
  _need(cfg.vocab.multiple % mesh.tensor == 0,
        f'vocab.multiple {cfg.vocab.multiple} is not divisible by mesh.tensor {mesh.tensor} (vocab-parallel loss)')


def _validate_batch_scaling(cfg):
  """The SDE batch scaler's keys, then its validity limit: one-line errors before any compile."""
  o = cfg.optim
  _need(o.base_batch >= 0 and o.base_tokens >= 0 and o.logical_batch >= 0,
        'optim.base_batch, base_tokens and logical_batch must be >= 0 (0: from this run)')
  _need(o.weight_decay_rule in optim.WEIGHT_DECAY_RULES,
        f'optim.weight_decay_rule must be one of {tuple(optim.WEIGHT_DECAY_RULES)}, got {o.weight_decay_rule!r}')
  _need(o.on_exceeding_crit in optim.ON_EXCEEDING_CRIT,
        f'optim.on_exceeding_crit must be one of {optim.ON_EXCEEDING_CRIT}, got {o.on_exceeding_crit!r}')
  _need(o.s_crit >= 0, f'optim.s_crit must be >= 0, got {o.s_crit}')
  _need(0 <= o.ema < 1, f'optim.ema must be in [0, 1), got {o.ema}')
  p = optim.plan(o, num_steps=cfg.train.num_steps, batch_size=cfg.train.batch_size, seq_len=cfg.data.seq_len)
  for k in ('b1', 'b2', 'ema'):  # beta**kappa is in (0, 1) in float64, but the optimizer runs in float32.
    if o[k] > 0 and k in p.hyper:
      _need(np.float32(p.hyper[k]) < 1, f'kappa {p.kappa:.3g} makes optim.{k} {o[k]} round to 1 in float32 '
            f'({o[k]}**kappa = {p.hyper[k]!r}); the physical batch is too small for the logical batch '
            f'{p.logical_batch:.4g}')
  if o.on_exceeding_crit == 'error':
    _need(not p.exceeds_crit, p.crit_message())
