"""Loads any registered tokenizer from its folder: the kinds are the classes image.py and audio.py
register with base.register, so this module imports them (base.py knows no subclass)."""

from tmdm.tokenizers import audio, base, image

KNOWN = (audio, image)  # Imported for their registrations.


def load(folder) -> base.Tokenizer:
  kind = base.read_config(folder)['kind']
  if kind not in base.KINDS:
    raise ValueError(f'{folder}: unknown tokenizer kind {kind!r} (known: {", ".join(base.KINDS)})')
  return base.KINDS[kind].load(folder)
