"""The interface every image or audio tokenizer fills, learned here or pretrained elsewhere.

A tokenizer turns a batch of items into a fixed number of int32 codes each and back:
  encode(batch)  images_NHWC float32 in [0, 1] or waveforms_NS float32  ->  codes_NT int32 in [0, codebook_size)
  decode(codes_NT)                                                    ->  the same kind of batch
Legend: N items, T tokens_per_item, H/W/C image height/width/channels (C = 3), S audio samples.

A tokenizer lives in a folder (`<dataset root>/<its file>`) with `tokenizer.json` naming its kind;
registry.load(folder) finds the class in KINDS. `sha256` identifies the weights and settings; dataset
manifests record it so that data, checkpoints and the decoder can be checked against each other.
"""

import abc
import hashlib
import json

import jax
import numpy as np

from tmdm import storage

CONFIG_FILE = 'tokenizer.json'
KINDS = {}  # kind name -> Tokenizer subclass; filled by `register` in image.py, audio.py (registry.py imports them).


def register(kind: str):
  def add(cls):
    KINDS[kind] = cls
    cls.kind = kind
    return cls
  return add


class Tokenizer(abc.ABC):
  kind = 'abstract'

  @property
  @abc.abstractmethod
  def name(self) -> str:
    """Short human-readable identity, e.g. 'fsq-image-32px-8x8'."""

  @property
  @abc.abstractmethod
  def codebook_size(self) -> int:
    ...

  @property
  @abc.abstractmethod
  def tokens_per_item(self) -> int:
    ...

  @property
  @abc.abstractmethod
  def sha256(self) -> str:
    ...

  @abc.abstractmethod
  def encode(self, batch) -> np.ndarray:
    """Items -> int32 codes [N, tokens_per_item]."""

  @abc.abstractmethod
  def decode(self, codes) -> np.ndarray:
    """int32 codes [N, tokens_per_item] -> images [N, H, W, 3] in [0, 1] or waveforms [N, samples]."""

  def manifest_entry(self, file: str) -> dict:
    """What a dataset manifest records about its tokenizer (`file`: folder relative to the dataset)."""
    return {'name': self.name, 'kind': self.kind, 'codebook_size': self.codebook_size,
            'tokens_per_item': self.tokens_per_item, 'sha256': self.sha256, 'file': file}


def params_sha256(config: dict, params) -> str:
  """Hash of the settings and every weight's name, shape, dtype and bytes (not of Orbax's file layout,
  which may change between versions while the weights stay the same)."""
  h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    leaf = np.asarray(leaf)
    h.update(f'{jax.tree_util.keystr(path)}:{leaf.shape}:{leaf.dtype}'.encode())
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()


def read_config(folder) -> dict:
  path = storage.join(folder, CONFIG_FILE)
  if not storage.isfile(path):
    raise FileNotFoundError(f'no tokenizer at {folder}: {CONFIG_FILE} is missing')
  return json.loads(storage.read_text(path))
