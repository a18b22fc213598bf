"""Image-text pairs: offline sources, captions, and `prepare_image`, which trains the image tokenizer
and writes the dataset (data/store.py format, fields 'text' and 'image').

Sources (entries of config `image.sources`):
  digits       scikit-learn's bundled 8x8 handwritten digits (1797), upsampled to dark ink on white,
               captioned with one of several phrasings ("a handwritten digit seven", ...)
  adwaita      Debian `adwaita-icon-theme` PNG icons, alpha composited on white, captioned from the
               icon's name ("an icon of folder open"); every size folder, pixel-identical results dropped
  jsonl:PATH   a user's pairs, one {"image": path, "caption": text} per line (paths relative to PATH)
  folder:DIR   the same, read from DIR/captions.jsonl
  parquet:GLOB the same as columns "image" (encoded image bytes, or a path relative to the file) and "caption"
Bad records of a user's files follow records.py's policy; the built-ins' unreadable icons and
duplicates are skipped and counted.

Legend: N items, H W C image height, width, channels (C = 3), uint8 while read, float32 in [0, 1]
for the tokenizer.
"""

import dataclasses
import glob
import hashlib
import io
import os
import re

import numpy as np
from PIL import Image

from tmdm.data import store
from tmdm.datasets import pairs, records, text
from tmdm.tokenizers import image as image_tok, registry as tok_registry

ADWAITA_DIR = '/usr/share/icons/Adwaita'
TOKENIZER_DIR = 'tokenizer'  # The trained tokenizer, relative to the dataset root.
LABELS_DIR = 'labels'  # labels/<split>.npy: int32 digit class per record, -1 where not a digit.
NUMBER_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
DIGIT_CAPTIONS = ('a handwritten digit {word}', 'the number {n} written by hand', 'a hand-drawn {word}',
                  'the digit {n}', 'a scanned handwritten {word}', 'the numeral {word}, written in ink',
                  'a small picture of the number {word}', 'handwriting: the digit {n}')
# image.digit_captions: 'varied' phrasings, or the number word alone (the whole caption is what the image decides).
DIGIT_CAPTION_STYLES = {'varied': DIGIT_CAPTIONS, 'word': ('{word}',)}
ICON_CAPTIONS = ('an icon of {phrase}', 'the {phrase} icon', 'a {style} icon showing {phrase}',
                 'a small {style} picture of {phrase}', '{phrase}, as an icon')
ICON_DROP_WORDS = {'symbolic', 'x', 'rtl', 'ltr'}  # Name parts that say nothing about the picture.


@dataclasses.dataclass
class Item:
  key: str  # Decides the split: items sharing a key (one icon at several sizes) stay together.
  caption: str
  image_HWC: np.ndarray  # uint8
  label: int = -1  # Digit class, -1 for anything else.


FITS = ('pad', 'crop', 'stretch')  # image.fit: how a non-square image becomes size x size


def to_rgb(img: Image.Image, size: int, fit: str = 'pad') -> np.ndarray:
  """Any PIL image -> uint8 [size, size, 3], transparency composited on white. A non-square image
  keeps its aspect ratio: 'pad' centres it on white, 'crop' takes its centre square; 'stretch'
  resizes it to the square regardless. Square images are the same under all three."""
  if fit not in FITS:
    raise ValueError(f'image.fit must be one of {", ".join(FITS)} (got {fit!r})')
  rgba = img.convert('RGBA')
  white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
  rgb = Image.alpha_composite(white, rgba).convert('RGB')
  w, h = rgb.size
  if w != h and fit == 'pad':
    square = Image.new('RGB', (max(w, h), max(w, h)), (255, 255, 255))
    square.paste(rgb, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    rgb = square
  elif w != h and fit == 'crop':
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    rgb = rgb.crop((left, top, left + side, top + side))
  if rgb.size != (size, size):
    rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
  return np.asarray(rgb, np.uint8)


def digit_to_rgb(digit_88, size: int = 32) -> np.ndarray:
  """A scikit-learn digit (8x8, ink 0..16) -> uint8 [size, size, 3], dark ink on white. Evaluators that
  train a classifier on real digits use this same transform."""
  gray = np.clip(255 - np.asarray(digit_88, np.float64) * (255 / 16), 0, 255).astype(np.uint8)
  img = Image.fromarray(gray, 'L').resize((size, size), Image.Resampling.BICUBIC)
  return np.repeat(np.asarray(img, np.uint8)[..., None], 3, axis=-1)


def read_digits(size, rng, counts, templates=DIGIT_CAPTIONS):
  from sklearn import datasets  # pylint: disable=import-outside-toplevel  (slow import, one source)
  digits = datasets.load_digits()
  for i, (img, label) in enumerate(zip(digits.images, digits.target)):
    template = templates[rng.integers(len(templates))]
    caption = template.format(word=NUMBER_WORDS[label], n=int(label))
    counts['read'] += 1
    yield Item(f'digit-{i}', caption, digit_to_rgb(img, size), int(label))


def icon_phrase(filename: str) -> str:
  """'folder-open-symbolic.symbolic.png' -> 'folder open'."""
  stem = os.path.basename(filename).split('.')[0]
  words = [w for w in re.split(r'[-_+]', stem.lower()) if w and w not in ICON_DROP_WORDS]
  return ' '.join(words)


def read_adwaita(size, rng, counts):
  if not os.path.isdir(ADWAITA_DIR):
    raise text.MissingCorpus(f'{ADWAITA_DIR} not found: install it with `apt-get install adwaita-icon-theme`')
  seen = set()
  for path in sorted(glob.glob(os.path.join(ADWAITA_DIR, '*', '*', '*.png'))):
    if os.path.basename(os.path.dirname(os.path.dirname(path))) in ('8x8', 'cursors'):
      continue  # 8-pixel icons are too coarse to say what they show.
    counts['read'] += 1
    try:
      with Image.open(path) as img:
        pixels = to_rgb(img, size)
    except (OSError, ValueError):
      counts['unreadable_image'] += 1
      continue
    digest = hashlib.sha1(pixels.tobytes()).digest()
    if digest in seen:
      counts['duplicate'] += 1
      continue
    seen.add(digest)
    phrase = icon_phrase(path)
    style = 'grey symbolic' if 'symbolic' in os.path.basename(path) else 'colourful'
    template = ICON_CAPTIONS[rng.integers(len(ICON_CAPTIONS))]
    yield Item(f'icon-{phrase}', template.format(phrase=phrase, style=style), pixels)


def tokenizer_quality(root, tokenizer, images, codes, labels) -> dict:
  """PSNR of the tokenizer's reconstructions of validation images (digits and other images apart) and
  ROOT/preview_val.png of 8 digits and 8 others, originals above reconstructions."""
  recon = tokenizer.decode(codes)
  db = image_tok.psnr(images, recon)
  quality = {'val_psnr_db': round(float(db.mean()), 3), 'val_items': len(images)}
  if (labels >= 0).any():
    quality['val_psnr_db_digits'] = round(float(db[labels >= 0].mean()), 3)
  if (labels < 0).any():
    quality['val_psnr_db_other'] = round(float(db[labels < 0].mean()), 3)
  order = np.argsort(labels)[::-1]  # Digits first, then icons.
  picks = np.concatenate([order[:8], order[-8:]])
  save_preview(os.path.join(root, 'preview_val.png'), images[picks], recon[picks])
  return quality


def load_user_image(ref, size, fit):
  """A user's image (a path, or the encoded bytes of a Parquet row) -> uint8 [size, size, 3]."""
  with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as img:
    return to_rgb(img, size, fit)


def user_pairs(kind, name, rows, folder_of, size, counts, tally, fit):
  """Items of (where, line or row) records of a user's file, bad ones counted and tallied (records.py)."""
  for where, raw, path in rows:
    counts['read'] += 1
    tally.seen(name)
    got = records.parse_line(kind, raw, where) if isinstance(raw, str) else records.check(kind, raw, where)
    if not isinstance(got, records.Bad):
      value, caption = got
      ref, key, shown = records.media_ref(value, folder_of(path), os.path.join)
      try:
        yield Item(key, caption.strip(), load_user_image(ref, size, fit))
        continue
      except (OSError, ValueError, TypeError, Image.DecompressionBombError) as e:
        got = records.unreadable(kind, where, shown, e)
    counts[got.skip] += 1
    tally.add(name, got)


def read_pairs_jsonl(path, size, rng, counts, fit='pad', tally=None, name=None):
  """User pairs: {"image": path, "caption": text} per line; image paths relative to the file's folder."""
  del rng
  if not os.path.isfile(path):
    raise text.MissingCorpus(f'{path} not found (expected a JSONL of {{"image": path, "caption": text}})')
  rows = ((where, line, path) for where, line in text.jsonl_lines(path))
  yield from user_pairs('image', name or f'jsonl:{path}', rows, records.relative_to, size, counts,
                        tally or records.Tally(), fit)


def read_pairs_parquet(pattern, size, rng, counts, fit='pad', tally=None, name=None):
  """User pairs as Parquet: "image" (bytes, or a path relative to the file) and "caption" columns."""
  del rng
  paths = sorted(glob.glob(pattern, recursive=True))
  if not paths:
    raise text.MissingCorpus(f'no files match {pattern!r}')
  rows = ((where, row, path) for path in paths
          for where, row in records.parquet_rows('image', path, lambda p: open(p, 'rb')))
  yield from user_pairs('image', name or f'parquet:{pattern}', rows, records.relative_to, size, counts,
                        tally or records.Tally(), fit)


IMAGE_SOURCES = {'digits': read_digits, 'adwaita': read_adwaita}
USER_IMAGE_SOURCES = {'jsonl': read_pairs_jsonl, 'parquet': read_pairs_parquet,
                      'folder': lambda d, *a, **k: read_pairs_jsonl(os.path.join(d, 'captions.jsonl'), *a, **k)}


def read_source(name, size, rng, counts, fit='pad', tally=None, digit_captions='varied'):
  kind, sep, arg = name.partition(':')
  if sep and kind in USER_IMAGE_SOURCES:
    return USER_IMAGE_SOURCES[kind](arg, size, rng, counts, fit=fit, tally=tally, name=name)
  if name not in IMAGE_SOURCES:
    raise text.MissingCorpus(f'unknown image source {name!r} (choices: {", ".join(IMAGE_SOURCES)}, '
                             'jsonl:PATH, folder:DIR, parquet:GLOB)')
  if name == 'digits':
    return read_digits(size, rng, counts, DIGIT_CAPTION_STYLES[digit_captions])
  return IMAGE_SOURCES[name](size, rng, counts)


def tokenize_captions(items, tok, counts):
  """Caption ids per item; items whose caption tokenizes to nothing are dropped and counted."""
  ids = tok.encode([it.caption for it in items]) if items else []
  kept = [(it, x) for it, x in zip(items, ids) if len(x)]
  counts['empty_caption'] += len(items) - len(kept)
  return kept


def save_preview(path, originals_NHWC, recons_NHWC, n=16):
  """Top row originals, bottom row reconstructions (uint8 PNG), for eyeballing the tokenizer."""
  a = np.concatenate(list(originals_NHWC[:n]), axis=1)
  b = np.concatenate(list(recons_NHWC[:n]), axis=1)
  Image.fromarray((np.clip(np.concatenate([a, b], axis=0), 0, 1) * 255).astype(np.uint8)).resize(
      (a.shape[1] * 3, a.shape[0] * 6), Image.Resampling.NEAREST).save(path)


def prepare_image(root, *, text_tokenizer: text.TextTokenizer, cfg, progress=None, log=print, max_bad_fraction=1.0):
  """Reads the sources, trains the image tokenizer on the train split, writes the dataset; returns the
  manifest. cfg: the config's `image` section (ConfigDict); max_bad_fraction: records.py's policy
  (`tmdm prepare` passes data.max_bad_fraction)."""
  progress = progress or (lambda it, **_: it)
  rng = np.random.default_rng(cfg.seed)
  counts = {k: 0 for k in ('read', 'unreadable_image', 'empty_caption', 'bad_line', 'duplicate')}
  tally = records.Tally(max_bad_fraction, log)
  items, per_source = [], {}
  for name in [s.strip() for s in cfg.sources.split(',') if s.strip()]:
    got = []
    for item in progress(read_source(name, cfg.size, rng, counts, cfg.fit, tally, cfg.digit_captions), desc=f'reading {name}',
                         unit='img'):
      if not item.caption.strip():
        counts['empty_caption'] += 1
        continue
      got.append(item)
      if cfg.max_items and len(got) >= cfg.max_items:
        log(f'image source {name!r}: stopped at image.max_items={cfg.max_items} pairs; the rest of the source was '
            'not read (set --config.image.max_items=0 to read all of it)')
        break
    tally.check(name)
    per_source[name] = len(got)
    items.extend(got)
  kept = tokenize_captions(items, text_tokenizer, counts)
  if not kept:
    raise text.MissingCorpus(f'no usable image-text pairs in {cfg.sources!r} (skipped: {counts})')
  oov = text.oov_report(text.oov_counts(text_tokenizer, [it.caption for it, _ in kept]))
  log(text.oov_line('image captions', oov))
  os.makedirs(root, exist_ok=True)
  pairs.copy_text_tokenizer(text_tokenizer, root)
  splits = {'train': [p for p in kept if not pairs.is_val(p[0].key, cfg.val_fraction)],
            'val': [p for p in kept if pairs.is_val(p[0].key, cfg.val_fraction)]}
  as_float = lambda part: np.stack([it.image_HWC for it, _ in part]).astype(np.float32) / 255

  if cfg.tokenizer_path:
    tokenizer, tok_file = tok_registry.load(cfg.tokenizer_path), os.path.abspath(cfg.tokenizer_path)
  else:
    tok_cfg = image_tok.ImageConfig(size=cfg.size, levels=tuple(cfg.levels), downsamples=cfg.downsamples,
                                    width=cfg.width)
    tokenizer = image_tok.train(as_float(splits['train']), tok_cfg, steps=cfg.train_steps,
                                batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, progress=progress)
    tokenizer.save(os.path.join(root, TOKENIZER_DIR))
    tok_file = TOKENIZER_DIR

  entries, quality = {}, {}
  os.makedirs(os.path.join(root, LABELS_DIR), exist_ok=True)
  for split, part in splits.items():
    images = as_float(part) if part else np.zeros((0, cfg.size, cfg.size, 3), np.float32)
    codes = []
    for lo in progress(range(0, len(images), cfg.encode_batch), desc=f'encoding {split} images', unit='batch'):
      codes.append(tokenizer.encode(images[lo:lo + cfg.encode_batch]))
    codes = np.concatenate(codes) if codes else np.zeros((0, tokenizer.tokens_per_item), np.int32)
    rows = [{'text': ids, 'image': c} for (_, ids), c in zip(part, codes)]
    entries[split] = [store.write_shard(os.path.join(root, split, '00000'), rows, ['text', 'image'])]
    labels = np.asarray([it.label for it, _ in part], np.int32)
    np.save(os.path.join(root, LABELS_DIR, f'{split}.npy'), labels)
    if split == 'val' and len(images):
      quality = tokenizer_quality(root, tokenizer, images, codes, labels)
  log(f'image tokenizer {tokenizer.name}: {quality}; skipped {counts}')
  source = {'sources': per_source, 'items': len(kept), 'skipped': counts, 'tokenizer_quality': quality,
            'settings': pairs.settings_of(cfg, text_tokenizer.sha256),
            'labels': {s: f'{LABELS_DIR}/{s}.npy' for s in splits}, 'oov': oov}  # Row i of a split is record i.
  if tally.bad:
    source['bad_records'] = tally.summary()
  return store.write_manifest(root, modality='image', fields=['text', 'image'],
                              tokenizers={'text': pairs.text_tokenizer_entry(text_tokenizer),
                                          'image': tokenizer.manifest_entry(tok_file)},
                              splits=entries, source=source)

