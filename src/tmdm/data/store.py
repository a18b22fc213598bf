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
import os

import numpy as np
import tensorstore as ts

from tmdm.errors import DataError

FORMAT = 'tmdm-tokens-v1'
MANIFEST = 'manifest.json'
SKIP = 'skip'  # Key of a record that could not be read: {SKIP: (reason, detail)}.




def _spec(path):
  return {'driver': 'zarr3', 'kvstore': {'driver': 'file', 'path': os.path.abspath(path)}}


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
    _write_array(os.path.join(path, field, 'values'), values, chunk)
    _write_array(os.path.join(path, field, 'offsets'), offsets, chunk)
    num_tokens[field] = int(offsets[-1])
  return {'path': path, 'num_records': len(records), 'num_tokens': num_tokens}


def file_sha256(path) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def write_manifest(root, *, modality, fields, tokenizers: dict, splits: dict, source: dict):
  """tokenizers: {field: {'name', 'vocab_size', 'sha256', ...}}; splits: {split: [shard entries]}.
  Shard paths are stored relative to root."""
  manifest = {
      'format': FORMAT, 'modality': modality, 'fields': list(fields), 'tokenizers': tokenizers,
      'source': source,
      'splits': {
          name: {'shards': [dict(s, path=os.path.relpath(s['path'], root)) for s in shards],
                 'num_records': sum(s['num_records'] for s in shards)}
          for name, shards in splits.items()
      },
  }
  tmp = os.path.join(root, MANIFEST + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(manifest, f, indent=2)
  os.replace(tmp, os.path.join(root, MANIFEST))  # The manifest appears only once the data is complete.
  return manifest


def read_manifest(root) -> dict:
  path = os.path.join(root, MANIFEST)
  if not os.path.isfile(path):
    raise DataError(f'no dataset at {root}: {MANIFEST} is missing (run `tmdm prepare` first)')
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise DataError(f'unreadable manifest {path}: {e}') from None
  if manifest.get('format') != FORMAT:
    raise DataError(f'{path}: format {manifest.get("format")!r}, expected {FORMAT!r}')
  return manifest


class ShardedRecords:
  """Random access to the records of one split (a Grain RandomAccessDataSource).

  Arrays are opened lazily in each process (the object pickles to Grain workers without handles).
  """

  def __init__(self, root, split, cache_bytes=64 << 20):
    self.root, self.split, self.cache_bytes = root, split, cache_bytes
    manifest = read_manifest(root)
    if split not in manifest['splits']:
      raise DataError(f'{root}: no split {split!r} (has {", ".join(manifest["splits"])})')
    self.fields = tuple(manifest['fields'])
    self.shards = manifest['splits'][split]['shards']
    for shard in self.shards:
      for field in self.fields:
        for part in ('values', 'offsets'):
          meta = os.path.join(root, shard['path'], field, part, 'zarr.json')
          if not os.path.isfile(meta):
            raise DataError(f'missing shard array {meta}')
    counts = np.array([s['num_records'] for s in self.shards], np.int64)
    self._starts = np.concatenate([[0], np.cumsum(counts)])
    self._arrays = None

  def __len__(self):
    return int(self._starts[-1])

  def __getstate__(self):
    return dict(self.__dict__, _arrays=None)

  def _open(self):
    context = ts.Context({'cache_pool': {'total_bytes_limit': self.cache_bytes}})
    arrays = []
    for shard in self.shards:
      per_field = {}
      for field in self.fields:
        base = os.path.join(self.root, shard['path'], field)
        try:
          values = ts.open(_spec(os.path.join(base, 'values')), read=True, context=context).result()
          offsets = ts.open(_spec(os.path.join(base, 'offsets')), read=True, context=context).result()
          offsets = np.asarray(offsets.read().result())
        except Exception as e:  # pylint: disable=broad-except
          raise DataError(f'cannot read shard {base}: {e}') from None
        if len(offsets) != shard['num_records'] + 1:
          raise DataError(f'{base}: {len(offsets) - 1} records on disk, manifest says {shard["num_records"]}')
        per_field[field] = (values, offsets)
      arrays.append(per_field)
    self._arrays = arrays

  def __getitem__(self, index):
    if self._arrays is None:
      self._open()
    index = int(index)
    shard = int(np.searchsorted(self._starts, index, side='right') - 1)
    local = index - self._starts[shard]
    out = {}
    for field, (values, offsets) in self._arrays[shard].items():
      lo, hi = int(offsets[local]), int(offsets[local + 1])
      try:
        out[field] = np.asarray(values[lo:hi].read().result()) if hi > lo else np.zeros((0,), np.int32)
      except Exception as e:  # pylint: disable=broad-except  (a corrupt chunk: skip and count, name the file)
        where = os.path.join(self.root, self.shards[shard]['path'], field)
        return {SKIP: ('unreadable', f'{where}: {str(e).splitlines()[0][:200]}')}
    return out
