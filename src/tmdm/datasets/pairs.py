"""What the image-text and audio-text datasets share: the split rule, the text tokenizer's manifest
entry and the settings recorded for `tmdm prepare`'s "already built?" check."""

import hashlib
import json
import os
import shutil

from tmdm.datasets import text


def is_val(key: str, fraction: float) -> bool:
  """Deterministic split by key hash (stable under re-ordering and re-running)."""
  h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], 'little')
  return h / 2**64 < fraction


def text_tokenizer_entry(tok: text.TextTokenizer) -> dict:
  """The same entry as the text dataset's manifest; `copy_text_tokenizer` puts the file beside the pairs."""
  return {'name': 'sentencepiece', 'file': os.path.basename(tok.path), 'vocab_size': tok.vocab_size,
          'sha256': tok.sha256}


def copy_text_tokenizer(tok: text.TextTokenizer, root):
  shutil.copyfile(tok.path, os.path.join(root, os.path.basename(tok.path)))


# Settings added after datasets were built, with the value that reproduces what those datasets hold, so
# that a dataset built before a key existed is not condemned as built with other settings.
ADDED_SETTINGS = {'image': {'digit_captions': 'varied'}}


def settings_of(cfg, text_tokenizer_sha256: str) -> dict:
  """What decides a pairs dataset's content: its config section (less the folder name) and the caption
  tokenizer. Round-tripped through JSON so that tuples compare equal to lists."""
  settings = {k: v for k, v in cfg.to_dict().items() if k != 'name'}
  return json.loads(json.dumps({**settings, 'text_tokenizer_sha256': text_tokenizer_sha256}))
