"""Why a run cannot transcribe speech (issue 29): three measurements on a trained run and its data.

  python -m tmdm.tools.s2t_diagnosis --workdir=RUN [--parts=nll,layout,probe] [--steps=400,800]
                                     [--split=val] [--n=0] [--out=FILE.json]

Parts (each prints its figures; --out also writes them as JSON):
  nll     Does the model read the speech? The audio dataset's held-out pairs (or --split=train) are
          laid out as the S2T evaluator lays them out (tasks.pair_canvas: [S2T] <aud> codes </aud>
          <txt> slot </txt> [PAD]); one forward pass gives -log p(true token | row) at each masked
          transcript position, the logits restricted to text ids (vocab.restrict with
          loss.allowed_table). Conditions: the item's own speech codes; another item's (a
          derangement of the items, several draws); none (every code masked, as in the training's
          dropped-condition mode). Masks: every transcript token, or only the tokens of content words
          (the others given). Prints nats per token, argmax accuracy and the paired gap other - own
          (mean over items, with twice its standard error). --steps: checkpoints of the run to
          measure (default the newest).
  layout  What a row holds: transcript tokens per record against the room an S2T row leaves them,
          audio codes per second, the speech extent of each clip (codes before the padding silence),
          clips skipped at prepare as longer than audio.seconds, how many held-out transcript words
          occur in the training transcripts, and the share of supervised tokens that are transcript
          tokens of S2T rows with clean speech in the run's mixture (every supervised token has
          expected ELBO weight 1, so counts are the right measure).
  probe   Does the speech tokenizer keep what tells words apart? Single words (the ten number words
          and PROBE_WORDS) spoken by espeak-ng in each of audio.voices at the ends of audio.speeds and
          at eval.t2s_speed, prepared as generate.file_conditions prepares clips, encoded by the run's
          audio tokenizer. Classifiers on the speech span (frames within 4 nats of the loudest):
          logistic regression on the code histogram, logistic regression on the FSQ code vectors
          resampled to 8 steps, and 1-nearest-neighbour under DTW of the code vectors; the last two
          also on the log-mel input (what there was to keep, pooled to the codes' rate) and on the
          decoder's log-mel of the codes. Leave-one-voice-out and held-out-speed (train at the two
          audio.speeds, test at eval.t2s_speed) accuracy; chance 1 / number of words.

Legend: N items, L row length, T codes per clip, F frames, K features.
"""

import argparse
import collections
import json
import re

import numpy as np

STOPWORDS = frozenset("""a about after all also am an and any are as at be because been but by can could did do does
for from had has have he her him his how i if in into is it its let may me my no nor not now of on or our out
shall she so than that the their them then there these they this thou thee thy to up upon us was we were what
when which who whom will with would ye you your unto o s t""".split())
PROBE_WORDS = ('lord', 'god', 'king', 'people', 'house', 'land', 'man', 'day', 'heart', 'earth', 'love', 'life',
               'time', 'world', 'money', 'water', 'fire', 'light', 'night', 'work')


def _say(*args):
  print(*args, flush=True)


# ---------------------------------------------------------------------------------------------------- nll


def _content_mask(tok, ids) -> np.ndarray:
  """Bool per transcript token: a piece with a letter in a word that is not a function word."""
  pieces = [tok.sp.id_to_piece(int(i)) for i in ids]
  groups, cur = [], []
  for k, piece in enumerate(pieces):
    if piece.startswith('\u2581') and cur:
      groups.append(cur)
      cur = []
    cur.append(k)
  if cur:
    groups.append(cur)
  out = np.zeros(len(ids), bool)
  for g in groups:
    word = re.sub(r"[^a-z']", '', ''.join(pieces[k] for k in g).lower()).strip("'")
    if word and word not in STOPWORDS:
      for k in g:
        out[k] = bool(re.search('[A-Za-z]', pieces[k]))
  return out


def _derangement(rng, n):
  order = rng.permutation(n)
  other = np.empty(n, np.int64)
  other[order] = np.roll(order, -1)
  return other


class _Scorer:
  """-log p(target) and the argmax at every position of canvases, logits restricted per modality."""

  def __init__(self, s):
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from tmdm.diffusion import loss as loss_lib  # pylint: disable=import-outside-toplevel
    from tmdm import vocab as vocab_lib  # pylint: disable=import-outside-toplevel
    self.s = s

    @jax.jit
    def score(params, tokens, segment_ids, positions, modality, targets):
      logits = s.model.apply({'params': params}, tokens, segment_ids, positions)
      logp = jax.nn.log_softmax(vocab_lib.restrict(logits, modality, loss_lib.allowed_table(s.vocab, s.sharder)), -1)
      nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
      return nll, jnp.argmax(logp, axis=-1)

    self._score, self._jax = score, jax

  def __call__(self, params, canvas, targets, rows=32):
    shards = self.s.mesh_shape.batch_shards
    rows = -(-rows // shards) * shards
    nll, pred = [], []
    for lo in range(0, len(targets), rows):
      part = [canvas['tokens'], canvas['segment_ids'], canvas['positions'], canvas['modality'], targets]
      part = [a[lo:lo + rows] for a in part]
      n = len(part[0])
      part = [np.concatenate([a, np.repeat(a[-1:], rows - n, axis=0)]) for a in part]
      part = [self._jax.device_put(a, self.s.sharder.batch()) for a in part]
      a, b = self._score(params, *part)
      nll.append(np.asarray(a)[:n])
      pred.append(np.asarray(b)[:n])
    return np.concatenate(nll), np.concatenate(pred)


def _records(ctx, split, n):
  from tmdm.data import store  # pylint: disable=import-outside-toplevel
  if split == 'val':
    return ctx.heldout('audio', n or 10**9)
  recs = store.ShardedRecords(ctx.root('audio'), split)
  return [recs[i] for i in range(min(n or len(recs), len(recs)))]


def nll_part(ctx, scorer, split='val', n=0, draws=5, seed=0) -> dict:
  from tmdm import vocab as vocab_lib  # pylint: disable=import-outside-toplevel
  from tmdm.generation import tasks as tasks_lib  # pylint: disable=import-outside-toplevel
  s, vocab = ctx.s, ctx.s.vocab
  tok = ctx.tokenizer('text')
  records = _records(ctx, split, n)
  codes = np.stack([r['audio'] for r in records])
  room = s.seq_len - 5 - codes.shape[1]
  texts = [np.asarray(r['text'])[:room] for r in records]
  lens = [len(t) for t in texts]
  task = tasks_lib.TASKS['s2t']
  own = tasks_lib.pair_canvas(vocab, task, s.seq_len, codes=codes, caption_lens=lens)
  slot = (own['tokens'] == vocab.mask_id) & (own['modality'] == vocab_lib.TEXT)  # [N, L] transcript positions
  targets = own['tokens'].copy()
  content = np.zeros_like(slot)
  for i, t in enumerate(texts):
    where = np.nonzero(slot[i])[0]
    targets[i, where] = t + vocab.text_start
    content[i, where] = _content_mask(tok, t)

  def with_codes(order):
    c = tasks_lib.pair_canvas(vocab, task, s.seq_len, codes=codes[order], caption_lens=lens)
    assert np.array_equal(c['tokens'] == vocab.mask_id, slot)
    return c

  none = dict(own, tokens=np.where(own['cond'] == 1, vocab.mask_id, own['tokens']))
  rng = np.random.default_rng(seed)
  conditions = {'own': [own], 'other': [with_codes(_derangement(rng, len(records))) for _ in range(draws)],
                'none': [none]}
  out = {'split': split, 'items': len(records), 'step': ctx.step,
         'transcript_tokens': int(slot.sum()), 'content_tokens': int(content.sum())}
  for mask_name, masked in (('all', slot), ('content', content)):
    per_item = {}
    for cond_name, canvases in conditions.items():
      nll_sum, hits = np.zeros(len(records)), np.zeros(len(records))
      for c in canvases:
        tokens = np.where(slot & ~masked, targets, c['tokens'])  # given transcript tokens are shown
        nll, pred = scorer(ctx.params, dict(c, tokens=tokens), targets)
        nll_sum += np.where(masked, nll, 0).sum(1) / len(canvases)
        hits += np.where(masked, pred == targets, 0).sum(1) / len(canvases)
      count = masked.sum(1)
      per_item[cond_name] = nll_sum / np.maximum(count, 1)
      out[f'{mask_name}/{cond_name}/nll'] = float(nll_sum.sum() / count.sum())
      out[f'{mask_name}/{cond_name}/acc'] = float(hits.sum() / count.sum())
    keep = masked.sum(1) > 0
    for ref in ('other', 'none'):
      gap = (per_item[ref] - per_item['own'])[keep]
      out[f'{mask_name}/gap_{ref}'] = float(gap.mean())
      out[f'{mask_name}/gap_{ref}_2se'] = float(2 * gap.std(ddof=1) / np.sqrt(len(gap)))
      out[f'{mask_name}/own_better_than_{ref}'] = float(np.mean(gap > 0))
  _say(f'[nll] step {ctx.step}, {split} split, {len(records)} items, {out["transcript_tokens"]} transcript tokens '
       f'({out["content_tokens"]} in content words), other = {draws} derangements')
  for mask_name in ('all', 'content'):
    _say(f'  masked {mask_name:7s} nats/token own {out[f"{mask_name}/own/nll"]:.3f}  other '
         f'{out[f"{mask_name}/other/nll"]:.3f}  none {out[f"{mask_name}/none/nll"]:.3f} | argmax acc own '
         f'{out[f"{mask_name}/own/acc"]:.3f} other {out[f"{mask_name}/other/acc"]:.3f} none '
         f'{out[f"{mask_name}/none/acc"]:.3f} | gap other-own {out[f"{mask_name}/gap_other"]:+.3f} '
         f'+- {out[f"{mask_name}/gap_other_2se"]:.3f} (own better on {out[f"{mask_name}/own_better_than_other"]:.0%} '
         f'of items)')
  return out


# ------------------------------------------------------------------------------------------------- layout


def _stats(x) -> dict:
  x = np.asarray(x, np.float64)
  return {'mean': float(x.mean()), 'min': float(x.min()), 'p5': float(np.percentile(x, 5)),
          'p50': float(np.percentile(x, 50)), 'p95': float(np.percentile(x, 95)), 'max': float(x.max())}


def _fmt(st) -> str:
  return (f'mean {st["mean"]:.2f}, min {st["min"]:g}, p5 {st["p5"]:g}, median {st["p50"]:g}, p95 {st["p95"]:g}, '
          f'max {st["max"]:g}')


def layout_part(ctx) -> dict:
  from tmdm.data import mixture, store  # pylint: disable=import-outside-toplevel
  from tmdm.evaluation import measures as em  # pylint: disable=import-outside-toplevel
  cfg, a = ctx.cfg, ctx.cfg.audio
  tok_text, tok_audio = ctx.tokenizer('text'), ctx.tokenizer('audio')
  root = ctx.root('audio')
  manifest = store.read_manifest(root)
  splits = {sp: store.ShardedRecords(root, sp) for sp in ('train', 'val')}
  recs = {sp: [r[i] for i in range(len(r))] for sp, r in splits.items()}
  T = tok_audio.tokens_per_item
  room = cfg.data.seq_len - 5 - T
  out = {'seq_len': cfg.data.seq_len, 'codes_per_clip': T, 'seconds': a.seconds,
         'codes_per_second': T / a.seconds, 'mel_frames_per_second': a.sample_rate / a.hop,
         'downsample': 2**a.downsamples, 'transcript_room': room}
  n_tok = np.array([len(r['text']) for sp in recs for r in recs[sp]])
  out['transcript_tokens'] = _stats(n_tok)
  out['transcript_cut_share'] = float(np.mean(n_tok > room))
  words = {sp: [em.words(tok_text.decode(r['text'])) for r in recs[sp]] for sp in recs}
  n_words = np.array([len(w) for sp in words for w in words[sp]])
  out['transcript_words'] = _stats(n_words)
  out['tokens_per_word'] = float(n_tok.sum() / n_words.sum())
  # The speech extent: codes up to the last one that is not the padding silence's code.
  silence = int(np.bincount(tok_audio.encode(np.zeros((1, tok_audio.cfg.samples), np.float32))[0]).argmax())
  extent = np.array([(np.nonzero(r['audio'] != silence)[0].max() + 1) if np.any(r['audio'] != silence) else 0
                     for sp in recs for r in recs[sp]])
  out['silence_code'] = silence
  out['speech_codes'] = _stats(extent)
  out['speech_seconds'] = _stats(extent / out['codes_per_second'])
  out['padding_share_of_codes'] = float(1 - extent.mean() / T)
  out['speech_codes_per_word'] = float(extent.sum() / n_words.sum())
  skipped = manifest['source']['skipped']
  out['clips_read'], out['clips_too_long'] = skipped['read'], skipped['too_long']
  out['too_long_share'] = skipped['too_long'] / max(skipped['read'], 1)
  train_counts = collections.Counter(w for ws in words['train'] for w in ws)
  val_words = [w for ws in words['val'] for w in ws]
  out['train_word_types'] = len(train_counts)
  out['val_word_tokens'] = len(val_words)
  out['val_words_seen_in_train'] = float(np.mean([train_counts[w] > 0 for w in val_words]))
  out['val_words_seen_5x_in_train'] = float(np.mean([train_counts[w] >= 5 for w in val_words]))
  out['val_content_words_seen_in_train'] = float(np.mean([train_counts[w] > 0 for w in val_words
                                                          if w not in STOPWORDS]))
  out['val_content_share_of_words'] = float(np.mean([w not in STOPWORDS for w in val_words]))
  # Supervised tokens per row of each kind (the run's mixture and corruption modes).
  w = mixture.weights(cfg)
  total_w = sum(w.values())
  d = cfg.diffusion
  pj, pc, pd = d.p_joint, d.p_conditional, d.p_drop_condition
  ptf = cfg.data.p_text_first
  per_row = {}
  if 'text' in w:
    tm = store.read_manifest(ctx.root('text'))['splits']['train']
    doc = sum(s_['num_tokens']['text'] for s_ in tm['shards']) / tm['num_records']
    per_row['text'] = cfg.data.seq_len * doc / (doc + 2)  # packed: two FIXED boundary tokens per document
  if 'image' in w:
    im = store.read_manifest(ctx.root('image'))
    cap = sum(s_['num_tokens']['text'] for s_ in im['splits']['train']['shards']) / im['splits']['train']['num_records']
    codes_i = im['tokenizers']['image']['tokens_per_item']
    per_row['image'] = pj * (cap + codes_i) + (pc + pd) * (ptf * codes_i + (1 - ptf) * cap)
  trans = float(np.minimum(np.array([len(r['text']) for r in recs['train']]), room).mean())
  per_row['audio'] = pj * (trans + T) + (pc + pd) * (ptf * T + (1 - ptf) * trans)
  mean_sup = sum(w[k] / total_w * per_row[k] for k in per_row)
  s2t_cond = w.get('audio', 0) / total_w * (1 - ptf) * pc * trans
  s2t_any = w.get('audio', 0) / total_w * (1 - ptf) * trans  # S2T rows in any mode (transcript supervised)
  out['supervised_per_row'] = {k: float(v) for k, v in per_row.items()}
  out['supervised_per_row_mean'] = float(mean_sup)
  out['s2t_conditional_transcript_share'] = float(s2t_cond / mean_sup)
  out['s2t_any_mode_transcript_share'] = float(s2t_any / mean_sup)
  rows_per_step = cfg.train.batch_size * w.get('audio', 0) / total_w * (1 - ptf) * pc
  out['s2t_conditional_rows_per_step'] = float(rows_per_step)
  out['s2t_conditional_rows_in_run'] = float(rows_per_step * cfg.train.num_steps)
  out['s2t_conditional_epochs_in_run'] = float(rows_per_step * cfg.train.num_steps / len(recs['train']))
  out['train_clips'], out['val_clips'] = len(recs['train']), len(recs['val'])
  _say(f'[layout] rows of {cfg.data.seq_len}: an S2T row is [S2T] <aud> {T} codes </aud> <txt> transcript '
       f'</txt> [PAD]: room for {room} transcript tokens')
  _say(f'  transcript tokens per clip ({len(n_tok)} clips): {_fmt(out["transcript_tokens"])}; cut at the room: '
       f'{out["transcript_cut_share"]:.2%}')
  _say(f'  words per transcript: {_fmt(out["transcript_words"])}; text tokens per word {out["tokens_per_word"]:.2f}')
  _say(f'  audio: {a.sample_rate / a.hop:g} mel frames/s / {2**a.downsamples} = {out["codes_per_second"]:g} codes/s; '
       f'{T} codes = {a.seconds:g} s per clip')
  _say(f'  speech extent (codes before the padding code {silence}): {_fmt(out["speech_codes"])}; seconds '
       f'{_fmt(out["speech_seconds"])}; padding {out["padding_share_of_codes"]:.1%} of the codes; '
       f'{out["speech_codes_per_word"]:.2f} speech codes per word')
  _say(f'  clips longer than {a.seconds:g} s skipped at prepare (never cut): {skipped["too_long"]} of '
       f'{skipped["read"]} read ({out["too_long_share"]:.1%})')
  _say(f'  held-out words ({len(val_words)}): seen in training transcripts {out["val_words_seen_in_train"]:.1%}, '
       f'5+ times {out["val_words_seen_5x_in_train"]:.1%}; content words {out["val_content_share_of_words"]:.1%} '
       f'of them, seen {out["val_content_words_seen_in_train"]:.1%}; {len(train_counts)} word types in training')
  _say(f'  supervised tokens per row: {", ".join(f"{k} {v:.1f}" for k, v in per_row.items())}; mixture mean '
       f'{mean_sup:.1f}')
  _say(f'  S2T transcript tokens with clean speech: {out["s2t_conditional_transcript_share"]:.2%} of supervised '
       f'tokens ({out["s2t_any_mode_transcript_share"]:.2%} counting joint and dropped-speech S2T rows); '
       f'{rows_per_step:.2f} such rows per step, {out["s2t_conditional_rows_in_run"]:.0f} in '
       f'{cfg.train.num_steps} steps = {out["s2t_conditional_epochs_in_run"]:.2f} passes over the '
       f'{len(recs["train"])} training clips')
  return out


# -------------------------------------------------------------------------------------------------- probe


def _batched_dtw(a_FK, b_NGK, lens_N) -> np.ndarray:
  """DTW cost of a against each b (mean |difference| over features, summed on the cheapest monotone
  path, over F + G): [N]."""
  F = len(a_FK)
  cost = np.abs(a_FK[None, :, None, :] - b_NGK[:, None, :, :]).mean(-1)  # [N, F, G]
  N, _, G = cost.shape
  D = np.full((N, F + 1, G + 1), np.inf)
  D[:, 0, 0] = 0.0
  for i in range(1, F + 1):
    for j in range(1, G + 1):
      D[:, i, j] = cost[:, i - 1, j - 1] + np.minimum(np.minimum(D[:, i - 1, j], D[:, i, j - 1]), D[:, i - 1, j - 1])
  return D[np.arange(N), F, lens_N] / (F + lens_N)


def _dtw_matrix(seqs) -> np.ndarray:
  lens = np.array([len(x) for x in seqs])
  pad = np.zeros((len(seqs), lens.max(), seqs[0].shape[1]))
  for i, x in enumerate(seqs):
    pad[i, :len(x)] = x
  return np.stack([_batched_dtw(x, pad, lens) for x in seqs])


def _resample(x_FK, steps=8) -> np.ndarray:
  src = np.linspace(0, len(x_FK) - 1, steps)
  return np.stack([np.interp(src, np.arange(len(x_FK)), x_FK[:, k]) for k in range(x_FK.shape[1])], 1).reshape(-1)


def _lr_predict(x, y, train, test) -> np.ndarray:
  from sklearn import linear_model, pipeline, preprocessing  # pylint: disable=import-outside-toplevel
  clf = pipeline.make_pipeline(preprocessing.StandardScaler(), linear_model.LogisticRegression(max_iter=5000))
  clf.fit(x[train], y[train])
  return clf.predict(x[test])


def _nn_predict(dist, y, train, test) -> np.ndarray:
  return y[train][dist[np.ix_(test, train)].argmin(1)]


def probe_part(ctx, words=None) -> dict:
  import concurrent.futures  # pylint: disable=import-outside-toplevel
  from tmdm.datasets import audio, image  # pylint: disable=import-outside-toplevel
  from tmdm.tokenizers import audio as audio_tok  # pylint: disable=import-outside-toplevel
  a, e = ctx.cfg.audio, ctx.cfg.eval
  words = list(words or (image.NUMBER_WORDS + PROBE_WORDS))
  voices = [v.strip() for v in a.voices.split(',') if v.strip()]
  speeds = sorted({int(a.speeds[0]), int(e.t2s_speed), int(a.speeds[1])})
  jobs = [(w, v, sp) for w in words for v in voices for sp in speeds]
  samples = int(round(a.seconds * a.sample_rate))
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as ex:  # as generate.file_conditions prepares a clip
    waves = list(ex.map(lambda job: audio.condition(*audio.espeak(*job), a.sample_rate), jobs))
  waves = audio_tok.fit_length([wv[:samples] for wv in waves], samples)
  y = np.array([words.index(j[0]) for j in jobs])
  voice = np.array([voices.index(j[1]) for j in jobs])
  speed = np.array([j[2] for j in jobs])
  tok = ctx.tokenizer('audio')
  codes = tok.encode(waves)  # [N, T]
  mels = tok.log_mel(waves)  # [N, F, M]
  dec = tok.decode_mel(codes)
  r = tok.cfg.frames // tok.tokens_per_item
  vectors = np.asarray(tok._fsq.indices_to_codes(codes))  # pylint: disable=protected-access  [N, T, D]
  pool = lambda m: m[:, :m.shape[1] // r * r].reshape(m.shape[0], -1, r, m.shape[2]).mean(2)  # to the codes' rate
  mels_p, dec_p = pool(mels), pool(dec)
  spans = []
  for m in mels:  # speech span in frames (evaluation.measures.trim_silence's rule), then in codes
    energy = m.mean(-1)
    loud = np.nonzero(energy >= energy.max() - 4.0)[0]
    spans.append((loud[0] // r, loud[-1] // r + 1))
  feats = {
      'codes/histogram': np.stack([np.bincount(c[lo:hi], minlength=tok.codebook_size) for c, (lo, hi) in zip(codes, spans)]),
      'codes/vectors8': np.stack([_resample(v[lo:hi]) for v, (lo, hi) in zip(vectors, spans)]),
      'logmel/vectors8': np.stack([_resample(m[lo:hi]) for m, (lo, hi) in zip(mels_p, spans)]),
      'decoded/vectors8': np.stack([_resample(m[lo:hi]) for m, (lo, hi) in zip(dec_p, spans)]),
  }
  seqs = {'codes/dtw_nn': [v[lo:hi] for v, (lo, hi) in zip(vectors, spans)],
          'logmel/dtw_nn': [m[lo:hi] for m, (lo, hi) in zip(mels_p, spans)],
          'decoded/dtw_nn': [m[lo:hi] for m, (lo, hi) in zip(dec_p, spans)]}
  dists = {k: _dtw_matrix(v) for k, v in seqs.items()}
  span_codes = np.array([hi - lo for lo, hi in spans])
  folds = {'leave_one_voice_out': [(voice != v, voice == v) for v in range(len(voices))],
           'held_out_speed': [(speed != int(e.t2s_speed), speed == int(e.t2s_speed))]}
  number = y < len(image.NUMBER_WORDS) if words[:10] == list(image.NUMBER_WORDS) else np.zeros_like(y, bool)
  out = {'words': len(words), 'voices': len(voices), 'speeds': speeds, 'clips': len(jobs), 'chance': 1 / len(words),
         'span_codes': _stats(span_codes), 'distinct_codes_used': int(len(np.unique(np.concatenate(
             [c[lo:hi] for c, (lo, hi) in zip(codes, spans)]))))}
  for split, fs in folds.items():
    for name in list(feats) + list(dists):
      accs, num_hits, num_n = [], 0.0, 0
      for train, test in fs:
        train, test = np.nonzero(train)[0], np.nonzero(test)[0]
        pred = (_lr_predict(feats[name], y, train, test) if name in feats else
                _nn_predict(dists[name], y, train, test))
        accs.append(float(np.mean(pred == y[test])))
        num_hits += float(np.sum((pred == y[test])[number[test]]))
        num_n += int(number[test].sum())
      out[f'{split}/{name}'] = float(np.mean(accs))
      out[f'{split}/{name}/fold_min'] = float(np.min(accs))
      out[f'{split}/{name}/folds'] = accs  # leave_one_voice_out: in the order of audio.voices
      if num_n:
        out[f'{split}/{name}/number_words'] = num_hits / num_n
  _say(f'[probe] {len(words)} words x {len(voices)} voices x speeds {speeds} = {len(jobs)} clips; speech span '
       f'{_fmt(out["span_codes"])} codes; {out["distinct_codes_used"]} distinct codes in the spans; chance '
       f'{out["chance"]:.3f}')
  for split in folds:
    for name in list(feats) + list(dists):
      extra = f', number words {out[f"{split}/{name}/number_words"]:.3f}' if f'{split}/{name}/number_words' in out else ''
      _say(f'  {split:20s} {name:18s} accuracy {out[f"{split}/{name}"]:.3f} (worst fold '
           f'{out[f"{split}/{name}/fold_min"]:.3f}){extra}')
  return out


# --------------------------------------------------------------------------------------------------- main


def _contexts(workdir, steps, overrides=()):
  """A generate.Context per checkpoint step (the newest when steps is empty); one Setup for all."""
  from tmdm.generation import generate  # pylint: disable=import-outside-toplevel
  from tmdm.training import setup as setup_lib, state as train_state  # pylint: disable=import-outside-toplevel
  cfg, ckpt, latest = generate.checkpoint_config(workdir, overrides)
  generate.fit_mesh(cfg)
  s = setup_lib.build(cfg, with_optimizer=False)
  abstract = train_state.abstract_params(s.model, s.sharder, s.seq_len)
  try:
    for step in steps or [latest]:
      params, step, _ = ckpt.restore_params(abstract, ema=cfg.sample.ema, step=step)
      yield generate.Context(s, params, step)
  finally:
    ckpt.close()


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  p.add_argument('--workdir', required=True, help='a training workdir (config.json, checkpoints/)')
  p.add_argument('--parts', default='nll,layout,probe')
  p.add_argument('--steps', default='', help='checkpoint steps for nll (default: the newest)')
  p.add_argument('--split', default='val', help='nll on the audio data\'s val or train split')
  p.add_argument('--n', type=int, default=0, help='nll: the first n records (0: all)')
  p.add_argument('--draws', type=int, default=5, help='nll: derangements for "other"')
  p.add_argument('--out', default='', help='write the figures as JSON here')
  args = p.parse_args(argv)
  parts = [x.strip() for x in args.parts.split(',') if x.strip()]
  steps = [int(x) for x in args.steps.split(',') if x.strip()]
  results = {}
  for i, ctx in enumerate(_contexts(args.workdir, steps)):
    if 'nll' in parts:
      scorer = results.setdefault('_scorer', _Scorer(ctx.s))
      results[f'nll/{ctx.step}'] = nll_part(ctx, scorer, split=args.split, n=args.n, draws=args.draws)
    if i == 0 and 'layout' in parts:
      results['layout'] = layout_part(ctx)
    if i == 0 and 'probe' in parts:
      results['probe'] = probe_part(ctx)
  results.pop('_scorer', None)
  if args.out:
    with open(args.out, 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == '__main__':
  main()
