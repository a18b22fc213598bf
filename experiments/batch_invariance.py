"""Batch invariance of the SDE scaler (issue 4, docs/design.md 2.4), at CPU scale.

  python studies/batch_invariance.py     # data, 14 runs (7 per seed), docs/figures/batch_invariance.png, table
  tmdm train --config=experiments/batch_invariance.py:markov-scaled-64 --workdir=runs/batch_invariance/markov-scaled-64

The tiny model (d 64, 2 layers) trained to one token horizon D at physical batches 8, 16, 32 and
64 sequences (8x), in two arms: 'scaled' rescales lr, b1, b2, eps and weight decay from the base
batch 16 by kappa = B / 16; 'fixed' keeps the base values at every batch. Every run of a data set
and seed sees the same rows in the same order (packing does not depend on the batch) and the same
lr schedule in tokens. At B = 16 kappa is 1 and the two arms are the same run. Gradient clipping is
off: it has no SDE counterpart and would act differently at each batch.

Data sets (the runner writes and prepares them; --data=markov,fortunes runs both):
  markov    synthetic text: a first-order Markov chain over 400 made-up words, 4 successors each; a
            2-layer model keeps learning it over the whole horizon, so the trajectory matters.
  fortunes  the smoke data (data/fortunes-smoke): at this size and horizon the model barely leaves
            the unigram plateau (BUILD_NOTES), a check of what happens when nothing is learned.
Preset: DATA-ARM-BATCH, e.g. markov-fixed-8; the runner adds --config.seed=N for each seed.

Beyond B_crit (issue 16, study 4): batches 128, 256 and 512 at the same D leave 64, 32 and 16 optimizer
steps, fewer than S_CRIT = 100, so B_crit = D / (SEQ_LEN S_CRIT) = 81.9 sequences; those presets only
warn (the others keep on_exceeding_crit=error), and
  python studies/batch_invariance.py --data=markov --seeds=0,1 --batches=8,16,32,64,128,256,512 \
      --out=runs/study_batch --figure=docs/studies/batch/batch.png --summary=docs/studies/batch/results.json
"""

from tmdm.config import base as base_config
from tmdm.model import config as model_config

BATCHES = (8, 16, 32, 64)  # below B_crit: the runner's default
BEYOND = (128, 256, 512)  # above B_crit (study 4 of issue 16: --batches=8,16,32,64,128,256,512)
BASE_BATCH = 16
SEQ_LEN = 32
HORIZON = 128 * 64 * SEQ_LEN  # D in tokens: 128 steps at batch 64, 1024 at 8, 16 at 512
S_CRIT = 100  # optim.s_crit: B_crit = D / (SEQ_LEN * S_CRIT) = 81.9 sequences
LOG_POINTS = 64  # training-metric windows per run, equal in tokens across batches
EVAL_POINTS = 8  # checkpoints per run, equal in tokens across batches (the runner evaluates them)
EVAL_ROWS = 128  # validation rows of the runner's paired evaluation
MARKOV_JSONL = 'data/markov-text.jsonl'  # written by studies/batch_invariance.py

DATASETS = {
    'markov': dict(text_name='markov-text', text_sources=f'jsonl:{MARKOV_JSONL}', text_max_docs=0, text_size=256),
    'fortunes': dict(text_name='fortunes-smoke', text_sources='fortunes', text_max_docs=4000, text_size=512),
}
ARMS = ('fixed', 'scaled')
PRESETS = {f'{d}-{arm}-{b}': (d, arm, b) for d in DATASETS for arm in ARMS for b in BATCHES + BEYOND}


def get_config(arg=None):
  data, arm, batch = PRESETS[arg or f'markov-scaled-{BASE_BATCH}']
  d = DATASETS[data]
  steps = HORIZON // (batch * SEQ_LEN)
  c = base_config.get_config()
  c.model.update(model_config.PRESETS['tiny'])
  c.model.update(compute_dtype='float32', attention_impl='xla')
  c.vocab.update(text_size=d['text_size'], multiple=8)
  c.data.update(text_name=d['text_name'], text_sources=d['text_sources'], text_max_docs=d['text_max_docs'],
                seq_len=SEQ_LEN)
  for pair_section in ('image', 'audio'):  # text only: `tmdm prepare` skips the pair data sets
    if pair_section in c:
      c[pair_section].sources = ''
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  c.optim.update(lr=1e-2, warmup_frac=0.05, decay='cosine', clip_norm=0.0, sde_scaling=arm == 'scaled',
                 base_batch=BASE_BATCH, base_tokens=float(HORIZON), s_crit=S_CRIT,
                 on_exceeding_crit='warn' if batch in BEYOND else 'error')  # beyond: on purpose
  c.train.update(num_steps=steps, batch_size=batch, log_every_steps=max(1, steps // LOG_POINTS), eval_every_steps=0,
                 eval_batches=0, tensorboard=False)
  c.checkpoint.update(every_steps=steps // EVAL_POINTS, keep=EVAL_POINTS)
  return c
