"""A small corpus of one's own, in the documented input formats (docs/own_data.md), to try
experiments/custom.py end to end:

  python -m tmdm.tools.example_corpus my_corpus [--docs=200 --images=240 --clips=60]
  tmdm prepare --config=experiments/custom.py:my_corpus

  my_corpus/text/NNNN.txt          one UTF-8 document per file: Python's own documentation (pydoc)
  my_corpus/images/captions.jsonl  {"image": "shapes/NNNN.png", "caption": "a red circle on white"}
  my_corpus/images/shapes/         64 x 64 PNGs drawn with PIL: a shape of a colour and a size
  my_corpus/images/pairs.parquet   with --parquet: the same pairs, columns "image" (the PNG bytes) and "caption"
  my_corpus/speech/clips.jsonl     {"audio": "wav/NNNN.wav", "text": "the sentence spoken"}
  my_corpus/speech/wav/            sentences spoken by espeak-ng in a voice the demo does not use, 22.05 kHz
"""

import argparse
import json
import os
import pydoc
import subprocess

import numpy as np
from PIL import Image, ImageDraw

MODULES = ('json', 'os', 'pathlib', 'random', 'string', 'textwrap', 'collections', 'itertools', 'functools',
           'math', 'statistics', 'datetime', 'csv', 'glob', 'shutil', 'tempfile', 'argparse', 'logging',
           'heapq', 'bisect', 'difflib', 'fractions', 'decimal', 'enum', 'dataclasses', 'typing', 'abc', 'io')
COLOURS = {'red': (220, 40, 40), 'green': (40, 170, 60), 'blue': (50, 80, 220), 'yellow': (230, 200, 30),
           'purple': (140, 60, 170), 'orange': (240, 140, 30)}
SHAPES = ('circle', 'square', 'triangle', 'cross')
SIZES = {'small': 0.25, 'large': 0.42}
VOICE = 'en-au'  # Not among the demo's audio.voices.


def write_text(folder, docs: int):
  """Paragraphs of pydoc's plain-text rendering of standard modules, one per file."""
  os.makedirs(folder, exist_ok=True)
  paragraphs = []
  for name in MODULES:
    text = pydoc.plaintext.document(pydoc.importlib.import_module(name))
    paragraphs += [p.strip() for p in text.split('\n\n') if len(p.split()) >= 8]
  for i, p in enumerate(paragraphs[:docs]):
    with open(os.path.join(folder, f'{i:04d}.txt'), 'w', encoding='utf-8') as f:
      f.write(p + '\n')
  return min(docs, len(paragraphs))


def draw_shape(shape, colour, size, rng, side=64):
  img = Image.new('RGB', (side, side), 'white')
  d = ImageDraw.Draw(img)
  r = SIZES[size] * side
  cx, cy = side / 2 + rng.uniform(-0.1, 0.1) * side, side / 2 + rng.uniform(-0.1, 0.1) * side
  fill = COLOURS[colour]
  if shape == 'circle':
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
  elif shape == 'square':
    d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
  elif shape == 'triangle':
    d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
  else:
    w = r / 3
    d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
  return img


def _write_jsonl(path, records):
  with open(path, 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)


def write_images(folder, n: int, seed=0):
  os.makedirs(os.path.join(folder, 'shapes'), exist_ok=True)
  rng = np.random.default_rng(seed)
  records = []
  for i in range(n):
    shape, colour = SHAPES[i % len(SHAPES)], list(COLOURS)[(i // len(SHAPES)) % len(COLOURS)]
    size = list(SIZES)[int(rng.integers(len(SIZES)))]
    name = f'shapes/{i:04d}.png'
    draw_shape(shape, colour, size, rng).save(os.path.join(folder, name))
    records.append({'image': name, 'caption': f'a {size} {colour} {shape} on white'})
  _write_jsonl(os.path.join(folder, 'captions.jsonl'), records)
  return n


def write_parquet(folder):
  """folder/captions.jsonl as folder/pairs.parquet, the images' bytes inline (`parquet:` sources)."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  with open(os.path.join(folder, 'captions.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  images = []
  for r in rows:
    with open(os.path.join(folder, r['image']), 'rb') as f:
      images.append(f.read())
  pq.write_table(pa.table({'image': images, 'caption': [r['caption'] for r in rows]}),
                 os.path.join(folder, 'pairs.parquet'))


def write_speech(folder, n: int, seed=0):
  """Short sentences about the shapes, spoken by espeak-ng at its native 22.05 kHz."""
  os.makedirs(os.path.join(folder, 'wav'), exist_ok=True)
  rng = np.random.default_rng(seed)
  records = []
  for i in range(n):
    words = [list(SIZES)[int(rng.integers(2))], list(COLOURS)[int(rng.integers(len(COLOURS)))],
             SHAPES[int(rng.integers(len(SHAPES)))]]
    sentence = f'draw a {" ".join(words)}'
    name = f'wav/{i:04d}.wav'
    subprocess.run(['espeak-ng', '-v', VOICE, '-s', str(int(rng.integers(150, 190))), '-w',
                    os.path.join(folder, name), sentence], check=True)
    records.append({'audio': name, 'text': sentence})
  _write_jsonl(os.path.join(folder, 'clips.jsonl'), records)
  return n


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('out', help='the corpus folder to write')
  p.add_argument('--docs', type=int, default=400, help='text documents')
  p.add_argument('--images', type=int, default=240, help='captioned images')
  p.add_argument('--clips', type=int, default=60, help='spoken sentences')
  p.add_argument('--parquet', action='store_true', help='also write the image pairs as images/pairs.parquet')
  args = p.parse_args(argv)
  counts = (write_text(os.path.join(args.out, 'text'), args.docs),
            write_images(os.path.join(args.out, 'images'), args.images),
            write_speech(os.path.join(args.out, 'speech'), args.clips))
  if args.parquet:
    write_parquet(os.path.join(args.out, 'images'))
  print(f'{args.out}: {counts[0]} text documents, {counts[1]} captioned images, {counts[2]} spoken sentences')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
