"""Audio-text pairs: sentences of the text corpora spoken by espeak-ng (exact transcripts), a user's
own recordings, and `prepare_audio`, which trains the audio tokenizer and writes the dataset
(data/store.py format, fields 'text' and 'audio').

Sources (entries of config `audio.sources`):
  espeak:CORPUS  sentences (audio.min_words..max_words words) of a text corpus (datasets/text.py
                 names: fortunes, kjv, gcide, txt:GLOB, jsonl:PATH), each spoken by espeak-ng with
                 a voice from audio.voices at a speed drawn from audio.speeds
  jsonl:PATH     a user's clips, one {"audio": wav path, "text": transcript} per line (paths relative to PATH)
  parquet:GLOB   the same as columns "audio" (WAV bytes, or a path relative to the file) and "text"
Every clip is mono float32 at audio.sample_rate, peak-normalized to PEAK, padded with silence to
audio.seconds; longer clips are skipped (cropping would cut words out of the transcript).
Bad records of a user's files (unreadable, silent or too long clips among them) follow records.py's
policy; espeak-ng clips that fail or run too long are skipped and counted.

Legend: N clips, S samples.
"""

import concurrent.futures
import glob
import io
import os
import re
import shutil
import subprocess
import wave

import numpy as np
import scipy.io.wavfile
import scipy.signal

from tmdm.data import store
from tmdm.datasets import pairs, records, text
from tmdm.tokenizers import audio as audio_tok, registry as tok_registry

TOKENIZER_DIR = 'tokenizer'  # The trained tokenizer, relative to the dataset root.
LISTEN_DIR = 'listen'  # Held-out clips as WAVs: original, Griffin-Lim of its mel, token round trip.
PEAK = 0.9
SENTENCE_END = re.compile(r'(?<=[.!?;:])\s+')
SPEAKABLE = re.compile(r"^[A-Za-z][A-Za-z ,.;:!?'-]*$")  # No digits, markup or quotes to read out oddly.


def read_wav(data) -> tuple[np.ndarray, int]:
  """A WAV (path or bytes) -> (mono float32 in [-1, 1], rate). espeak-ng's --stdout header carries
  placeholder sizes, so PCM-16 is parsed from the 'data' chunk directly when the reader refuses it."""
  if isinstance(data, bytes):
    pos = data.find(b'data')
    rate = int.from_bytes(data[24:28], 'little')
    if data[:4] != b'RIFF' or pos < 0 or int.from_bytes(data[34:36], 'little') != 16:
      raise ValueError('not a 16-bit PCM WAV')
    pcm = np.frombuffer(data[pos + 8:len(data) - (len(data) - pos - 8) % 2], '<i2')
    return pcm.astype(np.float32) / 32768.0, rate
  rate, pcm = scipy.io.wavfile.read(data)
  pcm = np.asarray(pcm)
  if pcm.dtype.kind in 'iu':
    info = np.iinfo(pcm.dtype)
    pcm = (pcm.astype(np.float32) - (info.max + info.min + 1) / 2) / ((info.max - info.min + 1) / 2)
  pcm = pcm.astype(np.float32)
  return (pcm.mean(axis=1) if pcm.ndim == 2 else pcm), int(rate)


def write_wav(path, wave_S, rate: int):
  pcm = (np.clip(np.asarray(wave_S), -1, 1) * 32767).astype('<i2')
  with wave.open(path, 'wb') as f:
    f.setnchannels(1)
    f.setsampwidth(2)
    f.setframerate(rate)
    f.writeframes(pcm.tobytes())


def condition(wave_S, rate: int, target_rate: int):
  """Resample to target_rate and peak-normalize; None for silence."""
  if rate != target_rate:
    g = np.gcd(rate, target_rate)
    wave_S = scipy.signal.resample_poly(wave_S, target_rate // g, rate // g).astype(np.float32)
  peak = float(np.max(np.abs(wave_S))) if len(wave_S) else 0.0
  if not np.isfinite(peak) or peak < 1e-3:
    return None
  return (wave_S * (PEAK / peak)).astype(np.float32)


def sentences(corpus, min_words, max_words):
  """Short speakable sentences and clauses of a text corpus, without repeats."""
  seen = set()
  for doc in text.read_corpus(corpus):
    # Lines are joined first: fortunes wrap prose at ~70 columns, and a line is rarely a sentence.
    for s in SENTENCE_END.split(' '.join(doc.split())):
      s = s.strip(' ,;:-')
      if min_words <= len(s.split()) <= max_words and SPEAKABLE.match(s) and s.lower() not in seen:
        seen.add(s.lower())
        yield s


def espeak(sentence, voice, speed):
  out = subprocess.run(['espeak-ng', '-v', voice, '-s', str(speed), '--stdout', sentence], capture_output=True,
                       check=False, timeout=60)
  if out.returncode or len(out.stdout) < 100:
    raise OSError(f'espeak-ng failed on {sentence!r}: {out.stderr.decode(errors="replace")[:200]}')
  return read_wav(out.stdout)


def read_espeak(corpus, cfg, rng, counts, progress):
  """(transcript, waveform) pairs; sentences are shuffled before the cap so sources are not just their start."""
  if shutil.which('espeak-ng') is None:
    raise text.MissingCorpus('espeak-ng is missing: install it with `apt-get install espeak-ng`')
  pool = list(sentences(corpus, cfg.min_words, cfg.max_words))
  rng.shuffle(pool)
  # Spoken clips that run past `seconds` are skipped; synthesize a margin so the cap is still met.
  pool = pool[:int(cfg.max_items * 1.3) + 16] if cfg.max_items else pool
  voices = [v.strip() for v in cfg.voices.split(',') if v.strip()]
  jobs = [(s, voices[rng.integers(len(voices))], int(rng.integers(cfg.speeds[0], cfg.speeds[1] + 1))) for s in pool]
  with concurrent.futures.ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as ex:
    futures = [ex.submit(espeak, *job) for job in jobs]
    try:
      for (sentence, _, _), fut in zip(jobs, progress(futures, desc=f'speaking {corpus}', unit='clip')):
        counts['read'] += 1
        try:
          wave_S, rate = fut.result()
        except (OSError, ValueError, subprocess.TimeoutExpired):
          counts['unreadable_audio'] += 1
          continue
        yield sentence, wave_S, rate
    finally:  # The caller stops at its cap: drop the clips not yet spoken.
      for fut in futures:
        fut.cancel()


def load_user_clip(ref):
  """A user's WAV: a path, or the bytes of a Parquet row (any WAV scipy reads, not only espeak-ng's)."""
  return read_wav(io.BytesIO(ref) if isinstance(ref, bytes) else ref)


def user_clips(name, rows, counts, tally):
  """(transcript, waveform, rate, where, shown) of (where, line or row, file) records of a user's file;
  bad ones counted and tallied (records.py)."""
  for where, raw, path in rows:
    counts['read'] += 1
    tally.seen(name)
    got = records.parse_line('audio', raw, where) if isinstance(raw, str) else records.check('audio', raw, where)
    if not isinstance(got, records.Bad):
      value, transcript = got
      ref, _, shown = records.media_ref(value, records.relative_to(path), os.path.join)
      try:
        wave_S, rate = load_user_clip(ref)
        yield transcript.strip(), wave_S, rate, where, shown
        continue
      except (OSError, ValueError, TypeError) as e:
        got = records.unreadable('audio', where, shown, e)
    counts[got.skip] += 1
    tally.add(name, got)


def read_clips_jsonl(path, counts, tally, name):
  """User clips: {"audio": wav path, "text": transcript} per line; paths relative to the file's folder."""
  if not os.path.isfile(path):
    raise text.MissingCorpus(f'{path} not found (expected a JSONL of {{"audio": wav path, "text": transcript}})')
  yield from user_clips(name, ((w, line, path) for w, line in text.jsonl_lines(path)), counts, tally)


def read_clips_parquet(pattern, counts, tally, name):
  """User clips as Parquet: "audio" (WAV bytes, or a path relative to the file) and "text" columns."""
  paths = sorted(glob.glob(pattern, recursive=True))
  if not paths:
    raise text.MissingCorpus(f'no files match {pattern!r}')
  rows = ((w, row, path) for path in paths for w, row in records.parquet_rows('audio', path, lambda p: open(p, 'rb')))
  yield from user_clips(name, rows, counts, tally)


def read_source(name, cfg, rng, counts, progress, tally=None):
  """(transcript, waveform, rate, where, shown) per clip; where and shown are None for espeak-ng's."""
  kind, _, arg = name.partition(':')
  if kind == 'espeak' and arg:
    return ((t, w, r, None, None) for t, w, r in read_espeak(arg, cfg, rng, counts, progress))
  tally = tally or records.Tally()
  if kind == 'jsonl' and arg:
    return read_clips_jsonl(arg, counts, tally, name)
  if kind == 'parquet' and arg:
    return read_clips_parquet(arg, counts, tally, name)
  raise text.MissingCorpus(f'unknown audio source {name!r} (choices: espeak:CORPUS, jsonl:PATH, parquet:GLOB)')


def check_clip(wave_S, rate, cfg):
  """audio.condition and the length check: (the clip at cfg.sample_rate, None), or (None, (reason, what))."""
  wave_S = condition(wave_S, rate, cfg.sample_rate)
  if wave_S is None:
    return None, ('silent', 'is silent')
  if len(wave_S) > int(round(cfg.seconds * cfg.sample_rate)):
    return None, ('too_long', f'is {len(wave_S) / cfg.sample_rate:.2f} s, longer than audio.seconds={cfg.seconds}')
  return wave_S, None


def write_listening(folder, tokenizer: audio_tok.AudioTokenizer, waves_NS, transcripts):
  """NN_original.wav, NN_mel.wav (Griffin-Lim of the true mel: the vocoder's ceiling), NN_tokens.wav."""
  os.makedirs(folder, exist_ok=True)
  rate = tokenizer.cfg.sample_rate
  mel_only = tokenizer.mel_to_wave(tokenizer.log_mel(waves_NS))
  round_trip = tokenizer.decode(tokenizer.encode(waves_NS))
  with open(os.path.join(folder, 'transcripts.txt'), 'w') as f:
    for i, line in enumerate(transcripts):
      write_wav(os.path.join(folder, f'{i:02d}_original.wav'), waves_NS[i], rate)
      write_wav(os.path.join(folder, f'{i:02d}_mel.wav'), mel_only[i], rate)
      write_wav(os.path.join(folder, f'{i:02d}_tokens.wav'), round_trip[i], rate)
      f.write(f'{i:02d}\t{line}\n')


def prepare_audio(root, *, text_tokenizer: text.TextTokenizer, cfg, progress=None, log=print, max_bad_fraction=1.0):
  """Gathers clips, trains the audio tokenizer on the train split, writes the dataset; returns the
  manifest. cfg: the config's `audio` section (ConfigDict); max_bad_fraction: records.py's policy
  (`tmdm prepare` passes data.max_bad_fraction)."""
  progress = progress or (lambda it, **_: it)
  rng = np.random.default_rng(cfg.seed)
  counts = {k: 0 for k in ('read', 'unreadable_audio', 'silent_audio', 'too_long', 'empty_caption', 'bad_line')}
  tally = records.Tally(max_bad_fraction, log)
  samples = int(round(cfg.seconds * cfg.sample_rate))
  clips, per_source = [], {}
  for name in [s.strip() for s in cfg.sources.split(',') if s.strip()]:
    got = 0
    for transcript, wave_S, rate, where, shown in read_source(name, cfg, rng, counts, progress, tally):
      wave_S, problem = check_clip(wave_S, rate, cfg)
      if problem:
        bad = records.unusable('audio', where, shown, *problem)
        counts[bad.skip] += 1
        if where is not None:
          tally.add(name, bad)
      else:
        clips.append((transcript, wave_S))
        got += 1
      if cfg.max_items and got >= cfg.max_items:
        log(f'audio source {name!r}: stopped at audio.max_items={cfg.max_items} clips; the rest of the source was '
            'not read (set --config.audio.max_items=0 to read all of it)')
        break
    tally.check(name)
    per_source[name] = got
  ids = text_tokenizer.encode([t for t, _ in clips]) if clips else []
  kept = [(t, w, x) for (t, w), x in zip(clips, ids) if len(x)]
  counts['empty_caption'] += len(clips) - len(kept)
  if not kept:
    raise text.MissingCorpus(f'no usable audio-text pairs in {cfg.sources!r} (skipped: {counts})')
  oov = text.oov_report(text.oov_counts(text_tokenizer, [t for t, _, _ in kept]))
  log(text.oov_line('audio transcripts', oov))
  os.makedirs(root, exist_ok=True)
  pairs.copy_text_tokenizer(text_tokenizer, root)
  splits = {'train': [k for k in kept if not pairs.is_val(k[0], cfg.val_fraction)],
            'val': [k for k in kept if pairs.is_val(k[0], cfg.val_fraction)]}
  stack = lambda part: audio_tok.fit_length([w for _, w, _ in part], samples)

  if cfg.tokenizer_path:
    tokenizer, tok_file = tok_registry.load(cfg.tokenizer_path), os.path.abspath(cfg.tokenizer_path)
  else:
    tok_cfg = audio_tok.AudioConfig(sample_rate=cfg.sample_rate, seconds=cfg.seconds, n_fft=cfg.n_fft, hop=cfg.hop,
                                    n_mels=cfg.n_mels, levels=tuple(cfg.levels), downsamples=cfg.downsamples,
                                    width=cfg.width, griffin_lim_iters=cfg.griffin_lim_iters)
    tokenizer = audio_tok.train(stack(splits['train']), tok_cfg, steps=cfg.train_steps, batch_size=cfg.batch_size,
                                lr=cfg.lr, seed=cfg.seed, progress=progress)
    tokenizer.save(os.path.join(root, TOKENIZER_DIR))
    tok_file = TOKENIZER_DIR

  entries, quality = {}, {}
  for split, part in splits.items():
    codes = []
    for lo in progress(range(0, len(part), cfg.encode_batch), desc=f'encoding {split} clips', unit='batch'):
      codes.append(tokenizer.encode(stack(part[lo:lo + cfg.encode_batch])))
    codes = np.concatenate(codes) if codes else np.zeros((0, tokenizer.tokens_per_item), np.int32)
    rows = [{'text': x, 'audio': c} for (_, _, x), c in zip(part, codes)]
    entries[split] = [store.write_shard(os.path.join(root, split, '00000'), rows, ['text', 'audio'])]
    if split == 'val' and part and isinstance(tokenizer, audio_tok.AudioTokenizer):
      waves = stack(part)
      dist = audio_tok.logmel_l1(tokenizer.log_mel(waves), tokenizer.decode_mel(codes))
      quality = {'val_logmel_l1': round(float(dist.mean()), 4), 'val_items': len(part)}
      n = min(cfg.listen, len(part))
      if n:
        write_listening(os.path.join(root, LISTEN_DIR), tokenizer, waves[:n], [t for t, _, _ in part[:n]])
  log(f'audio tokenizer {tokenizer.name}: {quality}; skipped {counts}')
  source = {'sources': per_source, 'items': len(kept), 'skipped': counts, 'tokenizer_quality': quality,
            'settings': pairs.settings_of(cfg, text_tokenizer.sha256), 'oov': oov}
  if tally.bad:
    source['bad_records'] = tally.summary()
  return store.write_manifest(root, modality='audio', fields=['text', 'audio'],
                              tokenizers={'text': pairs.text_tokenizer_entry(text_tokenizer),
                                          'audio': tokenizer.manifest_entry(tok_file)},
                              splits=entries, source=source)
