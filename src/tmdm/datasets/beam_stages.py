"""The Beam transforms of `tmdm prepare --beam_runner`: read, cap, rank, encode and write (datasets/beam.py
assembles them per modality).

Determinism comes from order keys (beam_sources.py), never from arrival order: every grouping sorts
by key or rank before it acts. Ranks are computed in blocks of consecutive keys: a count per block
(a small side input) gives each block its first rank, and a block's records are sorted and numbered
where they land. Records are then grouped into the encode batches and the shards the in-process
builders would form (rank // batch, rank // shard_records), so a tokenizer sees the same batches
whatever the runner and worker count.

Shards are written under a temporary name inside the work folder and renamed into place, so a shard
path either holds a complete shard or nothing; the driver writes the manifest once all are there.
"""

import hashlib
import json
import os
import shutil
import uuid

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from tmdm.data import store
from tmdm.datasets import beam_sources as src, records, text
from tmdm.errors import DataError
from tmdm.tokenizers import audio as audio_tok, registry as tok_registry

BLOCK = 1024  # Consecutive positions ranked together (bounds the records one worker sorts at once).
TEXT_ENCODE_BATCH = 1000  # Documents per SentencePiece call (as text.prepare_text).
WORK_DIR = '.beam-work'  # Inside the dataset root: temporary shards, labels, the report. Removed at the end.
REPORT = 'report.json'
OOV = 'oov'  # EncodeCaptions' output of text.oov_counts entries.


def counter(modality: str, name: str):
  return Metrics.counter(f'tmdm.prepare.{modality}', name)


def load_text_tokenizer(path: str, sha256: str) -> text.TextTokenizer:
  """The SentencePiece model the driver trained; a worker that finds another file fails loudly."""
  tok = text.TextTokenizer(path)
  if tok.sha256 != sha256:
    raise DataError(f'{path}: sha256 {tok.sha256[:12]} is not the {sha256[:12]} the pipeline was built with')
  return tok


def load_media_tokenizer(folder: str, sha256: str):
  tok = tok_registry.load(folder)
  if tok.sha256 != sha256:
    raise DataError(f'{folder}: tokenizer sha256 {tok.sha256[:12]} is not the {sha256[:12]} the pipeline was '
                    'built with')
  return tok


# Reading.

class ReadTasks(beam.DoFn):
  """Runs a beam_sources reader on each task (or, with decode=True, a decoder on each (key, job)) and
  routes the events: items on the main output, skips, decode tasks and tallies on tagged outputs; each
  skip also counts as a Beam metric."""

  def __init__(self, modality, fn, *args, decode=False):
    self.modality, self.fn, self.args, self.decode = modality, fn, args, decode

  def process(self, element):
    events = [self.fn(*element, *self.args)] if self.decode else self.fn(element, *self.args)
    for kind, key, value in events:
      if kind == src.ITEM:
        yield key, value
      elif kind == src.SKIP:
        counter(self.modality, skip_name(value)).inc()
        yield beam.pvalue.TaggedOutput(src.SKIP, (key, value))
      elif kind == src.TASK:
        yield beam.pvalue.TaggedOutput(src.TASK, (key, value))
      else:
        yield beam.pvalue.TaggedOutput(src.TALLY, (key[0], value))


def skip_name(value) -> str:
  """A SKIP's source.skipped name: a records.Bad's, or the built-ins' plain name."""
  return value.skip if isinstance(value, records.Bad) else value


def read(pcoll, modality, fn, *args, label, decode=False):
  return pcoll | label >> beam.ParDo(ReadTasks(modality, fn, *args, decode=decode)).with_outputs(
      src.SKIP, src.TASK, src.TALLY, main=src.ITEM)


# The per-source cap (image.max_items, audio.max_items).

def _source_key(item):
  return item[0][0], item[0]


def _cutoff(source_keys, cap):
  source, keys = source_keys
  return source, (max(keys) if len(keys) >= cap else None)


def _within(event, cutoffs):
  cut = cutoffs.get(event[0][0])
  return cut is None or event[0] <= cut


def cap_per_source(items, skips, cap):
  """Keeps, per source, the items up to its cap-th (in key order) and the skips before it: what the
  in-process loop saw before it stopped reading that source."""
  if not cap:
    return items, skips
  cutoffs = beam.pvalue.AsDict(items | 'keys' >> beam.Map(_source_key)
                               | 'smallest' >> beam.combiners.Top.SmallestPerKey(cap)
                               | 'cutoff' >> beam.Map(_cutoff, cap))
  return (items | 'cap items' >> beam.Filter(_within, cutoffs),
          skips | 'cap skips' >> beam.Filter(_within, cutoffs))


# Text deduplication (text.prepare_text keeps the first of identical documents).

def _by_content(item):
  key, doc = item
  return hashlib.sha256(doc.encode('utf-8', 'surrogatepass')).hexdigest(), (key, doc)


class KeepFirst(beam.DoFn):
  """Of the documents sharing a hash, the first (smallest key) of each distinct text; the rest count
  as 'duplicate'."""

  def process(self, element):
    values, first = list(element[1]), {}
    for key, doc in values:
      if doc not in first or key < first[doc]:
        first[doc] = key
    duplicates = len(values) - len(first)
    if duplicates:
      counter('text', 'duplicate').inc(duplicates)
      yield beam.pvalue.TaggedOutput(src.SKIP, (('skipped', 'duplicate'), duplicates))
    for doc, key in first.items():
      yield key, doc


# Ranks.

def _block(key):
  return key[:-1] + (key[-1] // BLOCK,)


def _keyed_by_block(record):
  return _block(record[0]), record


def _block_split(blocked):
  return (blocked[0], blocked[1][1]), 1


def _starts(counts):
  """[((block, split), n)] -> first rank of each block: per split, and over all splits (for a cap)."""
  per_split, overall, by_split, total = {}, {}, {}, 0
  blocks = {}
  for (block, split), n in counts:
    blocks.setdefault(block, {})[split] = n
  for block in sorted(blocks):
    overall[block] = total
    for split, n in sorted(blocks[block].items()):
      per_split[(block, split)] = by_split.get(split, 0)
      by_split[split] = by_split.get(split, 0) + n
      total += n
  return {'split': per_split, 'all': overall}


def _number(grouped, starts, cap):
  block, group = grouped
  next_rank = {}
  for i, (key, split, payload) in enumerate(sorted(group, key=lambda r: r[0])):
    if cap and starts['all'][block] + i >= cap:
      return
    rank = next_rank.get(split, starts['split'][(block, split)])
    next_rank[split] = rank + 1
    yield split, rank, payload


class Rank(beam.PTransform):
  """(key, split, payload) -> (split, rank, payload): rank = the record's place within its split in key
  order. cap > 0 keeps only the first `cap` records over all splits (text: data.text_max_docs)."""

  def __init__(self, cap=0, label=None):
    super().__init__(label)
    self.cap = cap

  def expand(self, pcoll):
    blocked = pcoll | 'by block' >> beam.Map(_keyed_by_block)
    starts = beam.pvalue.AsSingleton(blocked | 'block sizes' >> beam.Map(_block_split)
                                     | 'sum' >> beam.CombinePerKey(sum) | 'all blocks' >> beam.combiners.ToList()
                                     | 'starts' >> beam.Map(_starts))
    return blocked | 'group blocks' >> beam.GroupByKey() | 'number' >> beam.FlatMap(_number, starts, self.cap)


# Encoding.

class EncodeCaptions(beam.DoFn):
  """Batches of (key, pair payload) -> (key, split, payload + caption ids); captions that tokenize to
  nothing are dropped and counted, as image.tokenize_captions does."""

  def __init__(self, modality, spm_path, spm_sha256, val_fraction):
    self.modality, self.spm_path, self.spm_sha256, self.val_fraction = modality, spm_path, spm_sha256, val_fraction
    self.tok = None

  def setup(self):
    self.tok = load_text_tokenizer(self.spm_path, self.spm_sha256)

  def process(self, batch):
    ids = self.tok.encode([p['caption'] for _, p in batch])
    kept = []
    for (key, payload), x in zip(batch, ids):
      if not len(x):
        counter(self.modality, 'empty_caption').inc()
        yield beam.pvalue.TaggedOutput(src.SKIP, (key, 'empty_caption'))
        continue
      kept.append(payload['caption'])
      split = src.split_of(payload['split_key'], self.val_fraction)
      yield key, split, {'text': x, 'media': payload['media'], 'label': payload['label']}
    for name, n in text.oov_counts(self.tok, kept).items():
      yield beam.pvalue.TaggedOutput(OOV, (('oov', name), n))


class EncodeMedia(beam.DoFn):
  """((split, batch index), ranked records) -> ((split, shard), (rank, record)): one tokenizer call on
  the batch the in-process builder would encode (ranks [i * encode_batch, (i + 1) * encode_batch))."""

  def __init__(self, modality, folder, sha256, shard_records, samples=0):
    self.modality, self.folder, self.sha256, self.shard_records = modality, folder, sha256, shard_records
    self.samples = samples  # Audio: clips are padded to audio.seconds first, as audio.prepare_audio does.
    self.tok = None

  def setup(self):
    self.tok = load_media_tokenizer(self.folder, self.sha256)

  def process(self, element):
    (split, _), ranked = element
    ranked = sorted(ranked, key=lambda r: r[1])
    media = [r[2]['media'] for r in ranked]
    if self.modality == 'image':
      batch = np.stack(media).astype(np.float32) / 255
    else:
      batch = audio_tok.fit_length(media, self.samples)
    codes = self.tok.encode(batch)
    for (_, rank, payload), c in zip(ranked, codes):
      record = {'text': payload['text'], self.modality: c, 'label': payload['label']}
      yield (split, rank // self.shard_records), (rank, record)


def by_encode_batch(ranked, size):
  split, rank, _ = ranked
  return (split, rank // size), ranked


def by_shard(ranked, shard_records):
  split, rank, payload = ranked
  return (split, rank // shard_records), (rank, payload)


# Writing.

def shard_path(root, split, shard):
  return os.path.join(root, split, f'{shard:05d}')


def shard_complete(path, fields) -> bool:
  return all(os.path.isfile(os.path.join(path, f, part, 'zarr.json')) for f in fields for part in ('values', 'offsets'))


def publish(tmp, final, fields):
  """Renames a finished temporary shard into place. Another attempt at the same shard (a retried or
  speculative bundle) may have won the race: its shard is identical, so this one is dropped."""
  os.makedirs(os.path.dirname(final), exist_ok=True)
  try:
    os.rename(tmp, final)
  except OSError:
    if not shard_complete(final, fields):
      raise
    shutil.rmtree(tmp, ignore_errors=True)


def save_npy(path, array):
  tmp = f'{path}.{uuid.uuid4().hex}.tmp.npy'
  np.save(tmp, array)
  os.replace(tmp, path)


class WriteShard(beam.DoFn):
  """((split, shard), [(rank, record)]) -> the shard on disk, written to a temporary name and renamed.

  Text records are documents, tokenized here (one SentencePiece model per worker, loaded in setup);
  empty token lists are dropped after sharding, as text.prepare_text does. Pair records carry their
  codes; their labels go to the work folder for the driver to join. Emits report counts.
  `fault` ('split/shard', tests only) fails that shard after its temporary files are written.
  """

  def __init__(self, root, fields, spm=None, fault=''):
    self.root, self.fields, self.spm, self.fault = root, tuple(fields), spm, fault
    self.tok = None

  def setup(self):
    if self.spm:
      self.tok = load_text_tokenizer(*self.spm)

  def _text_records(self, docs):
    ids = []
    for lo in range(0, len(docs), TEXT_ENCODE_BATCH):
      ids.extend(self.tok.encode(docs[lo:lo + TEXT_ENCODE_BATCH]))
    return [{'text': x} for x in ids if len(x)]

  def process(self, element):
    (split, shard), ranked = element
    payloads = [p for _, p in sorted(ranked, key=lambda r: r[0])]
    work = os.path.join(self.root, WORK_DIR)
    if self.tok is not None:
      rows = self._text_records(payloads)
      if len(rows) < len(payloads):
        counter('text', 'empty_tokens').inc(len(payloads) - len(rows))
        yield ('skipped', 'empty_tokens'), len(payloads) - len(rows)
      for name, n in text.oov_counts(self.tok, payloads).items():
        yield ('oov', name), n
    else:
      rows = payloads
      os.makedirs(os.path.join(work, 'labels'), exist_ok=True)
      labels = np.asarray([r['label'] for r in rows], np.int32)
      save_npy(os.path.join(work, 'labels', f'{split}-{shard:05d}.npy'), labels)
    tmp = os.path.join(work, 'tmp', f'{split}-{shard:05d}-{uuid.uuid4().hex}')
    store.write_shard(tmp, rows, self.fields)
    if self.fault == f'{split}/{shard}':
      raise RuntimeError(f'injected fault after writing {tmp}')
    publish(tmp, shard_path(self.root, split, shard), self.fields)
    counter(self.fields[-1], 'shards_written').inc()


# The report: every count the manifest needs, summed, in one JSON file the driver reads.

def write_report(entries, root, first=()):
  """first: (source, [(key, message)]) of each source's first bad records, as 'first/SOURCE' lists."""
  report = {f'{a}/{b}': n for (a, b), n in sorted(entries, key=lambda e: (e[0][0], str(e[0][1])))}
  report.update({f'first/{s}': [m for _, m in sorted(found)] for s, found in first})
  os.makedirs(os.path.join(root, WORK_DIR), exist_ok=True)
  path = os.path.join(root, WORK_DIR, REPORT)
  with open(path + '.tmp', 'w') as f:
    json.dump(report, f, indent=1, sort_keys=True)
  os.replace(path + '.tmp', path)


def _read_of(event):
  return ('read', event[0][0]), 1


def _is_bad(skip):
  return isinstance(skip[1], records.Bad)


def _bad_reason(skip):
  return ('bad', f'{skip[0][0]}/{skip[1].reason}'), 1


def _bad_message(skip):
  return skip[0][0], (skip[0], skip[1].message)


def tally(read, skips):
  """records.py's per-source counts for the report: read, the skips of read that are records.Bad (by
  reason) and their first messages. Returns (counts, firsts) for `report`."""
  bad = skips | 'bad records' >> beam.Filter(_is_bad)
  counts = [read | 'count read per source' >> beam.Map(_read_of),
            bad | 'count bad per reason' >> beam.Map(_bad_reason)]
  firsts = (bad | 'bad messages' >> beam.Map(_bad_message)
            | 'first bad' >> beam.combiners.Top.SmallestPerKey(records.FIRST))
  return counts, firsts


def report(counts, root, firsts=None):
  """counts: PCollections of ((category, name), n); firsts: tally()'s; writes WORK_DIR/report.json once
  all are summed."""
  side = beam.pvalue.AsList(firsts) if firsts is not None else ()
  return (counts | 'flatten counts' >> beam.Flatten() | 'sum counts' >> beam.CombinePerKey(sum)
          | 'gather counts' >> beam.combiners.ToList() | 'write report' >> beam.Map(write_report, root, side))


def read_report(root) -> dict:
  path = os.path.join(root, WORK_DIR, REPORT)
  if not os.path.isfile(path):
    raise DataError(f'{path} is missing: the pipeline did not finish')
  with open(path) as f:
    return json.load(f)
