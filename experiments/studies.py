"""Design-space studies at CPU scale (issue 16): one small tri-modal model on the demo's data, and one sweep
per study, named by the file's argument.

  tmdm prepare --config=experiments/demo.py         # the data (shared with the demo)
  python launch/sweep.py run --config=experiments/studies.py:STUDY --root=runs/studies/STUDY --parallel=2
  tmdm study report runs/studies/STUDY --out=docs/studies/STUDY

STUDY is one of
  schedules  1b: final validation ELBO per modality at equal compute for each noise schedule, one
             modality's schedule changed at a time (text linear/cosine/polynomial, image and audio
             cosine/linear/polynomial), 2 seeds.
  antimask   2: complementary masks (anti-masking) off / on at equal compute (same rows per step, so
             half the unique rows) / on at equal unique data (twice the rows per step), 2 seeds, with
             the T2I digit evaluator at the end.
  mixing     3: a grid over the (text, image, audio) shares of rows, with the T2I and T2S evaluators.
  scaling    5: widths (d 16, 32, 64 at depth 2) x horizons (250 to 4,000 steps, each with its own cosine
             schedule) on text and image-text rows (half each, no audio), for `tmdm scaling fit`:
               python launch/sweep.py run --config=experiments/studies.py:scaling --root=runs/studies/scaling
               tmdm scaling fit runs/studies/scaling/results.jsonl --out=docs/studies/scaling

The model: d 64, 2 layers (the 'tiny' preset, 0.1M non-embedding parameters), rows of 128 tokens,
batch 16, learning rate 1e-2 (CompleteP at its base shape), 500 steps (1.0M tokens; 0.25 s a step
on 2 cores). Every run validates at its end on the same held-out rows with the same masks
(eval seed fixed), per modality and per corruption mode; `seed` seeds initialization, data order
and training masks together. The model is far from converged at this budget: differences are
differences in how fast each setting learns, which is what a study at this scale can measure.
"""

from tmdm.config import base as base_config
from tmdm.model import config as model_config

STEPS = 500
SEEDS = (0, 1)
SCHEDULES = {'text': ('linear', 'cosine', 'polynomial'), 'image': ('cosine', 'linear', 'polynomial'),
             'audio': ('cosine', 'linear', 'polynomial')}  # the first of each is tmdm's default
MIXES = {  # (text, image, audio) shares of rows; 'demo' is the demo's mixture
    'demo': (0.2, 0.5, 0.3), 'even': (0.34, 0.33, 0.33), 'text60': (0.6, 0.2, 0.2),
    'image60': (0.2, 0.6, 0.2), 'audio60': (0.2, 0.2, 0.6), 'notext': (0.0, 0.6, 0.4),
}
# Study 5: width -> model shape at depth 2 (heads 32 wide or narrower, SwiGLU hidden ~ 2.75 x width), and
# horizons in optimizer steps of 16 x 128 tokens. Largest and longest first, so that with runs in
# parallel the long ones start early.
WIDTHS = {
    'w64': dict(d_model=64, n_heads=2, d_head=32, d_ff=176),
    'w32': dict(d_model=32, n_heads=1, d_head=32, d_ff=88),
    'w16': dict(d_model=16, n_heads=1, d_head=16, d_ff=44),
}
HORIZONS = (4000, 2000, 1000, 500, 250)


def get_config(arg=None):
  c = base_config.get_config()
  c.model.update(model_config.PRESETS['tiny'])
  c.model.update(compute_dtype='float32', attention_impl='xla', scan_layers=False)
  c.vocab.update(text_size=4000)  # the demo's data sets (tmdm prepare --config=experiments/demo.py)
  c.data.update(text_name='fortunes-kjv', text_sources='fortunes,kjv', seq_len=128, mix_text=0.2, mix_image=0.5,
                mix_audio=0.3)
  c.image.update(name='digits', sources='digits', train_steps=400)
  c.audio.update(name='speech', train_steps=500)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  c.optim.update(lr=1e-2, warmup_frac=0.05)
  steps = STEPS
  c.train.update(num_steps=steps, batch_size=16, log_every_steps=max(1, steps // 16), eval_every_steps=steps,
                 eval_batches=8, progress=False, tensorboard=False)
  c.checkpoint.update(every_steps=steps, keep=1, async_save=False)
  c.eval.update(every_steps=0, num=30)
  if arg == 'antimask':
    c.eval.update(every_steps=steps, tasks='t2i_digits')
  elif arg == 'mixing':
    c.eval.update(every_steps=steps, tasks='t2i_digits,t2s')
  elif arg == 'scaling':  # text and one pair modality; 16 validation batches (256 held-out rows) at the end
    c.data.update(mix_text=0.5, mix_image=0.5, mix_audio=0.0)
    c.train.update(eval_batches=16)
  c.sample.t2i.update(sampler='confidence', schedule='cosine', steps=16, temperature=1.0, guidance=2.0)
  c.sample.t2s.update(sampler='ancestral', schedule='cosine', steps=16, temperature=1.0, guidance=0.0)
  return c


def _seeded(runs):
  return [dict(r, name=f'{r["name"]}-s{sd}', seed=sd) for r in runs for sd in SEEDS]


def get_sweep(arg=None):
  """A list of runs: name -> overrides; the report groups the seeds of one setting (the `seed` key)."""
  if arg == 'schedules':
    runs = [{'name': 'default'}]
    for modality, choices in SCHEDULES.items():
      runs += [{'name': f'{modality}-{s}', f'diffusion.schedule_{modality}': s} for s in choices[1:]]
    return _seeded(runs)
  if arg == 'antimask':
    return _seeded([{'name': 'off'},
                    {'name': 'on-equal-compute', 'diffusion.complementary': True},
                    {'name': 'on-equal-data', 'diffusion.complementary': True, 'train.batch_size': 32}])
  if arg == 'mixing':
    return [{'name': name, 'data.mix_text': t, 'data.mix_image': i, 'data.mix_audio': a}
            for name, (t, i, a) in MIXES.items()]
  if arg == 'scaling':  # a grid; each run's schedule (warm-up, cosine decay) ends at its own horizon
    return {'size': {w: {f'model.{k}': v for k, v in shape.items()} for w, shape in WIDTHS.items()},
            'steps': {f's{n}': {'train.num_steps': n, 'train.eval_every_steps': n, 'checkpoint.every_steps': n,
                                'train.log_every_steps': max(1, n // 16)} for n in HORIZONS}}
  raise ValueError(f'experiments/studies.py: no study {arg!r} (schedules, antimask, mixing, scaling)')
