"""The joint vocabulary: one id space for special tokens, text, image codes and audio codes.

Layout (contiguous ranges, in this order):
  [0, num_special)                 special tokens (SPECIALS, then reserved slots)
  [text_start, text_start + T)     text tokenizer ids, shifted
  [image_start, image_start + I)   image codebook ids, shifted
  [audio_start, audio_start + A)   audio codebook ids, shifted
  [.., size)                       padding up to a multiple of `multiple`; never predicted

Every position of a row carries a modality (0 text, 1 image, 2 audio); the model may only predict
ids of that position's modality (`allowed_table`).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np

SPECIALS = ('[PAD]', '[MASK]', '<txt>', '</txt>', '<img>', '</img>', '<aud>', '</aud>',
            '[TXT]', '[T2I]', '[T2S]', '[I2T]', '[S2T]')
MODALITIES = ('text', 'image', 'audio')
TEXT, IMAGE, AUDIO = 0, 1, 2

# Roles of positions in a row (per-token `role` array of a batch).
FIXED = 0  # Layout tokens and padding: never masked, never in the loss.
TARGET = 1  # Masked at rate 1 - alpha(t) and supervised.
CONDITION = 2  # Like TARGET, but a corruption mode may keep it clean or mask it whole (pairs).


@dataclasses.dataclass(frozen=True)
class VocabSpec:
  text_size: int
  image_size: int
  audio_size: int
  multiple: int = 128
  num_special: int = 16  # SPECIALS plus reserved slots for later tokens.

  def __post_init__(self):
    if self.num_special < len(SPECIALS):
      raise ValueError(f'num_special must be at least {len(SPECIALS)}')

  @classmethod
  def from_config(cls, vocab_cfg) -> 'VocabSpec':
    return cls(vocab_cfg.text_size, vocab_cfg.image_size, vocab_cfg.audio_size, vocab_cfg.multiple)

  @property
  def text_start(self) -> int:
    return self.num_special

  @property
  def image_start(self) -> int:
    return self.text_start + self.text_size

  @property
  def audio_start(self) -> int:
    return self.image_start + self.image_size

  @property
  def used(self) -> int:
    return self.audio_start + self.audio_size

  @property
  def size(self) -> int:
    return -(-self.used // self.multiple) * self.multiple

  def id(self, name: str) -> int:
    return SPECIALS.index(name)

  @property
  def pad_id(self) -> int:
    return self.id('[PAD]')

  @property
  def mask_id(self) -> int:
    return self.id('[MASK]')

  def range(self, modality: int) -> tuple[int, int]:
    starts = (self.text_start, self.image_start, self.audio_start)
    sizes = (self.text_size, self.image_size, self.audio_size)
    return starts[modality], starts[modality] + sizes[modality]

  def allowed_table(self) -> np.ndarray:
    """Bool [M, size] (M = len(MODALITIES)): which ids a position of each modality may predict."""
    table = np.zeros((len(MODALITIES), self.size), bool)
    for m in range(len(MODALITIES)):
      lo, hi = self.range(m)
      table[m, lo:hi] = True
    return table

  def modality_of(self, ids: np.ndarray) -> np.ndarray:
    """Modality of each id (-1 for specials and padding ids)."""
    ids = np.asarray(ids)
    out = np.full(ids.shape, -1, np.int32)
    for m in range(len(MODALITIES)):
      lo, hi = self.range(m)
      out[(ids >= lo) & (ids < hi)] = m
    return out

  def to_dict(self) -> dict:
    return dataclasses.asdict(self) | {'size': self.size, 'specials': list(SPECIALS)}


def restrict(logits_BLV, modality_BL, allowed_MV):
  """-inf outside each position's modality range (docs/design.md 2.2); allowed_MV is `allowed_table()`.
  Here, below both the model and the samplers, so that neither reaches into the other for it."""
  return jnp.where(allowed_MV[modality_BL], logits_BLV, -jnp.inf)
