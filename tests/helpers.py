"""Shared test fixtures' building blocks: tiny configs, random batches, a prepared text dataset."""

import os
import types

import numpy as np

from tmdm import optim, vocab as vocab_lib
from tmdm.config import base as base_config
from tmdm.diffusion import corruption
from tmdm.model import config as model_config, transformer
from tmdm.parallel import sharding
from tmdm.training import state as train_state, step as train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**model_overrides):
  """Prime-sized where the meshes allow: vocab 37/11/13 ids, seq 13, d_head 10, 3 layers."""
  c = base_config.get_config()
  c.model.update(model_config.PRESETS['test'])
  c.model.update(compute_dtype='float32', attention_impl='xla', **model_overrides)
  c.vocab.update(text_size=37, image_size=11, audio_size=13, multiple=8)
  c.data.seq_len = 13
  c.train.batch_size = 8
  return c


def trainer(cfg, mesh=(1, 1, 1), num_steps=10, microbatches=1, **optim_kw):
  """The real training pieces for `cfg` on a CPU mesh: vocab, sharder, mcfg, model, tx, diff (the
  DiffusionConfig), state (initialized, seed 0) and step (train_step.jit_steps' train step)."""
  vocab = vocab_lib.VocabSpec.from_config(cfg.vocab)
  sharder = sharding.Sharder(sharding.make_mesh(mesh))
  mcfg = model_config.ModelConfig.from_config(cfg.model, vocab.size)
  model = transformer.Transformer(mcfg, sharder)
  tx = optim.build(cfg.optim, num_steps, mcfg.group_multipliers(), **optim_kw)
  diff = corruption.DiffusionConfig.from_config(cfg.diffusion)
  state = train_state.create(model, tx, sharder, cfg.data.seq_len, seed=0)
  state_sh = train_state.state_shardings(model, tx, sharder, cfg.data.seq_len)
  step, _ = train_step.jit_steps(model, tx, diff, vocab, sharder, state_sh, microbatches)
  return types.SimpleNamespace(vocab=vocab, sharder=sharder, mcfg=mcfg, model=model, tx=tx, diff=diff, state=state,
                               step=step)


def random_batch(vocab: vocab_lib.VocabSpec, rows, length, seed=0, modalities=(vocab_lib.TEXT,)):
  """Random packed rows: 1-3 documents per row, boundaries FIXED, each document one modality."""
  rng = np.random.default_rng(seed)
  out = {k: np.zeros((rows, length), np.int32) for k in ('tokens', 'segment_ids', 'positions', 'role', 'modality')}
  for r in range(rows):
    cuts = np.sort(rng.choice(np.arange(3, length - 2), size=rng.integers(0, 3), replace=False))
    bounds = [0, *cuts, length]
    for seg, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
      m = modalities[rng.integers(len(modalities))]
      a, b = vocab.range(m)
      out['tokens'][r, lo:hi] = rng.integers(a, b, hi - lo)
      out['segment_ids'][r, lo:hi] = seg
      out['positions'][r, lo:hi] = np.arange(hi - lo)
      out['role'][r, lo:hi] = vocab_lib.TARGET
      out['modality'][r, lo:hi] = m
      out['tokens'][r, lo] = vocab.id('<txt>')
      out['role'][r, lo] = vocab_lib.FIXED
  return out


def run_and_resumed_step(fn):
  """Runs fn(); returns the step the trainer said it resumed from ("resumed from step N" in the log),
  0 when it started from scratch."""
  import logging  # pylint: disable=import-outside-toplevel
  import re  # pylint: disable=import-outside-toplevel
  lines = []

  class Collect(logging.Handler):
    def emit(self, record):
      lines.append(record.getMessage())
  handler, logger = Collect(level=logging.INFO), logging.getLogger('tmdm')
  old_level = logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  try:
    fn()
  finally:
    logger.removeHandler(handler)
    logger.setLevel(old_level)
  found = [int(m.group(1)) for line in lines for m in [re.match(r'resumed from step (\d+) ', line)] if m]
  return found[-1] if found else 0
