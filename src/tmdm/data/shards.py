"""Which data shards a process reads and the iterators over them: the assembly between the config,
the stored datasets (store, mixture) and the training loop.

A run's rows are split into `data.num_shards` fixed shards (default: one per process); each process
owns a contiguous run of them, so the order of the rows of a global batch does not depend on the
process count, and the iterator state saved with a checkpoint is a per-shard state.
"""

import dataclasses
import hashlib
import json
import logging

import jax
import numpy as np

from tmdm.data import mixture, pipeline, store
from tmdm.errors import ConfigError

log = logging.getLogger('tmdm')


@dataclasses.dataclass(frozen=True)
class DataShards:
  indices: tuple  # data shards owned by this process
  num_shards: int


def rows_per_step(cfg) -> int:
  """Rows the input pipeline delivers per step (complementary pairs duplicate each row)."""
  return cfg.train.batch_size // 2 if cfg.diffusion.complementary else cfg.train.batch_size


def num_data_shards(cfg, process_count: int) -> int:
  return cfg.data.num_shards or process_count


def data_seed(cfg) -> int:
  return cfg.data.seed if cfg.data.seed >= 0 else cfg.seed


def text_root(cfg):
  return mixture.root(cfg, 'text')


def check_data(cfg) -> dict:
  """The manifests of the datasets the config trains on; fails before any compilation when one is
  missing or does not match the config, or (several processes) when the processes' datasets were
  tokenized by different tokenizers (each host prepared its own copy)."""
  try:
    manifests = mixture.check(cfg)
  except store.DataError as e:
    raise ConfigError(str(e)) from None
  if jax.process_count() > 1:
    _check_same_tokenizers(manifests)
  return manifests


def tokenizer_digest(manifests: dict) -> bytes:
  """sha256 over every dataset's tokenizer hashes: equal on two hosts iff they tokenize alike."""
  hashes = {name: {field: tok['sha256'] for field, tok in m['tokenizers'].items()} for name, m in manifests.items()}
  return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).digest()


def _check_same_tokenizers(manifests: dict):
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  mine = np.frombuffer(tokenizer_digest(manifests), np.uint8)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
  differ = [p for p in range(len(every)) if not np.array_equal(every[p], every[0])]
  if differ:
    names = ', '.join(sorted(manifests))
    raise ConfigError(f'processes {differ} read datasets ({names}) tokenized by other tokenizers than process 0: '
                      'prepare once into storage every host reads (e.g. gs://), or copy process 0\'s datasets to '
                      'every host')


def owned(cfg) -> DataShards:
  """The data shards this process reads (data.num_shards fixed: the same order on any process count)."""
  total = num_data_shards(cfg, jax.process_count())
  indices = pipeline.owned_shards(total, jax.process_index(), jax.process_count())
  return DataShards(tuple(indices), total)


def train_iterator(cfg, vocab, shards: DataShards):
  """(iterator of process-local batches, the SkipCounter of its bad records)."""
  skips = pipeline.SkipCounter(cfg.data.max_skip_fraction)
  rows_per_shard = rows_per_step(cfg) // shards.num_shards
  iterators = {}
  for shard in shards.indices:
    rows = mixture.train_rows(cfg, vocab, seed=data_seed(cfg), shard_index=shard, shard_count=shards.num_shards,
                              skips=skips)
    iterators[shard] = iter(pipeline.batched(rows, rows_per_shard, cfg.data.prefetch))
  return pipeline.ShardedBatches(iterators), skips


def eval_batches(cfg, vocab, sharder, shards: DataShards) -> dict:
  """Per mixture component: the first `train.eval_batches` global batches of its validation split."""
  rows_per_shard = rows_per_step(cfg) // shards.num_shards
  out = {}
  for name in mixture.weights(cfg) if cfg.train.eval_batches else ():
    iterators = {
        shard: iter(pipeline.batched(mixture.component(cfg, name, vocab, 'val', seed=0, shard_index=shard,
                                                       shard_count=shards.num_shards, repeat=False),
                                     rows_per_shard, prefetch=0))
        for shard in shards.indices}
    batches = []
    for local in pipeline.ShardedBatches(iterators):
      batches.append(pipeline.to_global(local, sharder))
      if len(batches) == cfg.train.eval_batches:
        break
    if not batches:  # Not silent: a component too small for one batch would just lose its validation.
      log.warning('no %s validation: its held-out split fills no batch of %d rows (%d per data shard); hold out '
                  'more (e.g. a larger %s) or lower train.batch_size', name, rows_per_step(cfg), rows_per_shard,
                  'data.val_fraction' if name == 'text' else f'{name}.val_fraction')
    out[name] = batches
  return out
