"""The sources of `tmdm prepare` as ordered events: what the Beam pipeline (datasets/beam.py) reads in
parallel and what its driver reads in order for the tokenizer sample.

The in-process builders (text.py, image.py, audio.py) read each source as one sequence. To give the
same dataset byte for byte, every record read here carries an order key (source, unit, position):
its place in that sequence (a unit is one file of a glob, or a whole built-in corpus). The pipeline
only ever sorts by these keys, so its output does not depend on how the work was split.

A reader turns a task into events, plain tuples (kind, key, value):
  (ITEM, key, payload)   a record (text: the document; pairs: a dict, see `pair_payload`)
  (SKIP, key, reason)    a bad record, counted per reason
  (TASK, key, job)       work for the parallel decode step (an image to open, a clip to speak or read)
  (TALLY, key, counts)   the skip and read counts of a source replayed in-process (built-ins)
Built-in image sources and espeak planning share one random generator across sources in-process, so
each of those is one sequential task; user files (txt, JSONL) are one task per file. Local paths use
the standard library (as the in-process readers do); gs:// and other schemes go through Beam's
FileSystems (`pip install apache-beam[gcp]` for gs://).
"""

import glob
import io
import json
import os
import posixpath
import shutil
import subprocess

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from PIL import Image

from tmdm.datasets import audio, image, pairs, text
from tmdm.errors import MissingCorpus

ITEM, SKIP, TASK, TALLY = 'item', 'skip', 'task', 'tally'
TEXT_SKIPS = ('read', 'empty_text', 'bad_line', 'duplicate', 'empty_tokens')  # Beam-only: text.py counts none.
IMAGE_SKIPS = ('read', 'unreadable_image', 'empty_caption', 'bad_line', 'duplicate')  # image.prepare_image's order
AUDIO_SKIPS = ('read', 'unreadable_audio', 'silent_audio', 'too_long', 'empty_caption', 'bad_line')  # audio's
NOT_BAD = ('read', 'duplicate')  # Counted, but not bad records (for data.beam_max_bad_fraction).


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
  """(line number, line) of the non-blank lines, as text mode reads them (universal newlines). Bytes
  that are not UTF-8 come back as surrogates, so that `undecodable` can count the line instead of the
  whole file failing."""
  with io.TextIOWrapper(open_binary(path), encoding='utf-8', errors='surrogateescape') as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        yield n, line


def undecodable(line: str) -> bool:
  return any('\udc80' <= c <= '\udcff' for c in line)


def jsonl_files(arg: str, what: str) -> list:
  """The files of a `jsonl:` source: one path, or (Beam only) a glob of many."""
  paths = match(arg) if has_glob(arg) else [arg]
  if not paths:
    raise MissingCorpus(f'no files match {arg!r}')
  for path in paths:
    if not exists(path):
      raise MissingCorpus(f'{path} not found (expected a JSONL of {what})')
  return paths


def split_sources(spec: str) -> list:
  return [s.strip() for s in spec.split(',') if s.strip()]


# Text: the readers of text.py, per task.

def text_tasks(sources) -> list:
  """(kind, key, argument) tasks: a built-in corpus is one, txt:GLOB one per file, jsonl one per file."""
  tasks = []
  for s, name in enumerate(sources):
    kind, sep, arg = name.partition(':')
    if sep and kind == 'txt':
      paths = match(arg)
      if not paths:
        raise MissingCorpus(f'no files match {arg!r}')
      tasks += [('txt', (s, 0, p), path) for p, path in enumerate(paths)]
    elif sep and kind == 'jsonl':
      tasks += [('jsonl', (s, u, 0), path) for u, path in enumerate(jsonl_files(arg, 'objects with a "text" field'))]
    elif name in text.CORPORA:
      tasks.append(('corpus', (s, 0, 0), name))
    else:
      raise MissingCorpus(f'unknown text corpus {name!r} (choices: {", ".join(text.CORPORA)}, txt:GLOB, jsonl:PATH)')
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
    for n, line in jsonl_lines(arg):
      yield _text_line(line, (s, u, n))


def _text_line(line, key):
  if undecodable(line):
    return SKIP, key, 'bad_line'
  try:
    doc = json.loads(line)['text']
  except (json.JSONDecodeError, KeyError, TypeError):
    return SKIP, key, 'bad_line'
  if not isinstance(doc, str):
    return SKIP, key, 'bad_line'
  return (ITEM, key, doc) if doc.strip() else (SKIP, key, 'empty_text')


# Pairs: what image and audio records carry through the pipeline.

def pair_payload(split_key: str, caption: str, media: np.ndarray, label: int = -1) -> dict:
  """split_key decides train/val (pairs.is_val); media: uint8 HWC image or float32 waveform."""
  return {'split_key': split_key, 'caption': caption, 'media': media, 'label': int(label)}


def split_of(split_key: str, fraction: float) -> str:
  return 'val' if pairs.is_val(split_key, fraction) else 'train'


# Image: image.py's sources.

def image_tasks(sources) -> list:
  """Built-in sources (digits, adwaita) are one task: image.prepare_image draws their captions from one
  generator in source order. Each user JSONL (jsonl:PATH, folder:DIR) is one task."""
  builtin, tasks = [], []
  for s, name in enumerate(sources):
    kind, sep, arg = name.partition(':')
    if sep and kind in ('jsonl', 'folder'):
      path = os.path.join(arg, 'captions.jsonl') if kind == 'folder' else arg
      files = jsonl_files(path, '{"image": path, "caption": text}')
      tasks += [('pairs', (s, u, 0), f) for u, f in enumerate(files)]
    elif name in image.IMAGE_SOURCES:
      builtin.append((s, name))
    else:
      raise MissingCorpus(f'unknown image source {name!r} (choices: {", ".join(image.IMAGE_SOURCES)}, '
                          'jsonl:PATH, folder:DIR)')
  return ([('builtin', (builtin[0][0], 0, 0), builtin)] if builtin else []) + tasks


def read_image_task(task, cfg):
  kind, (s, u, _), arg = task
  if kind == 'builtin':
    yield from _replay_builtin_images(arg, cfg)
    return
  folder = folder_of(arg)
  for n, line in jsonl_lines(arg):
    yield _image_line(line, (s, u, n), folder)


def _replay_builtin_images(sources, cfg):
  """image.prepare_image's loop over the built-in sources: one generator, the cap per source, the
  reader's own counts (emitted as a TALLY per source)."""
  rng = np.random.default_rng(cfg.seed)
  for s, name in sources:
    counts = dict.fromkeys(IMAGE_SKIPS, 0)
    got = 0
    for item in image.read_source(name, cfg.size, rng, counts, cfg.fit):
      if not item.caption.strip():
        counts['empty_caption'] += 1
        continue
      yield ITEM, (s, 0, got), pair_payload(item.key, item.caption, item.image_HWC, item.label)
      got += 1
      if cfg.max_items and got >= cfg.max_items:
        break
    yield TALLY, (s, 0, 0), counts


def _image_line(line, key, folder):
  """One line of a user JSONL, as image.read_pairs_jsonl judges it; good lines become decode TASKs."""
  if undecodable(line):
    return SKIP, key, 'bad_line'
  try:
    row = json.loads(line)
    image_path, caption = row.get('image') or row['file'], row['caption']
  except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
    return SKIP, key, 'bad_line'
  if not isinstance(caption, str) or not caption.strip():
    return SKIP, key, 'empty_caption'
  try:
    full = join(folder, image_path)
  except TypeError:
    return SKIP, key, 'unreadable_image'
  return TASK, key, (full, caption.strip())


def decode_image(key, job, size_fit):
  full, caption = job
  try:
    with Image.open(io.BytesIO(read_bytes(full))) as img:
      pixels = image.to_rgb(img, *size_fit)
  except (OSError, ValueError, TypeError, Image.DecompressionBombError):
    return SKIP, key, 'unreadable_image'
  return ITEM, key, pair_payload(f'user-{full}', caption, pixels)


# Audio: audio.py's sources.

def audio_tasks(sources) -> list:
  """The espeak sources are one planning task (audio.prepare_audio draws sentences, voices and speeds
  from one generator in source order); each user JSONL is one task."""
  spoken, tasks = [], []
  for s, name in enumerate(sources):
    kind, _, arg = name.partition(':')
    if kind == 'espeak' and arg:
      spoken.append((s, arg))
    elif kind == 'jsonl' and arg:
      files = jsonl_files(arg, '{"audio": wav path, "text": transcript}')
      tasks += [('clips', (s, u, 0), f) for u, f in enumerate(files)]
    else:
      raise MissingCorpus(f'unknown audio source {name!r} (choices: espeak:CORPUS, jsonl:PATH)')
  return ([('espeak', (spoken[0][0], 0, 0), spoken)] if spoken else []) + tasks


def read_audio_task(task, cfg):
  kind, (s, u, _), arg = task
  if kind == 'espeak':
    yield from _plan_espeak(arg, cfg)
    return
  folder = folder_of(arg)
  for n, line in jsonl_lines(arg):
    yield _clip_line(line, (s, u, n), folder)


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


def _clip_line(line, key, folder):
  if undecodable(line):
    return SKIP, key, 'bad_line'
  try:
    row = json.loads(line)
    wav_path, transcript = row['audio'], row['text']
  except (json.JSONDecodeError, KeyError, TypeError):
    return SKIP, key, 'bad_line'
  if not isinstance(transcript, str) or not transcript.strip():
    return SKIP, key, 'empty_caption'
  try:
    full = join(folder, wav_path)
  except TypeError:
    return SKIP, key, 'unreadable_audio'
  return TASK, key, ('wav', full, transcript.strip())


def decode_audio(key, job, cfg):
  """Speaks or reads one clip, then audio.condition and the length check, as audio.prepare_audio."""
  try:
    if job[0] == 'espeak':
      _, transcript, voice, speed = job
      wave_S, rate = audio.espeak(transcript, voice, speed)
    else:
      _, path, transcript = job
      wave_S, rate = audio.read_wav(io.BytesIO(read_bytes(path)) if is_remote(path) else path)
  except (OSError, ValueError, TypeError, subprocess.TimeoutExpired):
    return SKIP, key, 'unreadable_audio'
  wave_S = audio.condition(wave_S, rate, cfg.sample_rate)
  if wave_S is None:
    return SKIP, key, 'silent_audio'
  if len(wave_S) > int(round(cfg.seconds * cfg.sample_rate)):
    return SKIP, key, 'too_long'
  return ITEM, key, pair_payload(transcript, transcript, wave_S)
