"""Grain input pipelines: records -> rows -> process-local batches -> global jax.Arrays.

A row is a dict of [L] int32 arrays (a batch stacks rows to [B, L]):
  tokens       clean ids in the joint vocabulary
  segment_ids  document of each position within the row, 1.. (0: padding)
  positions    position within its document (rotary embeddings restart per document)
  role         spec.FIXED / TARGET / CONDITION
  modality     spec.TEXT / IMAGE / AUDIO

Text documents become `<txt> ids </txt>` and are packed (concatenate, then split at L) so rows
carry no padding; segment ids keep packed documents from attending to each other.

Order: each process reads the records i with i % process_count == process_index, shuffled with the
data seed and re-shuffled every epoch. Worker processes only read and convert records; packing and
batching happen in the main process, so the number of workers never changes the data order.
"""

import dataclasses

import grain
from absl import flags
import jax
import numpy as np
from grain import experimental as grain_exp

from tmdm.data import store
from tmdm.modalities import spec

ROW_KEYS = ('tokens', 'segment_ids', 'positions', 'role', 'modality')
_PACKED = ('tokens', 'role', 'modality')


@dataclasses.dataclass(frozen=True)
class TextToRow:
  """Record {'text': tokenizer ids} -> unpacked row fields; None for a record to skip."""
  vocab: spec.VocabSpec

  def __call__(self, record):
    ids = np.asarray(record['text'], np.int64)
    if ids.size == 0 or ids.min() < 0 or ids.max() >= self.vocab.text_size:
      return None  # Empty documents and out-of-range ids are skipped (counted by SkipCounter).
    n = ids.size + 2
    tokens = np.empty((n,), np.int32)
    tokens[0], tokens[-1] = self.vocab.id('<txt>'), self.vocab.id('</txt>')
    tokens[1:-1] = ids + self.vocab.text_start
    role = np.full((n,), spec.TARGET, np.int32)
    role[0] = role[-1] = spec.FIXED
    return {'tokens': tokens, 'role': role, 'modality': np.full((n,), spec.TEXT, np.int32)}


def _ensure_absl_flags_parsed():
  """Grain's worker processes read absl flags; outside absl.app nobody has parsed them."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _finish_packed(row):
  return {'tokens': row['tokens'], 'segment_ids': row['tokens_segment_ids'].astype(np.int32),
          'positions': row['tokens_positions'].astype(np.int32), 'role': row['role'],
          'modality': row['modality']}


def text_dataset(root, split, vocab: spec.VocabSpec, *, seq_len, seed, shard_index=0, shard_count=1,
                 repeat=True, num_workers=0) -> grain.IterDataset:
  """Packed text rows of one split; infinite and shuffled when `repeat`, one ordered pass if not."""
  records = grain.MapDataset.source(store.ShardedRecords(root, split))[shard_index::shard_count]
  if repeat:
    records = records.shuffle(seed=seed).repeat(None)
  rows = records.map(TextToRow(vocab)).to_iter_dataset()
  if num_workers > 0:
    _ensure_absl_flags_parsed()
    rows = rows.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  packed = grain_exp.ConcatThenSplitIterDataset(rows, length_struct={k: seq_len for k in _PACKED})
  return packed.map(_finish_packed)


def batched(rows: grain.IterDataset, batch_rows: int, prefetch: int) -> grain.IterDataset:
  ds = rows.batch(batch_rows, drop_remainder=True)
  if prefetch > 0:
    ds = grain_exp.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
  return ds


def to_global(local_batch: dict, sharder) -> dict:
  """Process-local [B / processes, L] numpy rows -> global jax.Arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(sharder.batch(np.ndim(v)), np.asarray(v))
          for k, v in local_batch.items() if k in ROW_KEYS}
