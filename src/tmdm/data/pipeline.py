"""Grain input pipelines: records -> rows -> process-local batches -> global jax.Arrays.

A row is a dict of [L] int32 arrays (a batch stacks rows to [B, L]):
  tokens       clean ids in the joint vocabulary
  segment_ids  document of each position within the row, 1.. (0: padding)
  positions    position within its document (rotary embeddings restart per document)
  role         vocab_lib.FIXED / TARGET / CONDITION
  modality     vocab_lib.TEXT / IMAGE / AUDIO

Text documents become `<txt> ids </txt>` and are packed (concatenate, then split at L) so rows
carry no padding; segment ids keep packed documents from attending to each other.

Pairs (image-text, audio-text) fill one row each, padded to L (docs/design.md 2.2):
  text first   [T2I] <txt> caption </txt> <img> codes </img> [PAD]...   caption CONDITION, codes TARGET
  media first  [I2T] <img> codes </img> <txt> caption </txt> [PAD]...   codes CONDITION, caption TARGET
(audio: [T2S] / [S2T] with <aud> </aud>). The order is drawn per example with the data seed. Layout
tokens and [PAD] are FIXED: never masked, never in the loss. Captions longer than the row allows are
cut.

Bad records (unreadable, empty, ids out of range, too long for a row) become {SKIP: (reason, detail)}
in the workers and are dropped and counted by a `SkipCounter` in the main process, which stops the
run with a clear message once more than `max_fraction` of the records read were bad.

Order: data shard s of n reads the records i with i % n == s, shuffled with a seed of its own
(`shard_seed`: the data seed and s; one permutation for every shard would put neighbouring records of
storage, i.e. of the source, side by side in each global batch) and re-shuffled every epoch. Worker processes only read and convert records; packing and
batching happen in the main process, so the number of workers never changes the data order.
"""

import dataclasses

import grain
from absl import flags
import jax
import numpy as np
from grain import experimental as grain_exp

from tmdm import vocab as vocab_lib
from tmdm.data import store

ROW_KEYS = ('tokens', 'segment_ids', 'positions', 'role', 'modality')
_PACKED = ('tokens', 'role', 'modality')
SKIP = store.SKIP


def _bad_ids(ids, size):
  if ids.size == 0:
    return 'empty'
  if ids.min() < 0 or ids.max() >= size:
    return 'out_of_range'
  return None


class SkipCounter:
  """Grain filter (main process) that drops skipped records and counts them by reason."""

  def __init__(self, max_fraction: float = 0.01, min_records: int = 200):
    self.max_fraction, self.min_records = max_fraction, min_records
    self.seen, self.counts, self.examples = 0, {}, {}

  def __call__(self, row) -> bool:
    self.seen += 1
    if SKIP not in row:
      return True
    reason, detail = row[SKIP]
    self.counts[reason] = self.counts.get(reason, 0) + 1
    self.examples.setdefault(reason, detail)
    skipped = sum(self.counts.values())
    if skipped > self.max_fraction * max(self.seen, self.min_records):
      raise store.DataError(f'{skipped} of {self.seen} records were bad ({self.counts}); first '
                            f'{reason}: {detail or "-"} (data.max_skip_fraction={self.max_fraction})')
    return False


@dataclasses.dataclass(frozen=True)
class TextToRow:
  """Record {'text': tokenizer ids} -> unpacked row fields, or a SKIP marker."""
  vocab: vocab_lib.VocabSpec

  def __call__(self, record):
    if SKIP in record:
      return record
    ids = np.asarray(record['text'], np.int64)
    bad = _bad_ids(ids, self.vocab.text_size)
    if bad:
      return {SKIP: (bad, 'text')}
    n = ids.size + 2
    tokens = np.empty((n,), np.int32)
    tokens[0], tokens[-1] = self.vocab.id('<txt>'), self.vocab.id('</txt>')
    tokens[1:-1] = ids + self.vocab.text_start
    role = np.full((n,), vocab_lib.TARGET, np.int32)
    role[0] = role[-1] = vocab_lib.FIXED
    return {'tokens': tokens, 'role': role, 'modality': np.full((n,), vocab_lib.TEXT, np.int32)}


@dataclasses.dataclass(frozen=True)
class PairToRow:
  """Record {'text': ids, kind: codes} -> one padded row, or a SKIP marker."""
  vocab: vocab_lib.VocabSpec
  kind: str  # 'image' or 'audio'
  seq_len: int
  p_text_first: float

  def __call__(self, record, rng: np.random.Generator):
    if SKIP in record:
      return record
    v = self.vocab
    modality = vocab_lib.IMAGE if self.kind == 'image' else vocab_lib.AUDIO
    codebook = v.image_size if modality == vocab_lib.IMAGE else v.audio_size
    text, codes = np.asarray(record['text'], np.int64), np.asarray(record[self.kind], np.int64)
    bad = _bad_ids(text, v.text_size) or _bad_ids(codes, codebook)
    if bad:
      return {SKIP: (bad, self.kind)}
    room = self.seq_len - 5 - codes.size  # task token + two boundary pairs
    if room < 1:
      return {SKIP: ('too_long', f'{codes.size} {self.kind} codes in rows of {self.seq_len}')}
    text = text[:room]
    text_first = rng.random() < self.p_text_first
    open_m, close_m = ('<img>', '</img>') if modality == vocab_lib.IMAGE else ('<aud>', '</aud>')
    task = {(vocab_lib.IMAGE, True): '[T2I]', (vocab_lib.IMAGE, False): '[I2T]',
            (vocab_lib.AUDIO, True): '[T2S]', (vocab_lib.AUDIO, False): '[S2T]'}[modality, text_first]
    text_role, media_role = (vocab_lib.CONDITION, vocab_lib.TARGET) if text_first else (vocab_lib.TARGET, vocab_lib.CONDITION)
    text_part = ([v.id('<txt>')], text + v.text_start, [v.id('</txt>')], text_role, vocab_lib.TEXT)
    media_part = ([v.id(open_m)], codes + v.range(modality)[0], [v.id(close_m)], media_role, modality)
    parts = (text_part, media_part) if text_first else (media_part, text_part)
    row = {k: np.zeros((self.seq_len,), np.int32) for k in ROW_KEYS}
    row['tokens'][0] = v.id(task)
    i = 1
    for open_tok, body, close_tok, role, mod in parts:
      n = len(body)
      row['tokens'][i:i + n + 2] = np.concatenate([open_tok, body, close_tok])
      row['role'][i + 1:i + 1 + n] = role
      row['modality'][i:i + n + 2] = mod
      i += n + 2
    row['tokens'][i:] = v.pad_id
    row['segment_ids'][:i] = 1
    row['positions'][:i] = np.arange(i)
    return row


def shard_seed(seed: int, shard_index: int) -> int:
  """The seed of one data shard's shuffle and coins: depends on both, so shards never share them."""
  return int(np.random.SeedSequence([seed, shard_index]).generate_state(1)[0])


def pair_dataset(root, split, vocab: vocab_lib.VocabSpec, *, kind, seq_len, seed, p_text_first, shard_index=0,
                 shard_count=1, repeat=True, num_workers=0, skips=None) -> grain.IterDataset:
  """Padded pair rows of one split; infinite and shuffled when `repeat`, one ordered pass if not."""
  records = grain.MapDataset.source(store.ShardedRecords(root, split))[shard_index::shard_count]
  if repeat:
    records = records.shuffle(seed=shard_seed(seed, shard_index)).repeat(None)
  to_row = PairToRow(vocab, kind, seq_len, p_text_first)
  return _read(records.random_map(to_row, seed=shard_seed(seed, shard_index)), num_workers, skips)


def _ensure_absl_flags_parsed():
  """Grain's worker processes read absl flags; outside absl.app nobody has parsed them."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _finish_packed(row):
  return {'tokens': row['tokens'], 'segment_ids': row['tokens_segment_ids'].astype(np.int32),
          'positions': row['tokens_positions'].astype(np.int32), 'role': row['role'],
          'modality': row['modality']}


def _read(records: grain.MapDataset, num_workers, skips) -> grain.IterDataset:
  rows = records.to_iter_dataset()
  if num_workers > 0:
    _ensure_absl_flags_parsed()
    rows = rows.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return rows.filter(skips or SkipCounter())


def text_dataset(root, split, vocab: vocab_lib.VocabSpec, *, seq_len, seed, shard_index=0, shard_count=1,
                 repeat=True, num_workers=0, skips=None) -> grain.IterDataset:
  """Packed text rows of one split; infinite and shuffled when `repeat`, one ordered pass if not."""
  records = grain.MapDataset.source(store.ShardedRecords(root, split))[shard_index::shard_count]
  if repeat:
    records = records.shuffle(seed=shard_seed(seed, shard_index)).repeat(None)
  rows = _read(records.map(TextToRow(vocab)), num_workers, skips)
  packed = grain_exp.ConcatThenSplitIterDataset(rows, length_struct={k: seq_len for k in _PACKED})
  return packed.map(_finish_packed)


def batched(rows: grain.IterDataset, batch_rows: int, prefetch: int) -> grain.IterDataset:
  ds = rows.batch(batch_rows, drop_remainder=True)
  if prefetch > 0:
    ds = grain_exp.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
  return ds


class ShardedBatches:
  """Concatenates the batches of several data shards: shard s contributes rows [s*b, (s+1)*b).

  The data is split into `num_shards` shards fixed by config, and each process iterates the shards
  it owns. The global batch is then the same whatever the number of processes, and a checkpoint's
  per-shard iterator states restore on a different process count. State: {shard index: state}.
  """

  def __init__(self, iterators: dict):
    self.iterators = iterators  # {global shard index: iterator of [b, L] batches}

  def __iter__(self):
    return self

  def __next__(self):
    parts = [next(it) for _, it in sorted(self.iterators.items())]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> dict:
    return {str(s): it.get_state() for s, it in self.iterators.items()}

  def set_state(self, state: dict):
    for s, it in self.iterators.items():
      it.set_state(state[str(s)])


def owned_shards(num_shards: int, process_index: int, process_count: int) -> range:
  per = num_shards // process_count
  return range(process_index * per, (process_index + 1) * per)


def to_global(local_batch: dict, sharder) -> dict:
  """Process-local [B / processes, L] numpy rows -> global jax.Arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(sharder.batch(np.ndim(v)), np.asarray(v))
          for k, v in local_batch.items() if k in ROW_KEYS}
