"""The training mixture: text, image-text and audio-text rows mixed by configured weights.

Weights are shares of rows (Grain's deterministic weighted interleave, `IterDataset.mix`), so the
proportions are exact over any window and the mixed iterator checkpoints and resumes exactly. Each
component reshuffles with its own seed. Evaluation reads each component's validation split
separately, so per-modality validation losses come from their own data.
"""


import grain

from tmdm import storage, vocab as vocab_lib
from tmdm.data import pipeline, store

COMPONENTS = vocab_lib.MODALITIES  # One component per modality: text, image-text pairs, audio-text pairs.


def root(cfg, name: str) -> str:
  folder = {'text': cfg.data.text_name, 'image': cfg.image.name, 'audio': cfg.audio.name}[name]
  return storage.join(cfg.data.root, folder)


def is_pairs(name: str) -> bool:
  """Image-text and audio-text rows have a condition and a target; text rows only targets."""
  return name != 'text'


def weights(cfg) -> dict:
  w = {'text': cfg.data.mix_text, 'image': cfg.data.mix_image, 'audio': cfg.data.mix_audio}
  return {k: v for k, v in w.items() if v > 0}


def component(cfg, name, vocab: vocab_lib.VocabSpec, split, *, seed, shard_index, shard_count, repeat,
              num_workers=0, skips=None) -> grain.IterDataset:
  seed = seed + COMPONENTS.index(name)  # Components never share a shuffle.
  common = dict(seq_len=cfg.data.seq_len, seed=seed, shard_index=shard_index, shard_count=shard_count,
                repeat=repeat, num_workers=num_workers, skips=skips)
  if not is_pairs(name):
    return pipeline.text_dataset(root(cfg, name), split, vocab, **common)
  return pipeline.pair_dataset(root(cfg, name), split, vocab, kind=name, p_text_first=cfg.data.p_text_first,
                               **common)


def train_rows(cfg, vocab, *, seed, shard_index, shard_count, skips=None) -> grain.IterDataset:
  """skips: one pipeline.SkipCounter shared by the components (bad records, counted)."""
  w = weights(cfg)
  parts = {name: component(cfg, name, vocab, 'train', seed=seed, shard_index=shard_index,
                           shard_count=shard_count, repeat=True, num_workers=cfg.data.num_workers, skips=skips)
           for name in w}
  if len(parts) == 1:
    return next(iter(parts.values()))
  return grain.IterDataset.mix(parts, w)


def check(cfg) -> dict:
  """Reads every needed manifest; raises store.DataError / ValueError with one line on mismatch."""
  manifests = {name: store.read_manifest(root(cfg, name)) for name in weights(cfg)}
  for name in manifests:  # Every shard array the manifest lists must be on disk.
    for split in ('train', 'val'):
      store.ShardedRecords(root(cfg, name), split)
  sizes = {'text': cfg.vocab.text_size, 'image': cfg.vocab.image_size, 'audio': cfg.vocab.audio_size}
  text_hash = None
  for name, manifest in manifests.items():
    for field, tok in manifest['tokenizers'].items():
      size = tok['vocab_size'] if 'vocab_size' in tok else tok['codebook_size']
      if size != sizes[field]:
        raise store.DataError(f'vocab.{field}_size is {sizes[field]} but the {field} tokenizer of {root(cfg, name)} '
                              f'has {size} ids (set --config.vocab.{field}_size={size} or prepare again)')
      if field == 'text':
        if text_hash not in (None, tok['sha256']):
          raise store.DataError(f'{root(cfg, name)} was tokenized with another text tokenizer than the other '
                                'datasets (prepare them together)')
        text_hash = tok['sha256']
  return manifests
