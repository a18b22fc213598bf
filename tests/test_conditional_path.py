"""The conditional path end to end: a tiny model trained on a synthetic image-to-text task must
read its condition.

Each "image" is 6 codes; the first code is the label (0..9), the rest are noise. The caption is one
text token naming the label. Rows are the pipeline's own I2T rows (`PairToRow`), training uses the
real train step in the conditional corruption mode, and the held-out check samples the evaluator's
own I2T canvas (`tasks.pair_canvas`). A condition that training or sampling fails to show the model
(roles, corruption modes, attention, the canvas) leaves it at chance (0.1); read correctly, the label
is a copy from one position and is learned in a few hundred steps.
"""

import functools

import jax
import numpy as np

from tmdm import vocab as vocab_lib
from tmdm.data import pipeline
from tmdm.diffusion import sampling
from tmdm.generation import tasks as tasks_lib
from helpers import tiny_config, trainer

VOCAB = vocab_lib.VocabSpec(37, 11, 13, multiple=8)
STEPS, ROWS = 300, 32


def _items(rng, n):
  codes = rng.integers(0, VOCAB.image_size, (n, 6))
  labels = rng.integers(0, 10, n)
  codes[:, 0] = labels
  return codes, labels


def _rows(rng, n, seq_len):
  to_row = pipeline.PairToRow(VOCAB, 'image', seq_len, p_text_first=0.0)
  codes, labels = _items(rng, n)
  rows = [to_row({'text': np.array([label + 3]), 'image': c}, rng) for c, label in zip(codes, labels)]
  return {k: np.stack([r[k] for r in rows]) for k in pipeline.ROW_KEYS}


@functools.lru_cache(maxsize=None)
def _trained():
  cfg = tiny_config()
  cfg.optim.update(lr=1e-2, warmup_frac=0.05)
  cfg.diffusion.update(p_joint=0.0, p_conditional=1.0, p_drop_condition=0.0)
  t = trainer(cfg, (1, 8, 1), STEPS, batch_size=ROWS, seq_len=cfg.data.seq_len)
  assert t.vocab == VOCAB  # the rows below are built with VOCAB
  sharder, model, diff, state, step_fn = t.sharder, t.model, t.diff, t.state, t.step
  rng = np.random.default_rng(0)
  for _ in range(STEPS):
    batch = _rows(rng, ROWS, cfg.data.seq_len)
    state, metrics = step_fn(state, {k: jax.device_put(v, sharder.batch()) for k, v in batch.items()})
    # One step in flight, as in the training loop: hundreds of queued steps on the 8-device CPU
    # backend aborted the process twice in four runs (no message from XLA).
    jax.block_until_ready(metrics['grad_norm'])
  sampler = sampling.jit_sampler(model=model, vocab=VOCAB, diff_cfg=diff, sharder=sharder,
                                 spec=sampling.SamplerSpec(sampler='confidence'))
  return state.params, sampler, sharder, cfg.data.seq_len


def _caption_accuracy(hide_condition: bool) -> float:
  params, sampler, sharder, seq_len = _trained()
  codes, labels = _items(np.random.default_rng(1), 64)
  canvas = tasks_lib.pair_canvas(VOCAB, tasks_lib.TASKS['i2t'], seq_len, codes=codes, caption_lens=[1] * 64)
  if hide_condition:  # What a broken condition path would show the model.
    canvas['tokens'] = np.where(canvas['cond'] == 1, VOCAB.mask_id, canvas['tokens'])
  batch = {k: jax.device_put(v, sharder.batch()) for k, v in canvas.items()}
  out, _ = sampler(params, batch, jax.random.PRNGKey(0), sampling.Knobs(steps=1, temperature=0.0).as_arrays())
  ids = tasks_lib.text_ids(np.asarray(jax.device_get(out)), canvas, VOCAB, only_generated=True)
  return float(np.mean([len(i) == 1 and i[0] == label + 3 for i, label in zip(ids, labels)]))


def test_a_tiny_i2t_model_reads_its_condition():
  assert _caption_accuracy(hide_condition=False) >= 0.9
  assert _caption_accuracy(hide_condition=True) <= 0.35  # The accuracy comes from the condition.
