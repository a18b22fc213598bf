"""Token datasets on disk: tensorstore zarr3 arrays plus a JSON manifest.

Layout of a dataset folder:
  manifest.json                    what the data is (see `write_manifest`)
  <split>/<shard>/<field>/values   zarr3 1-D array: the records' ids for that field, concatenated
  <split>/<shard>/<field>/offsets  zarr3 int64 [n + 1]: record i is values[offsets[i]:offsets[i+1]]

A record is a dict of fields (text corpora: {'text'}; pairs: {'text', 'image'} or {'text', 'audio'}).
Ids are the modality tokenizer's own (0-based); the vocabulary layout shifts them when rows are
built, so a layout change never needs re-tokenization. The manifest names the tokenizer and its
hash so that data and checkpoints can be checked against each other.
"""

import hashlib
import json

import numpy as np
import tensorstore as ts

from tmdm import storage
from tmdm.errors import DataError

FORMAT = 'tmdm-tokens-v1'
MANIFEST = 'manifest.json'
SKIP = 'skip'  # Key of a record that could not be read: {SKIP: (reason, detail)}.




def _spec(path):
  return {'driver': 'zarr3', 'kvstore': storage.tensorstore_kvstore(path)}


def _write_array(path, values: np.ndarray, chunk: int):
  arr = ts.open(_spec(path), create=True, delete_existing=True, dtype=ts.dtype(values.dtype.name),
                shape=[len(values)], chunk_layout=ts.ChunkLayout(chunk_shape=[max(1, min(chunk, len(values)))])
                ).result()
  arr.write(values).result()


def write_shard(path, records, fields, dtype=np.int32, chunk=1 << 16) -> dict:
  """Writes records (list of {field: 1-D int array}) as one shard; returns its manifest entry."""
  num_tokens = {}
  for field in fields:
    parts = [np.asarray(r[field], dtype) for r in records]
    lengths = np.fromiter((len(p) for p in parts), np.int64, len(parts))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.concatenate(parts) if parts else np.zeros((0,), dtype)
    _write_array(storage.join(path, field, 'values'), values, chunk)
    _write_array(storage.join(path, field, 'offsets'), offsets, chunk)
    num_tokens[field] = int(offsets[-1])
  return {'path': path, 'num_records': len(records), 'num_tokens': num_tokens}


def file_sha256(path) -> str:
  return hashlib.sha256(storage.read_bytes(path)).hexdigest()


def write_manifest(root, *, modality, fields, tokenizers: dict, splits: dict, source: dict):
  """tokenizers: {field: {'name', 'vocab_size', 'sha256', ...}}; splits: {split: [shard entries]}.
  Shard paths are stored relative to root."""
  manifest = {
      'format': FORMAT, 'modality': modality, 'fields': list(fields), 'tokenizers': tokenizers,
      'source': source,
      'splits': {
          name: {'shards': [dict(s, path=storage.relative(s['path'], root)) for s in shards],
                 'num_records': sum(s['num_records'] for s in shards)}
          for name, shards in splits.items()
      },
  }
  # Written whole and last: the manifest appears only once the data is complete.
  storage.write_text(storage.join(root, MANIFEST), json.dumps(manifest, indent=2))
  return manifest


def read_manifest(root) -> dict:
  path = storage.join(root, MANIFEST)
  if not storage.isfile(path):
    raise DataError(f'no dataset at {root}: {MANIFEST} is missing (run `tmdm prepare` first)')
  try:
    manifest = json.loads(storage.read_text(path))
  except (OSError, json.JSONDecodeError) as e:
    raise DataError(f'unreadable manifest {path}: {e}') from None
  if manifest.get('format') != FORMAT:
    raise DataError(f'{path}: format {manifest.get("format")!r}, expected {FORMAT!r}')
  return manifest


class ShardedRecords:
  """Random access to the records of one split (a Grain RandomAccessDataSource).

  Arrays are opened lazily in each process, a shard on its first read (the object pickles to Grain
  workers without handles; a process opens the offsets of only the shards it reads).
  """

  def __init__(self, root, split, cache_bytes=64 << 20):
    self.root, self.split, self.cache_bytes = root, split, cache_bytes
    manifest = read_manifest(root)
    if split not in manifest['splits']:
      raise DataError(f'{root}: no split {split!r} (has {", ".join(manifest["splits"])})')
    self.fields = tuple(manifest['fields'])
    self.shards = manifest['splits'][split]['shards']
    missing = storage.missing_files(storage.join(root, shard['path'], field, part, 'zarr.json')
                                for shard in self.shards for field in self.fields for part in ('values', 'offsets'))
    if missing:
      more = f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
      raise DataError(f'missing shard array {missing[0]}{more}')
    counts = np.array([s['num_records'] for s in self.shards], np.int64)
    self._starts = np.concatenate([[0], np.cumsum(counts)])
    self._arrays, self._context = {}, None

  def __len__(self):
    return int(self._starts[-1])

  def __getstate__(self):
    return dict(self.__dict__, _arrays={}, _context=None)

  def _open(self, index: int) -> dict:
    """The arrays of shard `index`: {field: (values, offsets read into memory)}."""
    if self._context is None:
      self._context = ts.Context({'cache_pool': {'total_bytes_limit': self.cache_bytes}})
    shard, per_field = self.shards[index], {}
    for field in self.fields:
      base = storage.join(self.root, shard['path'], field)
      try:
        values = ts.open(_spec(storage.join(base, 'values')), read=True, context=self._context).result()
        offsets = ts.open(_spec(storage.join(base, 'offsets')), read=True, context=self._context).result()
        offsets = np.asarray(offsets.read().result())
      except Exception as e:  # pylint: disable=broad-except
        raise DataError(f'cannot read shard {base}: {e}') from None
      if len(offsets) != shard['num_records'] + 1:
        raise DataError(f'{base}: {len(offsets) - 1} records on disk, manifest says {shard["num_records"]}')
      per_field[field] = (values, offsets)
    self._arrays[index] = per_field
    return per_field

  @property
  def opened_shards(self) -> list:
    """Indices of the shards this process has opened (read at least one record of)."""
    return sorted(self._arrays)

  def __getitem__(self, index):
    index = int(index)
    shard = int(np.searchsorted(self._starts, index, side='right') - 1)
    local = index - self._starts[shard]
    arrays = self._arrays.get(shard) or self._open(shard)
    out = {}
    for field, (values, offsets) in arrays.items():
      lo, hi = int(offsets[local]), int(offsets[local + 1])
      try:
        out[field] = np.asarray(values[lo:hi].read().result()) if hi > lo else np.zeros((0,), np.int32)
      except Exception as e:  # pylint: disable=broad-except  (a corrupt chunk: skip and count, name the file)
        where = storage.join(self.root, self.shards[shard]['path'], field)
        return {SKIP: ('unreadable', f'{where}: {str(e).splitlines()[0][:200]}')}
    return out
