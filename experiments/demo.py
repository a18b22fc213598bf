"""The README demo: a small masked-diffusion model trained on real English text on CPU.

  tmdm prepare --config=experiments/demo.py
  tmdm train --config=experiments/demo.py --workdir=runs/demo --host_devices=8
  tmdm sample --workdir=runs/demo --host_devices=8
"""

from tmdm import base_config
from tmdm.model import config as model_config

PRESETS = {'default': {}, 'quick': {'train': dict(num_steps=100)}}


def get_config(arg=None):
  c = base_config.get_config()
  c.model.update(model_config.PRESETS['demo'])
  c.vocab.update(text_size=4000)
  c.data.update(text_name='fortunes-kjv', text_sources='fortunes,kjv', seq_len=128)
  c.mesh.update(data=-1, fsdp=2, tensor=1)
  c.optim.update(lr=3e-3)
  c.train.update(num_steps=600, batch_size=32, log_every_steps=20, eval_every_steps=200, eval_batches=4)
  c.checkpoint.update(every_steps=200)
  c.sample.update(steps=64, text_len=64, num=4)
  for section, values in PRESETS[arg or 'default'].items():
    c[section].update(values)
  return c
