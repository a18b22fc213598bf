"""Size presets for real pretraining runs (multi-host TPU/GPU), up to the paper's 3B model.

  tmdm train --config=experiments/sizes.py:pilot-320m --workdir=gs://BUCKET/runs/pilot \
      --config.data.root=/data/tmdm --config.mesh.fsdp=-1 --config.mesh.data=1

Vocabulary: a 100k SentencePiece text vocabulary plus 8192 image and 8192 audio codes (~117k ids),
which puts ~240M of the pilot's ~320M parameters in the embeddings, as in the paper's batch-size
pilot (DESIGN.md 2.1). Hyperparameters are CompleteP base values at width 256 / depth 4.
"""

from tmdm import base_config
from tmdm.model import config as model_config

PRESETS = {
    'pilot-320m': dict(model='pilot-320m', steps=50_000, batch=256),
    '1b': dict(model='1b', steps=100_000, batch=512),
    '3b': dict(model='3b', steps=200_000, batch=1024),
}


def get_config(arg=None):
  preset = PRESETS[arg or 'pilot-320m']
  c = base_config.get_config()
  c.model.update(model_config.PRESETS[preset['model']])
  c.model.update(remat='dots', compute_dtype='bfloat16')
  c.vocab.update(text_size=100_000, image_size=8192, audio_size=8192)
  c.image.levels = (8, 8, 8, 16)  # FSQ codebooks of 8192 codes, matching the vocabulary
  c.audio.levels = (8, 8, 8, 16)
  c.data.update(text_name='text', seq_len=2048, num_workers=8, prefetch=4)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.optim.update(lr=3e-3, warmup_frac=0.25, max_warmup_steps=1000)
  c.train.update(num_steps=preset['steps'], batch_size=preset['batch'], log_every_steps=50,
                 eval_every_steps=2000, eval_batches=16)
  c.checkpoint.update(every_steps=1000, keep=3)
  return c
