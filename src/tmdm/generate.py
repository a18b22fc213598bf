"""Generation from a training workdir: restore the latest checkpoint, sample, decode, write files."""

import json
import logging
import os

import jax
import ml_collections
import numpy as np

from tmdm import checkpoint as checkpoint_lib
from tmdm import config_lib, train, train_state
from tmdm.diffusion import sampling
from tmdm.modalities import spec, text

log = logging.getLogger('tmdm')


def load_workdir_config(workdir, overrides=()):
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise config_lib.ConfigError(f'{workdir} is not a training workdir ({path} is missing)')
  with open(path) as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  return config_lib.apply_overrides(cfg, overrides)


def restore_params(s: train.Setup, workdir):
  ckpt = checkpoint_lib.Checkpointer(os.path.abspath(os.path.join(workdir, 'checkpoints')), keep=1,
                                     async_save=False)
  step = ckpt.latest_step()
  if step is None:
    raise config_lib.ConfigError(f'no checkpoint in {workdir}/checkpoints')
  target = train_state.abstract_state(s.model, s.tx, s.sharder, s.seq_len)
  state, _, _ = ckpt.restore(step, target)
  ckpt.close()
  return state.params, step


def text_canvas(vocab: spec.VocabSpec, tokenizer, n, length, prompt=''):
  """Rows `<txt> prompt [MASK]... </txt>`: one document per row."""
  prompt_ids = tokenizer.encode([prompt])[0] + vocab.text_start if prompt else np.zeros((0,), np.int32)
  body = length - 2
  if len(prompt_ids) >= body:
    raise ValueError(f'prompt of {len(prompt_ids)} tokens does not fit a canvas of {length}')
  row = np.full((length,), vocab.mask_id, np.int32)
  row[0], row[-1] = vocab.id('<txt>'), vocab.id('</txt>')
  row[1:1 + len(prompt_ids)] = prompt_ids
  tokens = np.tile(row, (n, 1))
  return {'tokens': tokens, 'segment_ids': np.ones_like(tokens), 'positions': np.tile(np.arange(length), (n, 1)),
          'modality': np.full_like(tokens, spec.TEXT)}


def sample_text(workdir, *, n=None, prompt='', out_dir=None, seed=0, overrides=()):
  """Writes `samples.txt` into out_dir (default workdir/samples) and returns the decoded strings."""
  cfg = load_workdir_config(workdir, overrides)
  try:
    config_lib.resolve_mesh(cfg.mesh, jax.device_count())
  except config_lib.ConfigError:  # Sampling on other hardware than training: plain data parallel.
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = -1, 1, 1
  s = train.setup(cfg)
  params, step = restore_params(s, workdir)
  tokenizer = text.TextTokenizer(os.path.join(train.text_root(cfg), 'spm.model'))
  n = n or cfg.sample.num
  rows = -(-n // s.mesh_shape.batch_shards) * s.mesh_shape.batch_shards
  canvas = text_canvas(s.vocab, tokenizer, rows, cfg.sample.text_len, prompt)
  batch = {k: jax.device_put(v, s.sharder.batch()) for k, v in canvas.items()}
  fn = jax.jit(lambda p, c, seg, pos, mod, rng: sampling.ancestral(
      p, c, seg, pos, mod, rng, model=s.model, vocab=s.vocab, diff_cfg=s.diffusion, sharder=s.sharder,
      steps=cfg.sample.steps, temperature=cfg.sample.temperature, top_p=cfg.sample.top_p))
  out = fn(params, batch['tokens'], batch['segment_ids'], batch['positions'], batch['modality'],
           jax.random.PRNGKey(seed))
  out = np.asarray(jax.device_get(out))[:n]
  lo, _ = s.vocab.range(spec.TEXT)
  texts = [tokenizer.decode(row[(s.vocab.modality_of(row) == spec.TEXT)] - lo) for row in out]
  out_dir = out_dir or os.path.join(workdir, 'samples')
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'samples.txt'), 'w', encoding='utf-8') as f:
    for i, t in enumerate(texts):
      f.write(f'--- sample {i} (step {step}, prompt {prompt!r})\n{t}\n')
  return texts
