"""Generation from a trained model: every task of tasks.py from one checkpoint.

`Context` holds what sampling needs (the Setup, parameters, tokenizers, compiled samplers) and is
built either from a training workdir (`from_workdir`: its config, its latest checkpoint) or from a
running training loop (`for_training`, periodic evaluation). `generate` builds a task's canvases,
samples them in batches and decodes the result into `Sample`s; `sample_command` writes them as files
and an HTML gallery (gallery.py).

Legend: N samples, L row length, T codes per item, S audio samples.
"""

import dataclasses
import glob
import io
import json
import logging
import os
import time

import jax
import numpy as np

from tmdm import errors, storage, vocab as vocab_lib
from tmdm.config import loader as config_loader
from tmdm.data import mixture, store
from tmdm.datasets import text
from tmdm.diffusion import sampling
from tmdm.generation import tasks as tasks_lib
from tmdm.parallel import mesh as mesh_lib, sharding as sharding_lib
from tmdm.training import checkpoint as checkpoint_lib, setup as setup_lib, state as train_state

log = logging.getLogger('tmdm')


def config_from_dict(saved: dict, overrides=()):
  """The base config with a saved run's settings merged in (keys it no longer has are ignored) and
  `overrides` applied last."""
  return config_loader.apply_overrides(config_loader.from_dict(saved), overrides)


def load_workdir_config(workdir, overrides=()):
  """The run's config.json with `overrides` applied (what a run was started with)."""
  path = storage.join(workdir, 'config.json')
  if not storage.isfile(path):
    raise errors.ConfigError(f'{workdir} is not a training workdir ({path} is missing)')
  return config_from_dict(json.loads(storage.read_text(path)), overrides)


def checkpoint_config(workdir, overrides=(), step=None):
  """(config, Checkpointer, step) for sampling, evaluation and export: the config saved inside the
  newest checkpoint (or `step`'s: the one its weights were trained with), config.json's when the run
  has none or it cannot be read; `overrides` applied last."""
  cfg = load_workdir_config(workdir, overrides)
  ckpt = checkpoint_lib.Checkpointer(cfg.checkpoint.dir or storage.join(storage.absolute(workdir), 'checkpoints'),
                                     keep=1, async_save=False)
  if step is not None and step not in ckpt.steps():
    have = ckpt.steps()
    ckpt.close()
    raise errors.ConfigError(f'{workdir} has no checkpoint of step {step} (it has {have or "none"})')
  step = ckpt.latest_step() if step is None else step
  if step is None:
    return cfg, ckpt, None
  try:
    saved = ckpt.read_config(step)
  except Exception as e:  # pylint: disable=broad-except  (the restore itself will tell what is wrong)
    log.warning('cannot read the config saved with checkpoint %d (%s); using %s', step, e,
                storage.join(workdir, 'config.json'))
    return cfg, ckpt, step
  return config_from_dict(saved, overrides), ckpt, step


def fit_mesh(cfg):
  """A run's mesh for inference here: its own when these devices hold it, else plain data parallel
  (sampling, evaluating or exporting on other hardware than the run trained on)."""
  try:
    mesh_lib.resolve_mesh(cfg.mesh, jax.device_count())
  except errors.ConfigError:
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = -1, 1, 1
  return cfg


@dataclasses.dataclass
class Sample:
  """One generated item: `output` is text (str), an image [H, W, 3] in [0, 1] or a waveform [S]."""
  task: str
  prompt: str  # the condition as text: a caption, a transcript, or a file name
  output: object
  condition: object = None  # I2T / S2T: the input image or waveform
  reference: str = ''  # held-out pairs: the true caption / transcript
  label: int = -1  # held-out digit pairs: the digit
  ids: object = None  # I2T / S2T: the generated caption's text tokenizer ids


class Context:
  """A model ready to sample: setup, parameters and lazily loaded tokenizers and samplers."""

  def __init__(self, s: setup_lib.Setup, params, step: int):
    self.s, self.params, self.step, self.cfg = s, params, step, s.cfg
    self._tokenizers, self._samplers = {}, {}
    self.last = {}  # task -> the samples generate() made last (eval_command writes them as galleries)
    self.memo = {}  # what evaluators derive once per model and data (e.g. T2I reference statistics)
    # task (or a metric's name) -> (numerators, denominators) per item of the task's primary metric (or
    # of that metric), sum(num) / sum(den), in the evaluator's last run: the sampling benchmarks
    # bootstrap their intervals from them.
    self.items = {}
    self.last_run = {}  # Context.run's info of the last call (per-batch timings)

  @classmethod
  def from_workdir(cls, workdir, overrides=()):
    cfg, ckpt, step = checkpoint_config(workdir, overrides)
    fit_mesh(cfg)
    s = setup_lib.build(cfg, with_optimizer=False)
    try:
      params, step, ema = ckpt.restore_params(train_state.abstract_params(s.model, s.sharder, s.seq_len),
                                              ema=cfg.sample.ema, step=step)
    finally:
      ckpt.close()
    log.info('restored step %d of %s%s', step, workdir, ' (weight EMA)' if ema else '')
    return cls(s, params, step)

  @classmethod
  def for_training(cls, s: setup_lib.Setup, params, step: int):
    return cls(s, params, step)

  def root(self, kind):
    return mixture.root(self.cfg, kind)

  def tokenizer(self, kind: str):
    """'text' (SentencePiece of the text data), 'image' or 'audio' (the pair dataset's tokenizer)."""
    if kind not in self._tokenizers:
      if kind == 'text':
        self._tokenizers[kind] = text.TextTokenizer(storage.join(self.root('text'), 'spm.model'))
      else:
        from tmdm.tokenizers import registry  # pylint: disable=import-outside-toplevel  (flax models)
        entry = store.read_manifest(self.root(kind))['tokenizers'][kind]
        self._tokenizers[kind] = registry.load(storage.join(self.root(kind), entry['file']))
    return self._tokenizers[kind]

  def sampler(self, spec_: sampling.SamplerSpec):
    if spec_ not in self._samplers:
      s = self.s
      self._samplers[spec_] = sampling.jit_sampler(model=s.model, vocab=s.vocab, diff_cfg=s.diffusion,
                                                   sharder=s.sharder, spec=spec_)
    return self._samplers[spec_]

  def settings(self, task: str, guided: bool = True):
    """(SamplerSpec, Knobs) of a task from its config section (the text task never guides)."""
    section = tasks_lib.sampler_section(self.cfg.sample, task)
    try:
      return sampling.spec_and_knobs(section, guided=guided and task != 'text')
    except ValueError as e:
      raise errors.ConfigError(f'{"sample" if task == "text" else "sample." + task}: {e}') from None

  def run(self, canvas, spec_, knobs, seed: int):
    """Samples every row of a numpy canvas in batches of sample.batch rows; returns (tokens [N, L],
    info): forward_passes per sample (a cached step counts the share of positions it runs), seconds
    of sampling in all, and batch_seconds / batch_rows of each call (the last batch may be partly
    padding rows). Compiles once per (spec, batch shape), untimed. A cached spec gets the window of
    this canvas (sampling.fit_window)."""
    shards = self.s.mesh_shape.batch_shards
    rows = -(-min(self.cfg.sample.batch, len(canvas['tokens'])) // shards) * shards
    knobs = knobs.as_arrays()
    spec_ = sampling.fit_window(spec_, canvas['tokens'], self.s.vocab.mask_id)
    outs, passes, batch_seconds, batch_rows = [], 0.0, [], []
    for b, lo in enumerate(range(0, len(canvas['tokens']), rows)):
      chunk = {k: v[lo:lo + rows] for k, v in canvas.items()}
      n = len(chunk['tokens'])
      chunk = {k: np.concatenate([v, np.repeat(v[-1:], rows - n, axis=0)]) for k, v in chunk.items()}
      batch = {k: jax.device_put(v, self.s.sharder.batch()) for k, v in chunk.items()}
      rng = jax.random.fold_in(jax.random.PRNGKey(seed), b)
      key = (spec_, chunk['tokens'].shape)
      if key not in self._samplers:
        self._samplers[key] = self.sampler(spec_).lower(self.params, batch, rng, knobs).compile()
      start = time.perf_counter()
      out, used = self._samplers[key](self.params, batch, rng, knobs)
      out = sharding_lib.fetch(out)  # Every process gets every row (multi-process sampling).
      batch_seconds.append(time.perf_counter() - start)
      batch_rows.append(n)
      outs.append(out[:n])
      passes += float(used) * n  # Every row of a call runs the call's passes.
    total = sum(batch_rows)
    info = {'forward_passes': passes / max(total, 1), 'seconds': sum(batch_seconds), 'batch_seconds': batch_seconds,
            'batch_rows': batch_rows, 'batch_size': rows}
    info['generated_tokens'] = int((canvas['tokens'] == self.s.vocab.mask_id).sum())
    self.last_run = info
    return np.concatenate(outs), info

  def heldout(self, kind: str, n: int) -> list[dict]:
    """The first n records of a pair dataset's validation split: {'text', kind, 'label'}."""
    root = self.root(kind)
    records = store.ShardedRecords(root, 'val')
    labels_path = storage.join(root, 'labels', 'val.npy')
    labels = (np.load(io.BytesIO(storage.read_bytes(labels_path))) if storage.isfile(labels_path) else
              np.full(len(records), -1))
    return [dict(records[i], label=int(labels[i])) for i in range(min(n, len(records)))]


def _decode_text(ctx, ids_list):
  tok = ctx.tokenizer('text')
  return [tok.decode(ids) for ids in ids_list]


def generate(ctx: Context, task: str, *, prompts=(), conditions=None, references=(), labels=(), n: int = 1,
             seed: int = 0, caption_lens=None, settings=None):
  """Samples a task. Text-conditioned tasks (text, t2i, t2s): each prompt n times. I2T / S2T:
  `conditions` = (codes [N, T], inputs shown in the gallery, their names), one sample each, caption
  slots of caption_lens (default sample.caption_len). settings: (SamplerSpec, Knobs) or the config's.
  Returns (samples, info: Context.run's forward passes per sample and seconds)."""
  t = tasks_lib.TASKS[task]
  s, vocab = ctx.s, ctx.s.vocab
  spec_, knobs = settings or ctx.settings(task)
  if t.media_first:
    codes, inputs, names = conditions
    lens = caption_lens if caption_lens is not None else [ctx.cfg.sample.caption_len] * len(codes)
    canvas = tasks_lib.pair_canvas(vocab, t, s.seq_len, codes=codes, caption_lens=lens)
  else:
    prompts = [p for p in prompts for _ in range(n)]
    references = [r for r in references for _ in range(n)] if references else ()
    labels = [x for x in labels for _ in range(n)] if labels else ()
    if task == 'text':
      canvas = tasks_lib.text_canvas(vocab, ctx.tokenizer('text'), prompts, ctx.cfg.sample.text_len,
                                     ctx.cfg.sample.infill_len)
    else:
      texts = ctx.tokenizer('text').encode(prompts)
      canvas = tasks_lib.pair_canvas(vocab, t, s.seq_len, texts=texts,
                                     tokens_per_item=ctx.tokenizer(t.kind).tokens_per_item)
  out, info = ctx.run(canvas, spec_, knobs, seed)
  info['rows'] = len(out)
  if t.output == vocab_lib.TEXT:
    ids = tasks_lib.text_ids(out, canvas, vocab, only_generated=t.media_first)
    decoded = _decode_text(ctx, ids)
  else:
    decoded = list(ctx.tokenizer(t.kind).decode(tasks_lib.media_codes(out, canvas, vocab, t.output)))
  samples = []
  for i, output in enumerate(decoded):
    if t.media_first:
      samples.append(Sample(task, names[i], output, condition=inputs[i], reference=references[i] if references else '',
                            label=labels[i] if labels else -1, ids=ids[i]))
    else:
      samples.append(Sample(task, prompts[i], output, reference=references[i] if references else '',
                            label=labels[i] if labels else -1))
  ctx.last[task] = samples
  return samples, info


def heldout_conditions(ctx: Context, task: str, n: int):
  """Held-out pairs as inputs: text tasks get their captions / transcripts as prompts; I2T / S2T get
  their codes with the reference length as the caption slot. Returns generate() keyword arguments."""
  t = tasks_lib.TASKS[task]
  records = ctx.heldout(t.kind, n)
  if not records:
    raise errors.ConfigError(f'{ctx.root(t.kind)} has no held-out pairs')
  captions = _decode_text(ctx, [r['text'] for r in records])
  labels = [r['label'] for r in records]
  if not t.media_first:
    return dict(prompts=captions, labels=labels, n=1)
  codes = np.stack([r[t.kind] for r in records])
  inputs = list(ctx.tokenizer(t.kind).decode(codes))  # what the model sees, as an image / waveform
  names = [f'held-out {t.kind} {i}' for i in range(len(records))]
  return dict(conditions=(codes, inputs, names), references=captions, labels=labels,
              caption_lens=[len(r['text']) for r in records])


def file_conditions(ctx: Context, task: str, paths, prompts=()):
  """I2T: image files; S2T: WAV files, or prompts spoken by espeak-ng (the first of audio.voices)."""
  from tmdm.datasets import audio, image  # pylint: disable=import-outside-toplevel  (scipy, PIL)
  from tmdm.tokenizers import audio as audio_tok  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  t = tasks_lib.TASKS[task]
  paths, unreadable = list(paths), []

  def readable(read):  # A file that cannot be read is named and left out; the others are sampled.
    items, kept = [], []
    for p in paths:
      try:
        items.append(read(p))
        kept.append(p)
      except Exception as e:  # pylint: disable=broad-except  (PIL, scipy and our readers raise many kinds)
        unreadable.append(p)
        log.warning('skipping %s: cannot read it as %s (%s)', p, 'an image' if t.kind == 'image' else 'a WAV',
                    str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
    if unreadable and not kept and not prompts:
      raise errors.ConfigError(f'none of the {len(paths)} input files could be read (first: {unreadable[0]})')
    return items, kept

  def read_image(p):
    with Image.open(p) as img:
      return image.to_rgb(img, ctx.cfg.image.size, ctx.cfg.image.fit).astype(np.float32) / 255

  if t.kind == 'image':
    items, paths = readable(read_image)
    names = [os.path.basename(p) for p in paths]
  else:
    a = ctx.cfg.audio
    waves, paths = readable(lambda p: audio.condition(*audio.read_wav(p), a.sample_rate))
    voice = a.voices.split(',')[0].strip()
    waves += [audio.condition(*audio.espeak(p, voice, ctx.cfg.eval.t2s_speed), a.sample_rate) for p in prompts]
    samples = int(round(a.seconds * a.sample_rate))
    items = list(audio_tok.fit_length([np.zeros(1, np.float32) if w is None else w[:samples] for w in waves], samples))
    names = [os.path.basename(p) for p in paths] + [f'espeak: {p}' for p in prompts]
  codes = ctx.tokenizer(t.kind).encode(np.stack(items))
  return dict(conditions=(codes, items, names))


def sample_command(workdir, *, task='text', prompts=(), inputs=(), n=0, out_dir=None, seed=0, overrides=()):
  """`tmdm sample`: writes the samples and index.html into out_dir (default WORKDIR/samples/TASK)."""
  from tmdm.generation import gallery  # pylint: disable=import-outside-toplevel  (PIL, scipy)
  if task not in tasks_lib.TASKS:
    raise errors.ConfigError(f'unknown task {task!r} (choices: {", ".join(tasks_lib.TASKS)})')
  ctx = Context.from_workdir(workdir, overrides)
  t = tasks_lib.TASKS[task]
  n = n or ctx.cfg.sample.num
  if t.media_first:
    paths = [p for pattern in inputs for p in sorted(glob.glob(pattern))]
    if inputs and not paths:
      raise FileNotFoundError(f'no files match {", ".join(inputs)}')
    kwargs = file_conditions(ctx, task, paths, prompts) if paths or prompts else heldout_conditions(ctx, task, n)
  elif prompts or task == 'text':
    kwargs = dict(prompts=list(prompts) or [''], n=n)
  else:
    kwargs = heldout_conditions(ctx, task, n)
  spec_, knobs = ctx.settings(task)
  samples, info = generate(ctx, task, seed=seed, settings=(spec_, knobs), **kwargs)
  out_dir = out_dir or storage.join(workdir, 'samples', task)
  if jax.process_index() != 0:  # Every process sampled the same rows; one writes them.
    return samples
  page = gallery.write(out_dir, samples, title=f'{task} samples of {workdir} (step {ctx.step})',
                       audio_rate=ctx.cfg.audio.sample_rate, settings=dataclasses.asdict(spec_) | knobs._asdict())
  log.info('%d %s samples in %.1f s (%.1f forward passes each) -> %s', len(samples), task, info['seconds'],
           info['forward_passes'], page)
  return samples
