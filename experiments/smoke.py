"""Tiny text-only run for tests and quick checks (seconds per hundred steps on a laptop CPU).

  tmdm prepare --config=experiments/smoke.py
  tmdm train --config=experiments/smoke.py --workdir=runs/smoke --host_devices=8
"""

from tmdm.config import base as base_config
from tmdm.model import config as model_config

PRESETS = {'default': {}, 'mesh222': {'mesh': dict(data=2, fsdp=2, tensor=2)},
           'mesh181': {'mesh': dict(data=1, fsdp=8, tensor=1)}}


def get_config(arg=None):
  c = base_config.get_config()
  c.model.update(model_config.PRESETS['tiny'])
  c.model.scan_layers = False  # unrolled is faster on CPU for a few layers (BUILD_NOTES "Performance on CPU")
  c.vocab.update(text_size=512, multiple=8)
  c.data.update(text_name='fortunes-smoke', text_sources='fortunes', text_max_docs=4000, seq_len=64)
  c.optim.update(lr=1e-2, warmup_frac=0.05)
  c.train.update(num_steps=200, batch_size=16, log_every_steps=10, eval_batches=2)
  c.checkpoint.update(every_steps=100, keep=2)
  c.sample.update(steps=16, text_len=32)
  for section, values in PRESETS[arg or 'default'].items():
    c[section].update(values)
  return c
