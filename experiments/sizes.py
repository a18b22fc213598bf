"""Size presets for real pretraining runs (multi-host TPU), up to the paper's 3B model.

Each preset names the TPU slice it targets and execution settings (remat policy, loss chunking,
microbatches, mesh split) that the TPU compiler compiled and fitted there at the paper's batch
(rows of 2048 tokens; BUILD_NOTES "TPU compile table" has it):

  tmdm compile-check --config=experiments/sizes.py:3b --topology=v5e:16x16     # from any host (libtpu)
  tmdm train --config=experiments/sizes.py:pilot-320m --workdir=gs://BUCKET/runs/pilot \\
      --config.data.root=/data/tmdm

Attention is 'auto', i.e. the splash kernel on TPU. Another slice of the same chip kind keeps the
settings per chip when it keeps the rows per chip (batch / chips); otherwise rerun
`tmdm compile-check --topology=... --fit`.

Vocabulary: a 100k SentencePiece text vocabulary plus 8192 image and 8192 audio codes (~117k ids),
which puts ~240M of the pilot's ~320M parameters in the embeddings, as in the paper's batch-size
pilot (docs/design.md 2.1). Hyperparameters are CompleteP base values at width 256 / depth 4.
"""

from tmdm.config import base as base_config
from tmdm.model import config as model_config

# topology: the slice the settings were compiled for (jax's name; compile-check also takes v5e-256).
# exec: model.remat, model.loss_chunk, train.microbatches and mesh.tensor (mesh.fsdp takes the rest).
# Peak per chip from the TPU compiler (`tmdm compile-check --topology=...`), against its usable HBM.
PRESETS = {
    # 16 rows per chip; 9.98 of 15.75 GiB.
    'pilot-320m': dict(model='pilot-320m', steps=50_000, batch=256, topology='v5e:4x4',
                       exec=dict(remat='dots', loss_chunk=512, microbatches=1, tensor=1)),
    # 8 rows per chip; 14.22 of 15.75 GiB.
    '1b': dict(model='1b', steps=100_000, batch=512, topology='v5e:8x8',
               exec=dict(remat='dots', loss_chunk=512, microbatches=1, tensor=1)),
    # 4 rows per chip; 14.29 of 15.75 GiB on v5e:16x16 (fits v5p:4x4x8 too, where 3b-v5p is cheaper).
    '3b': dict(model='3b', steps=200_000, batch=1024, topology='v5e:16x16',
               exec=dict(remat='dots', loss_chunk=512, microbatches=1, tensor=1)),
    # 8 rows per chip, nothing recomputed; 83.91 of 95.74 GiB.
    '3b-v5p': dict(model='3b', steps=200_000, batch=1024, topology='v5p:4x4x8',
                   exec=dict(remat='none', loss_chunk=0, microbatches=1, tensor=1)),
}


def get_config(arg=None):
  preset = PRESETS[arg or 'pilot-320m']
  run = preset['exec']
  c = base_config.get_config()
  c.model.update(model_config.PRESETS[preset['model']])
  c.model.update(remat=run['remat'], loss_chunk=run['loss_chunk'], compute_dtype='bfloat16', attention_impl='auto')
  c.vocab.update(text_size=100_000, image_size=8192, audio_size=8192)
  c.image.levels = (8, 8, 8, 16)  # FSQ codebooks of 8192 codes, matching the vocabulary
  c.audio.levels = (8, 8, 8, 16)
  c.data.update(text_name='text', seq_len=2048, num_workers=8, prefetch=4)
  c.mesh.update(data=1, fsdp=-1, tensor=run['tensor'])
  c.optim.update(lr=3e-3, warmup_frac=0.25, max_warmup_steps=1000)
  c.train.update(num_steps=preset['steps'], batch_size=preset['batch'], microbatches=run['microbatches'],
                 log_every_steps=50, eval_every_steps=2000, eval_batches=16)
  c.checkpoint.update(every_steps=1000, keep=3)
  return c
