"""The sources of `tmdm prepare` as ordered events: what the Beam pipeline (datasets/beam.py) reads in
parallel and what its driver reads in order for the tokenizer sample.

The in-process builders (text.py, image.py, audio.py) read each source as one sequence. To give the
same dataset byte for byte, every record read here carries an order key (source, unit, position):
its place in that sequence (a unit is one file of a glob, or a whole built-in corpus). The pipeline
only ever sorts by these keys, so its output does not depend on how the work was split.

A reader turns a task into events, plain tuples (kind, key, value):
  (ITEM, key, payload)   a record (text: the document; pairs: a dict, see `pair_payload`)
  (SKIP, key, reason)    a skipped record, counted per reason: a records.Bad for a user's record (also
                         tallied per source, records.py's policy), a name for the built-ins' skips
  (TASK, key, job)       work for the parallel decode step (an image to open, a clip to speak or read)
  (TALLY, key, counts)   the skip and read counts of a source replayed in-process (built-ins)
Built-in image sources and espeak planning share one random generator across sources in-process, so
each of those is one sequential task; user files (txt, JSONL, Parquet) are one task per file. Local paths use
the standard library (as the in-process readers do); gs:// and other schemes go through Beam's
FileSystems (`pip install apache-beam[gcp]` for gs://).
"""

import glob
import io
import os
import posixpath
import shutil
import subprocess

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from PIL import Image

from tmdm.datasets import audio, image, pairs, records, text
from tmdm.errors import MissingCorpus

ITEM, SKIP, TASK, TALLY = 'item', 'skip', 'task', 'tally'
TEXT_SKIPS = text.SKIPS  # text.prepare_text's order
IMAGE_SKIPS = ('read', 'unreadable_image', 'empty_caption', 'bad_line', 'duplicate')  # image.prepare_image's order
AUDIO_SKIPS = ('read', 'unreadable_audio', 'silent_audio', 'too_long', 'empty_caption', 'bad_line')  # audio's


# Files: local through the standard library (byte-identical to the in-process readers), else Beam.

def is_remote(path: str) -> bool:
  return FileSystems.get_scheme(path) not in (None, 'file')


def match(pattern: str) -> list:
  """Sorted paths matching a glob (`**` recursive locally, as text.read_files)."""
  if is_remote(pattern):
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
  return sorted(glob.glob(pattern, recursive=True))


def has_glob(path: str) -> bool:
  return any(c in path for c in '*?[')


def exists(path: str) -> bool:
  return FileSystems.exists(path) if is_remote(path) else os.path.isfile(path)


def open_binary(path: str):
  if is_remote(path):
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
  return open(path, 'rb')


def read_bytes(path: str) -> bytes:
  with open_binary(path) as f:
    return f.read()


def folder_of(path: str) -> str:
  """What relative paths inside a JSONL are relative to (image.read_pairs_jsonl: its absolute folder)."""
  return posixpath.dirname(path) if is_remote(path) else os.path.dirname(os.path.abspath(path))


def join(folder: str, rel: str) -> str:
  return posixpath.join(folder, rel) if is_remote(folder) else os.path.join(folder, rel)


def jsonl_lines(path):
  """(FILE:LINE, line) of the non-blank lines, as text mode reads them (universal newlines). Bytes
  that are not UTF-8 come back as surrogates, for records.parse_line to name."""
  with io.TextIOWrapper(open_binary(path), encoding='utf-8', errors='surrogateescape') as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        yield f'{path}:{n}', line


def user_records(file_kind, modality, path):
  """(where, line or row) of a user's JSONL or Parquet file (records.py judges each)."""
  if file_kind == 'parquet':
    yield from records.parquet_rows(modality, path, open_binary)
  else:
    yield from jsonl_lines(path)


def user_files(kind: str, arg: str, modality: str, what: str) -> list:
  """The files of a `jsonl:` source (one path, or (Beam only) a glob of many) or of a `parquet:` glob;
  Parquet files' columns are checked here, before anything is built."""
  paths = match(arg) if has_glob(arg) or kind == 'parquet' else [arg]
  if not paths:
    raise MissingCorpus(f'no files match {arg!r}')
  for path in paths:
    if not exists(path):
      raise MissingCorpus(f'{path} not found (expected a JSONL of {what})')
    if kind == 'parquet':
      records.parquet_schema(modality, path, open_binary)
  return paths


def split_sources(spec: str) -> list:
  return [s.strip() for s in spec.split(',') if s.strip()]


# Text: the readers of text.py, per task.

def text_tasks(sources) -> list:
  """(kind, key, argument) tasks: a built-in corpus is one, txt:GLOB one per file, jsonl and parquet one
  per file."""
  tasks = []
  for s, name in enumerate(sources):
    kind, sep, arg = name.partition(':')
    if sep and kind == 'txt':
      paths = match(arg)
      if not paths:
        raise MissingCorpus(f'no files match {arg!r}')
      tasks += [('txt', (s, 0, p), path) for p, path in enumerate(paths)]
    elif sep and kind in ('jsonl', 'parquet'):
      files = user_files(kind, arg, 'text', 'objects with a "text" field')
      tasks += [(kind, (s, u, 0), path) for u, path in enumerate(files)]
    elif name in text.CORPORA:
      tasks.append(('corpus', (s, 0, 0), name))
    else:
      raise MissingCorpus(f'unknown text corpus {name!r} (choices: {", ".join(text.CORPORA)}, txt:GLOB, jsonl:PATH, '
                          'parquet:GLOB)')
  return tasks


def read_text_task(task):
  kind, (s, u, p), arg = task
  if kind == 'corpus':
    for i, doc in enumerate(text.CORPORA[arg]()):
      yield ITEM, (s, 0, i), doc
  elif kind == 'txt':
    with open_binary(arg) as f:
      doc = text.decode_utf8(f.read(), arg).strip()  # A file that is not UTF-8 stops the build, as in text.py.
    yield (ITEM, (s, 0, p), doc) if doc else (SKIP, (s, 0, p), 'empty_text')
  else:
    for n, (where, raw) in enumerate(user_records(kind, 'text', arg), 1):
      got = records.parse_line('text', raw, where) if isinstance(raw, str) else records.check('text', raw, where)
      yield (SKIP, (s, u, n), got) if isinstance(got, records.Bad) else (ITEM, (s, u, n), got[0])


# Pairs: what image and audio records carry through the pipeline.

def pair_payload(split_key: str, caption: str, media: np.ndarray, label: int = -1) -> dict:
  """split_key decides train/val (pairs.is_val); media: uint8 HWC image or float32 waveform."""
  return {'split_key': split_key, 'caption': caption, 'media': media, 'label': int(label)}


def split_of(split_key: str, fraction: float) -> str:
  return 'val' if pairs.is_val(split_key, fraction) else 'train'


# Image: image.py's sources.

def image_tasks(sources) -> list:
  """Built-in sources (digits, adwaita) are one task: image.prepare_image draws their captions from one
  generator in source order. Each user file (jsonl:PATH, folder:DIR, parquet:GLOB) is one task."""
  builtin, tasks = [], []
  for s, name in enumerate(sources):
    kind, sep, arg = name.partition(':')
    if sep and kind in ('jsonl', 'folder', 'parquet'):
      path = os.path.join(arg, 'captions.jsonl') if kind == 'folder' else arg
      files = user_files(kind, path, 'image', '{"image": path, "caption": text}')
      tasks += [(kind, (s, u, 0), f) for u, f in enumerate(files)]
    elif name in image.IMAGE_SOURCES:
      builtin.append((s, name))
    else:
      raise MissingCorpus(f'unknown image source {name!r} (choices: {", ".join(image.IMAGE_SOURCES)}, '
                          'jsonl:PATH, folder:DIR, parquet:GLOB)')
  return ([('builtin', (builtin[0][0], 0, 0), builtin)] if builtin else []) + tasks


def _user_events(modality, task):
  """A user file's records as events: bad ones SKIPs, good ones decode TASKs
  (where, what to read, how messages show it, caption, split key)."""
  kind, (s, u, _), path = task
  folder = folder_of(path)
  for n, (where, raw) in enumerate(user_records(kind, modality, path), 1):
    got = records.parse_line(modality, raw, where) if isinstance(raw, str) else records.check(modality, raw, where)
    if isinstance(got, records.Bad):
      yield SKIP, (s, u, n), got
    else:
      ref, split_key, shown = records.media_ref(got[0], folder, join)
      yield TASK, (s, u, n), ('user', where, ref, shown, got[1].strip(), split_key)


def read_image_task(task, cfg):
  if task[0] == 'builtin':
    yield from _replay_builtin_images(task[2], cfg)
  else:
    yield from _user_events('image', task)


def _replay_builtin_images(sources, cfg):
  """image.prepare_image's loop over the built-in sources: one generator, the cap per source, the
  reader's own counts (emitted as a TALLY per source)."""
  rng = np.random.default_rng(cfg.seed)
  for s, name in sources:
    counts = dict.fromkeys(IMAGE_SKIPS, 0)
    got = 0
    for item in image.read_source(name, cfg.size, rng, counts, cfg.fit, digit_captions=cfg.digit_captions):
      if not item.caption.strip():
        counts['empty_caption'] += 1
        continue
      yield ITEM, (s, 0, got), pair_payload(item.key, item.caption, item.image_HWC, item.label)
      got += 1
      if cfg.max_items and got >= cfg.max_items:
        break
    yield TALLY, (s, 0, 0), counts


def decode_image(key, job, size_fit):
  _, where, ref, shown, caption, split_key = job
  try:
    pixels = image.load_user_image(ref if isinstance(ref, bytes) else read_bytes(ref), *size_fit)
  except (OSError, ValueError, TypeError, Image.DecompressionBombError) as e:
    return SKIP, key, records.unreadable('image', where, shown, e)
  return ITEM, key, pair_payload(split_key, caption, pixels)


# Audio: audio.py's sources.

def audio_tasks(sources) -> list:
  """The espeak sources are one planning task (audio.prepare_audio draws sentences, voices and speeds
  from one generator in source order); each user file is one task."""
  spoken, tasks = [], []
  for s, name in enumerate(sources):
    kind, _, arg = name.partition(':')
    if kind == 'espeak' and arg:
      spoken.append((s, arg))
    elif kind in ('jsonl', 'parquet') and arg:
      files = user_files(kind, arg, 'audio', '{"audio": wav path, "text": transcript}')
      tasks += [(kind, (s, u, 0), f) for u, f in enumerate(files)]
    else:
      raise MissingCorpus(f'unknown audio source {name!r} (choices: espeak:CORPUS, jsonl:PATH, parquet:GLOB)')
  return ([('espeak', (spoken[0][0], 0, 0), spoken)] if spoken else []) + tasks


def read_audio_task(task, cfg):
  if task[0] == 'espeak':
    yield from _plan_espeak(task[2], cfg)
  else:
    yield from _user_events('audio', task)


def _plan_espeak(sources, cfg):
  """audio.read_espeak's draws, source after source: the shuffled, capped sentence pool and a voice and
  speed per sentence. Speaking them is the decode step (parallel)."""
  if shutil.which('espeak-ng') is None:
    raise MissingCorpus('espeak-ng is missing: install it with `apt-get install espeak-ng`')
  rng = np.random.default_rng(cfg.seed)
  voices = [v.strip() for v in cfg.voices.split(',') if v.strip()]
  for s, corpus in sources:
    pool = list(audio.sentences(corpus, cfg.min_words, cfg.max_words))
    rng.shuffle(pool)
    pool = pool[:int(cfg.max_items * 1.3) + 16] if cfg.max_items else pool
    jobs = [(x, voices[rng.integers(len(voices))], int(rng.integers(cfg.speeds[0], cfg.speeds[1] + 1))) for x in pool]
    for j, job in enumerate(jobs):
      yield TASK, (s, 0, j), ('espeak',) + job


def decode_audio(key, job, cfg):
  """Speaks or reads one clip, then audio.check_clip, as audio.prepare_audio."""
  user = job[0] == 'user'
  try:
    if user:
      _, where, ref, shown, transcript, _ = job
      wave_S, rate = audio.load_user_clip(read_bytes(ref) if isinstance(ref, str) and is_remote(ref) else ref)
    else:
      _, transcript, voice, speed = job
      wave_S, rate = audio.espeak(transcript, voice, speed)
  except (OSError, ValueError, TypeError, subprocess.TimeoutExpired) as e:
    return SKIP, key, records.unreadable('audio', where, shown, e) if user else 'unreadable_audio'
  wave_S, problem = audio.check_clip(wave_S, rate, cfg)
  if problem:
    return SKIP, key, records.unusable('audio', where, shown, *problem) if user else records.UNUSABLE[problem[0]]
  return ITEM, key, pair_payload(transcript, transcript, wave_S)
