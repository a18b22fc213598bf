"""Evaluation of a trained model: EVALUATORS maps a name to fn(ctx, settings) -> {metric: value}.

  elbo        per-modality validation ELBO per token and exp(ELBO) (train.evaluate on each mixture
              component's validation split)
  t2i_digits  text -> image on the digits: a classifier trained on the real digits (its held-out
              accuracy reported) labels images generated from "a handwritten digit seven"-style
              prompts; accuracy (chance 0.1) and the Fréchet distance of its penultimate features to
              the real digits. References at the same sample count: the tokenizer's reconstructions
              of real digits (what a perfect generator could reach) and decoded random codes
  t2i_features text -> image on any image data: images generated from eval.num held-out captions,
              in the image tokenizer's own encoder features (measures.encoder_features): Fréchet
              distance to the held-out images (`fd`) between a second real sample's (`fd_train`, the
              floor at this sample count) and decoded random codes' (`fd_random`, the ceiling), score
              (0 noise, 1 a second real sample); the spread (1 as varied as the data, 0 one image);
              whether each image's nearest held-out image carries its prompt (beside chance)
  t2s         text -> speech: DTW-aligned mean |log-mel difference| to espeak-ng's rendering of the same
              held-out transcript (minimum over eval.t2s_voices voices), between the floor (random
              codes decoded) and the ceiling (the tokenizer's reconstruction of the reference);
              score = (floor - model) / (floor - ceiling): 0 is noise, 1 is the tokenizer's limit.
              References on the same scale: the held-out clips themselves (`score_data`: the data's
              voices and speeds) and each clip scored against the next item's transcript
              (`score_other_words`: speech that sounds right and says other words)
  text_infill text on held-out documents (cut to sample.text_len): half of the tokens masked at
              random, token accuracy of the filled ones, beside a unigram's (each masked token drawn
              from the training token frequencies, and always the most frequent one)
  i2t         image -> caption on held-out pairs (reference length): digit accuracy on digit images
              (the caption names the right digit), token accuracy, exact match
  s2t         speech -> transcript on held-out pairs (reference length): word accuracy (1 - WER),
              token accuracy, exact match; beside chance (`word_acc_other_words`: each item's true
              transcript read as the next item's)

`settings(ctx, task)` -> (SamplerSpec, Knobs) lets the sampling sweep run the same measures.
"""

import logging
import math

import jax
import numpy as np

from tmdm import errors, storage
from tmdm.data import shards as shards_lib
from tmdm.datasets import image as image_mod
from tmdm.evaluation import measures as em
from tmdm.generation import generate
from tmdm.training import setup as setup_lib, state as train_state, step as train_step, validation

log = logging.getLogger('tmdm')


def elbo(ctx: generate.Context, settings=None) -> dict:
  del settings
  s = ctx.s
  param_sh = train_state.param_shardings(s.model, s.sharder, s.seq_len)
  focus = validation.focus_ids(ctx.cfg, shards_lib.check_data(ctx.cfg), s.vocab)
  eval_fn = train_step.jit_eval(s.model, s.diffusion, s.vocab, s.sharder, param_sh, focus_ids=focus)
  val = shards_lib.eval_batches(s.cfg, s.vocab, s.sharder, shards_lib.owned(ctx.cfg))  # This process's shards.
  return validation.evaluate(eval_fn, ctx.params, val, ctx.cfg.seed + 1)


def _settings(ctx, task, settings):
  return settings(ctx, task) if settings else ctx.settings(task)


def _t2i_references(ctx, n: int):
  """The digit classifier, the real digits' features, and the reference rows at n samples: the
  tokenizer's reconstructions of n real digits and n decoded random codes. Kept in ctx.memo: a
  sample sweep evaluates one Context many times."""
  e, tok = ctx.cfg.eval, ctx.tokenizer('image')
  key = (ctx.cfg.image.size, e.seed, n, tok.sha256)
  key = ('t2i_references', *key)
  if key not in ctx.memo:
    clf, clf_acc, real_x = em.digit_classifier(ctx.cfg.image.size, e.seed)
    real_f = em.penultimate(clf, real_x)
    rng = np.random.default_rng(e.seed)
    pick = rng.choice(len(real_x), n, replace=False)
    from sklearn import datasets  # pylint: disable=import-outside-toplevel
    digits = datasets.load_digits()
    real_images = np.stack([image_mod.digit_to_rgb(digits.images[i], ctx.cfg.image.size) for i in pick]) / 255
    recon_x = em.digit_features(tok.decode(tok.encode(real_images.astype(np.float32))))
    noise_x = em.digit_features(tok.decode(rng.integers(0, tok.codebook_size, (n, tok.tokens_per_item))))
    refs = {'t2i/classifier_acc_real': clf_acc, 't2i/spread_real': em.class_spread(real_f, digits.target),
            't2i/digit_acc_recon': float(np.mean(clf.predict(recon_x) == digits.target[pick])),
            't2i/fd_recon': em.frechet(em.penultimate(clf, recon_x), real_f),
            't2i/fd_random': em.frechet(em.penultimate(clf, noise_x), real_f)}
    ctx.memo[key] = (clf, real_f, refs)
  return ctx.memo[key]


def t2i_digits(ctx: generate.Context, settings=None) -> dict:
  e = ctx.cfg.eval
  per_digit = max(1, math.ceil(e.num / 10))
  labels = [d for d in range(10) for _ in range(per_digit)]
  templates = image_mod.DIGIT_CAPTION_STYLES[ctx.cfg.image.get('digit_captions', 'varied')]  # Runs saved before the key.
  prompts = [templates[j % len(templates)].format(word=image_mod.NUMBER_WORDS[d], n=d)
             for d in range(10) for j in range(per_digit)]
  clf, real_f, refs = _t2i_references(ctx, len(labels))
  samples, info = generate.generate(ctx, 't2i', prompts=prompts, n=1, seed=e.seed,
                                    settings=_settings(ctx, 't2i', settings))
  gen_x = em.digit_features(np.stack([smp.output for smp in samples]))
  gen_f = em.penultimate(clf, gen_x)
  correct = (clf.predict(gen_x) == np.asarray(labels)).astype(np.float64)
  ctx.items['t2i'] = (correct, np.ones_like(correct))
  # Diversity: the spread among the samples asked for one digit (different prompts and noise), over
  # the spread among real images of one digit, in the classifier's features: 1 as varied as real
  # handwriting, near 0 one image per digit however the prompt is worded.
  return {'t2i/digit_acc': float(np.mean(correct)),
          't2i/fd': em.frechet(gen_f, real_f),
          't2i/diversity': em.class_spread(gen_f, labels) / refs['t2i/spread_real'], **refs,
          't2i/samples': len(labels), 't2i/seconds': info['seconds'],
          't2i/forward_passes': info['forward_passes']}


def _sample_records(ctx, split: str, n: int, rng) -> list[dict]:
  """n records of the image dataset's split at random (sorted indices), fewer if it holds fewer."""
  from tmdm.data import store  # pylint: disable=import-outside-toplevel
  records = store.ShardedRecords(ctx.root('image'), split)
  idx = np.sort(rng.choice(len(records), min(n, len(records)), replace=False))
  return [records[int(i)] for i in idx]


def _t2i_feature_references(ctx, n: int):
  """The held-out pairs (a seeded sample of n from the split i2t reads), their captions and images'
  features, and the reference rows: a training sample of the same size, the held-out images once
  more through the tokenizer, decoded random codes. In ctx.memo (a sample sweep reuses them)."""
  e, tok = ctx.cfg.eval, ctx.tokenizer('image')
  key = ('t2i_feature_references', ctx.root('image'), tok.sha256, e.seed, n)
  if key not in ctx.memo:
    rng = np.random.default_rng(e.seed)
    held = _sample_records(ctx, 'val', n, rng)
    if len(held) < 2:  # A Fréchet distance needs a covariance.
      ctx.memo[key] = None
      return None
    captions = [ctx.tokenizer('text').decode(r['text']) for r in held]
    # The dataset keeps codes, not pixels: the held-out "real" images are the tokenizer's decoding of
    # their codes, the images a perfect model would draw (datasets/image.py's val_psnr_db says how far
    # they are from the originals).
    real = tok.decode(np.stack([r['image'] for r in held]))
    real_f = em.encoder_features(tok, real)
    feats = lambda images: em.encoder_features(tok, images)
    train = _sample_records(ctx, 'train', len(held), rng)
    refs = {'t2i_features/fd_recon': em.frechet(feats(tok.decode(tok.encode(real))), real_f),
            't2i_features/fd_random': em.frechet(
                feats(tok.decode(rng.integers(0, tok.codebook_size, (len(held), tok.tokens_per_item)))), real_f)}
    if len(train) == len(held):
      refs['t2i_features/fd_train'] = em.frechet(feats(tok.decode(np.stack([r['image'] for r in train]))), real_f)
    if len({' '.join(em.words(c)) for c in captions}) < len(captions):  # Some caption repeats: defined.
      refs['t2i_features/nn_caption_match_real'] = em.nn_caption_match_real(real_f, captions)
    ctx.memo[key] = (captions, real_f, refs)
  return ctx.memo[key]


def t2i_features(ctx: generate.Context, settings=None) -> dict:
  """T2I on any image data, measured in the image tokenizer's own features (no classifier of its own).
  On the 100-step demo at eval.num 50: fd 2.52 beside fd_train 0.0034 and fd_random 1.22 (score -1.06,
  farther than noise, as t2i_digits' fd 591 beside its fd_random 290), spread 0.51."""
  e, name = ctx.cfg.eval, 't2i_features'
  if not em.has_encoder_features(ctx.tokenizer('image')):
    log.warning('skipping %s: the image tokenizer %s has no encoder features to compare in', name,
                ctx.tokenizer('image').name)
    return {}
  refs = _t2i_feature_references(ctx, e.num)
  if refs is None:
    log.warning('skipping %s: the image dataset %s holds fewer than 2 held-out pairs (hold out more: '
                'image.val_fraction)', name, ctx.root('image'))
    return {}
  captions, real_f, refs = refs
  shown = ctx.last.get('t2i')  # t2i_digits' gallery stays; this one is written as t2i_features/
  samples, info = generate.generate(ctx, 't2i', prompts=captions, n=1, seed=e.seed,
                                    settings=_settings(ctx, 't2i', settings))
  ctx.last[name] = ctx.last.pop('t2i', samples)
  if shown is not None:
    ctx.last['t2i'] = shown
  gen_f = em.encoder_features(ctx.tokenizer('image'), np.stack([smp.output for smp in samples]))
  out = {f'{name}/fd': em.frechet(gen_f, real_f), **refs,
         f'{name}/spread': em.spread(gen_f, real_f)}
  if f'{name}/fd_train' in refs:  # 0: as far as noise, 1: as close as a second real sample.
    floor, ceiling = refs[f'{name}/fd_train'], refs[f'{name}/fd_random']
    out[f'{name}/score'] = (ceiling - out[f'{name}/fd']) / max(ceiling - floor, 1e-12)
  if f'{name}/nn_caption_match_real' in refs:
    match, chance = em.nn_caption_match(gen_f, real_f, captions)
    ctx.items[name] = (match, np.ones_like(match))
    out.update({f'{name}/nn_caption_match': float(match.mean()), f'{name}/nn_caption_match_chance': chance})
  return {**out, f'{name}/samples': len(samples), f'{name}/seconds': info['seconds'],
          f'{name}/forward_passes': info['forward_passes']}


UNIGRAM_DOCS = 20_000  # Training documents counted for the infilling evaluator's unigram reference.


def infill_rows(ctx: generate.Context):
  """The infilling evaluator's rows: (text ids, bool masked) of the first eval.num held-out documents
  of >= 8 tokens, cut to sample.text_len - 2, half the tokens masked at random (eval.seed)."""
  from tmdm.data import store  # pylint: disable=import-outside-toplevel
  e, length = ctx.cfg.eval, ctx.cfg.sample.text_len
  records = store.ShardedRecords(ctx.root('text'), 'val')
  rng = np.random.default_rng(e.seed)
  rows = []
  for i in range(len(records)):
    ids = np.asarray(records[i]['text'])[:length - 2]
    if len(ids) >= 8:
      rows.append((ids, rng.random(len(ids)) < 0.5))
    if len(rows) == e.num:
      break
  return rows


def text_unigram(ctx: generate.Context) -> np.ndarray:
  """Token frequencies of the first UNIGRAM_DOCS training documents of the text dataset (ctx.memo)."""
  from tmdm.data import store  # pylint: disable=import-outside-toplevel
  key = ('text_unigram', ctx.root('text'))
  if key not in ctx.memo:
    records = store.ShardedRecords(ctx.root('text'), 'train')
    counts = np.zeros(ctx.s.vocab.text_size, np.float64)
    for i in range(min(len(records), UNIGRAM_DOCS)):
      np.add.at(counts, np.asarray(records[i]['text']), 1)
    ctx.memo[key] = counts / max(counts.sum(), 1)
  return ctx.memo[key]


def text_infill(ctx: generate.Context, settings=None) -> dict:
  """Token accuracy of the filled positions, beside what a model without context reaches: drawing
  each masked token from the training unigram (`text/infill_unigram_acc`, the expected accuracy, the
  mean of p(target) over the masked targets; `text/infill_over_unigram` the ratio) and always
  writing the most frequent token (`text/infill_majority_acc`, the greedy unigram)."""
  from tmdm.generation import tasks as tasks_lib  # pylint: disable=import-outside-toplevel
  e = ctx.cfg.eval
  rows = infill_rows(ctx)
  if not rows:
    log.warning('skipping text_infill: no held-out document of 8 tokens or more in %s (hold out more: '
                'data.val_fraction)', ctx.root('text'))
    return {}
  canvas = tasks_lib.text_rows(ctx.s.vocab, rows, ctx.cfg.sample.text_len)
  spec_, knobs = _settings(ctx, 'text', settings)
  out, info = ctx.run(canvas, spec_, knobs, e.seed)
  filled = tasks_lib.text_ids(out, canvas, ctx.s.vocab, only_generated=True)
  hits_N = np.array([np.sum(f == ids[m]) for f, (ids, m) in zip(filled, rows)], np.float64)
  masked_N = np.array([m.sum() for _, m in rows], np.float64)
  ctx.items['text'] = (hits_N, masked_N)
  acc = float(hits_N.sum() / max(masked_N.sum(), 1))
  freq, targets = text_unigram(ctx), np.concatenate([ids[m] for ids, m in rows])
  unigram = float(np.mean(freq[targets]))
  return {'text/infill_token_acc': acc, 'text/infill_unigram_acc': unigram,
          'text/infill_majority_acc': float(np.mean(targets == np.argmax(freq))),
          'text/infill_over_unigram': acc / max(unigram, 1e-12),
          'text/samples': len(rows), 'text/seconds': info['seconds'], 'text/forward_passes': info['forward_passes']}


def _log_mels(ctx, waves_NS):
  from tmdm.tokenizers import mel  # pylint: disable=import-outside-toplevel
  a = ctx.cfg.audio
  fbank = mel.mel_filterbank(a.sample_rate, a.n_fft, a.n_mels)
  return np.asarray(mel.log_mel(np.asarray(waves_NS, np.float32), fbank, a.n_fft, a.hop))


_T2S_REFERENCES = {}  # (texts, voices, speed, seed) -> (reference log-mels, floor, ceiling): a sweep reuses them.


def _t2s_references(ctx, texts):
  """espeak-ng renderings of each text (trimmed log-mels per voice) and the floor and ceiling distances."""
  from tmdm.datasets import audio  # pylint: disable=import-outside-toplevel
  from tmdm.tokenizers import audio as audio_tok  # pylint: disable=import-outside-toplevel
  e, a = ctx.cfg.eval, ctx.cfg.audio
  voices = tuple(v.strip() for v in a.voices.split(',') if v.strip())[:max(1, e.t2s_voices)]
  key = (tuple(texts), voices, e.t2s_speed, e.seed)
  if key not in _T2S_REFERENCES:
    length = int(round(a.seconds * a.sample_rate))
    refs = []  # [voice] -> waveforms [N, S]
    for voice in voices:
      waves = [audio.condition(*audio.espeak(t, voice, e.t2s_speed), a.sample_rate) for t in texts]
      refs.append(audio_tok.fit_length([w[:length] for w in waves], length))
    ref_mels = [[em.trim_silence(m) for m in _log_mels(ctx, r)] for r in refs]
    tok = ctx.tokenizer('audio')
    noise = tok.decode(np.random.default_rng(e.seed).integers(0, tok.codebook_size, (len(texts), tok.tokens_per_item)))
    recon = tok.decode(tok.encode(refs[0]))
    _T2S_REFERENCES[key] = (ref_mels, _mel_dtw(ctx, noise, ref_mels), _mel_dtw(ctx, recon, ref_mels))
  return _T2S_REFERENCES[key]


def _mel_dtw(ctx, waves_NS, ref_mels) -> float:
  """Mean over items of the DTW log-mel distance to the closest of the reference voices."""
  return float(np.mean(_mel_dtw_items(ctx, waves_NS, ref_mels)))


def _mel_dtw_items(ctx, waves_NS, ref_mels) -> np.ndarray:
  mels = [em.trim_silence(m) for m in _log_mels(ctx, waves_NS)]
  return np.array([min(em.dtw_distance(m, per_voice[i]) for per_voice in ref_mels) for i, m in enumerate(mels)])


def _t2s_data_references(ctx, records, ref_mels):
  """(the held-out clips' own distance, another item's clip's distance): the data itself through the
  tokenizer, and speech of the data's voices and speeds that says other words (each item's clip
  scored against the next item's transcript). A model between the two says some of the words."""
  key = ('t2s_data', tuple(tuple(np.asarray(r['text']).tolist()) for r in records))
  if key not in ctx.memo:
    waves = ctx.tokenizer('audio').decode(np.stack([np.asarray(r['audio']) for r in records]))
    own = float(np.mean(_mel_dtw_items(ctx, waves, ref_mels)))
    other = float(np.mean(_mel_dtw_items(ctx, np.roll(waves, 1, axis=0), ref_mels))) if len(records) > 1 else None
    ctx.memo[key] = (own, other)
  return ctx.memo[key]


def t2s(ctx: generate.Context, settings=None) -> dict:
  e = ctx.cfg.eval
  records = ctx.heldout('audio', e.num)
  texts = [ctx.tokenizer('text').decode(r['text']) for r in records]
  ref_mels, floor, ceiling = _t2s_references(ctx, texts)
  data, other = _t2s_data_references(ctx, records, ref_mels)
  samples, info = generate.generate(ctx, 't2s', prompts=texts, n=1, seed=e.seed,
                                    settings=_settings(ctx, 't2s', settings))
  per_item = _mel_dtw_items(ctx, np.stack([smp.output for smp in samples]), ref_mels)
  ctx.items['t2s'] = (per_item, np.ones_like(per_item))
  model = float(np.mean(per_item))
  score = lambda d: (floor - d) / max(floor - ceiling, 1e-9)
  out = {'t2s/mel_dtw': model, 't2s/mel_dtw_floor': floor, 't2s/mel_dtw_ceiling': ceiling,
         't2s/score': score(model), 't2s/mel_dtw_data': data, 't2s/score_data': score(data),
         't2s/samples': len(texts), 't2s/seconds': info['seconds'], 't2s/forward_passes': info['forward_passes']}
  if other is not None:
    out.update({'t2s/mel_dtw_other_words': other, 't2s/score_other_words': score(other)})
  return out


def _caption_task(ctx, task, settings, records):
  """Captions / transcripts of held-out records, each in a slot of its reference's length."""
  kind = 'image' if task == 'i2t' else 'audio'
  if not records:
    raise errors.DataError(f'{task}: the {kind} dataset {ctx.root(kind)} holds no held-out pairs (hold out more: '
                           f'{kind}.val_fraction)')
  codes = np.stack([r[kind] for r in records])
  refs = [ctx.tokenizer('text').decode(r['text']) for r in records]
  inputs = list(ctx.tokenizer(kind).decode(codes))  # shown in the eval gallery
  samples, info = generate.generate(
      ctx, task, conditions=(codes, inputs, [f'held-out {kind} {i}' for i in range(len(records))]), references=refs,
      labels=[r['label'] for r in records], caption_lens=[len(r['text']) for r in records],
      seed=ctx.cfg.eval.seed, settings=_settings(ctx, task, settings))
  norm = lambda x: ' '.join(em.words(x))
  token_acc = np.array([em.token_accuracy(smp.ids, r['text']) for smp, r in zip(samples, records)], np.float64)
  ctx.items[f'{task}/token_acc'] = (token_acc, np.ones_like(token_acc))
  return samples, info, {
      f'{task}/token_acc': float(np.mean(token_acc)),
      f'{task}/exact': float(np.mean([norm(smp.output) == norm(smp.reference) for smp in samples])),
      f'{task}/samples': len(samples), f'{task}/seconds': info['seconds'],
      f'{task}/forward_passes': info['forward_passes']}


def i2t(ctx: generate.Context, settings=None) -> dict:
  records = [r for r in ctx.heldout('image', 10**9) if r['label'] >= 0][:ctx.cfg.eval.num]
  if not records:  # A dataset without digits: the first held-out pairs.
    records = ctx.heldout('image', ctx.cfg.eval.num)
  samples, _, out = _caption_task(ctx, 'i2t', settings, records)
  if records[0]['label'] >= 0:
    correct = np.array([em.digit_in(smp.output) == smp.label for smp in samples], np.float64)
    ctx.items['i2t'] = (correct, np.ones_like(correct))
    out['i2t/digit_acc'] = float(np.mean(correct))
  return out


def _word_acc(errors_N2) -> float:
  """1 - WER over a set: 1 - sum(word edits) / sum(reference words), floored at 0."""
  return float(max(0.0, 1.0 - errors_N2[:, 0].sum() / max(errors_N2[:, 1].sum(), 1)))


def s2t(ctx: generate.Context, settings=None) -> dict:
  samples, _, out = _caption_task(ctx, 's2t', settings, ctx.heldout('audio', ctx.cfg.eval.num))
  errors = np.array([em.word_errors(smp.output, smp.reference) for smp in samples], np.float64)
  ctx.items['s2t'] = (errors[:, 1] - errors[:, 0], errors[:, 1])  # word_acc = sum(words - errors) / sum(words)
  out['s2t/word_acc'] = _word_acc(errors)
  if len(samples) > 1:  # Chance: each item's true transcript read as the next item's.
    refs = [smp.reference for smp in samples]
    out['s2t/word_acc_other_words'] = _word_acc(np.array([em.word_errors(h, r) for h, r in zip(np.roll(refs, 1), refs)],
                                                         np.float64))
  return out


EVALUATORS = {'elbo': elbo, 'text_infill': text_infill, 't2i_digits': t2i_digits, 't2i_features': t2i_features,
              't2s': t2s, 'i2t': i2t, 's2t': s2t}
PRIMARY = {  # The metric the sampling sweep optimizes per task, and whether higher is better.
    'text': ('text/infill_token_acc', True),
    't2i': ('t2i/digit_acc', True), 't2s': ('t2s/mel_dtw', False),
    'i2t': ('i2t/digit_acc', True), 's2t': ('s2t/word_acc', True),
}
# Breaks exact ties of the primary metric in the sweep (a small evaluation set ties often): metric, higher is better.
SECONDARY = {'t2i': ('t2i/fd', False), 'i2t': ('i2t/token_acc', True), 's2t': ('s2t/token_acc', True)}
# Tasks whose sweep weighs diversity with the primary metric (sample_sweep.score): metric in [0, 1+].
DIVERSITY = {'t2i': 't2i/diversity'}
TASK_EVALUATOR = {'text': 'text_infill', 't2i': 't2i_digits', 't2s': 't2s', 'i2t': 'i2t', 's2t': 's2t'}


def names(spec_: str) -> list[str]:
  out = [x.strip() for x in spec_.split(',') if x.strip()]
  for name in out:
    if name not in EVALUATORS:
      raise errors.ConfigError(f'unknown evaluator {name!r} (choices: {", ".join(EVALUATORS)})')
  return out


NEEDS = {'text_infill': 'text', 't2i_digits': 'image', 't2i_features': 'image', 'i2t': 'image', 't2s': 'audio',
         's2t': 'audio'}


# Evaluators that judge with a reference of their own need the data it fits: the digit classifier
# reads digits, the T2S score compares with espeak-ng's rendering of the transcript.
NEEDS_SOURCE = {'t2i_digits': ('image', 'digits'), 't2s': ('audio', 'espeak:')}


def _sources(ctx, kind) -> list:
  """The sources the run's `kind` dataset was built from (its manifest), [] when unknown."""
  from tmdm.data import mixture, store  # pylint: disable=import-outside-toplevel
  try:
    settings = store.read_manifest(mixture.root(ctx.cfg, kind))['source'].get('settings', {})
  except (store.DataError, OSError):
    return []
  return [x.strip() for x in str(settings.get('sources', '')).split(',') if x.strip()]


def run(ctx: generate.Context, which) -> dict:
  """The named evaluators, skipping (with a log line) those whose data the run did not train on."""
  from tmdm.data import mixture  # pylint: disable=import-outside-toplevel
  trained = mixture.weights(ctx.cfg)
  out = {}
  for name in which:
    if name in NEEDS and NEEDS[name] not in trained:
      log.info('skipping %s: the run has no %s data', name, NEEDS[name])
      continue
    if name in NEEDS_SOURCE:
      kind, source = NEEDS_SOURCE[name]
      have = _sources(ctx, kind)
      if have and not any(s == source or (source.endswith(':') and s.startswith(source)) for s in have):
        log.warning('skipping %s: it needs %s data from %r, this run\'s is from %s', name, kind, source, ', '.join(have))
        continue
    log.info('evaluating %s', name)
    out.update(EVALUATORS[name](ctx))
  return out


class TrainingEvaluator:
  """eval.tasks except 'elbo' (the loop measures it itself), for the training loop every
  eval.every_steps (training.loop.GenerationEval). It keeps one sampling Context, so the samplers
  compile once per run; a rollback (a new Setup) starts a new one and drops the old."""

  def __init__(self):
    self.ctx = None

  def __call__(self, s: setup_lib.Setup, params, step: int) -> dict:
    if self.ctx is None or self.ctx.s is not s:
      self.ctx = generate.Context.for_training(s, params, step)
    self.ctx.params, self.ctx.step = params, step
    return run(self.ctx, [n for n in names(s.cfg.eval.tasks) if n != 'elbo'])


def eval_command(workdir, overrides=(), out_path=None) -> dict:
  """`tmdm eval`: every evaluator of eval.tasks on the latest checkpoint; writes WORKDIR/eval_STEP.json
  and a gallery of each task's generated samples under WORKDIR/eval_STEP/TASK/."""
  import json  # pylint: disable=import-outside-toplevel
  from tmdm.generation import gallery  # pylint: disable=import-outside-toplevel
  ctx = generate.Context.from_workdir(workdir, overrides)
  results = {'step': ctx.step, **run(ctx, names(ctx.cfg.eval.tasks))}
  out_path = out_path or storage.join(workdir, f'eval_{ctx.step}.json')
  if jax.process_index() != 0:  # Every process computed the same numbers; one writes them.
    return results
  storage.write_text(out_path, json.dumps(results, indent=2))
  for task, samples in ctx.last.items():
    gallery.write(storage.join(out_path[:-len('.json')] if out_path.endswith('.json') else out_path, task), samples,
                  title=f'tmdm eval: {task}, step {ctx.step}',
                  audio_rate=ctx.cfg.audio.sample_rate)
  log.info('wrote %s', out_path)
  return results
