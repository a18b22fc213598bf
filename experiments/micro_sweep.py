"""Micro scaling sweep: 3 widths x 3 token horizons of a tiny text model on the smoke data, small
enough to run on a 2-core CPU in minutes, so that sweep -> results -> fit -> plots runs for real.

  tmdm prepare --config=experiments/smoke.py
  python launch/sweep.py run --config=experiments/micro_sweep.py --root=runs/micro_sweep --parallel=2
  tmdm scaling fit runs/micro_sweep/results.jsonl --out=runs/micro_sweep/fit

Widths 16 / 32 / 64 at depth 2 (CompleteP, tuned at the base width 64 and depth 2, so one learning
rate serves every width) have 6,352 / 25,248 / 100,672 non-embedding parameters; horizons 200 / 400 /
800 steps of 16 x 64 tokens are 0.2M / 0.4M / 0.8M tokens (the smoke data holds ~0.36M training
tokens, so the longest runs see it about twice). Each run's cosine schedule ends at its own horizon
(Hoffmann et al.'s approach 3 fits final losses of separately scheduled runs). The loss is the
validation ELBO on all held-out rows at a fixed corruption seed: the same masks for every run.
Measured: 12.3 minutes wall for all 9 runs, 2 at a time, on 2 cores shared with other jobs.

These models are far from converged (losses 4.80-4.98 nats against log 512 = 6.24): the runs exercise
the machinery; the fitted law says little (BUILD_NOTES).
"""

from tmdm.config import base as base_config
from tmdm.model import config as model_config

# Width -> model overrides (depth 2; heads 32 wide or narrower; SwiGLU hidden ~ 2.75 x width). Largest and
# longest first: with runs in parallel, the long ones start early instead of running alone at the end.
SIZES = {
    'w64': dict(d_model=64, n_heads=2, d_head=32, d_ff=176),
    'w32': dict(d_model=32, n_heads=1, d_head=32, d_ff=88),
    'w16': dict(d_model=16, n_heads=1, d_head=16, d_ff=44),
}
HORIZONS = (800, 400, 200)  # Optimizer steps of train.batch_size x data.seq_len tokens.


def get_config(arg=None):
  del arg
  c = base_config.get_config()
  c.model.update(model_config.PRESETS['tiny'])  # Base width 64, base depth 2.
  c.model.update(compute_dtype='float32', attention_impl='xla')
  c.vocab.update(text_size=512, multiple=8)
  c.data.update(text_name='fortunes-smoke', text_sources='fortunes', text_max_docs=4000, seq_len=64)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  c.optim.update(lr=1e-2, warmup_frac=0.05)
  c.train.update(num_steps=HORIZONS[-1], batch_size=16, log_every_steps=25, eval_batches=16, progress=False,
                 tensorboard=False)
  c.checkpoint.update(every_steps=1000, keep=1, async_save=False)
  return c


def get_sweep(arg=None):
  """A grid: axis -> {label: overrides}; launch/sweep.py runs the Cartesian product."""
  del arg
  return {
      'size': {name: {f'model.{k}': v for k, v in shape.items()} for name, shape in SIZES.items()},
      'steps': {f's{n}': {'train.num_steps': n} for n in HORIZONS},
  }
