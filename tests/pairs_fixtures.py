"""Session fixtures for the pair datasets: a tiny image-text and audio-text dataset, each with a
tokenizer trained for a few seconds, plus user inputs with known defects (to be skipped and counted).

Test files import the fixtures they use; the module-level cache builds each dataset once per session
even though every importing module registers its own copy of the fixture.
"""

import json
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from tmdm.config import base as base_config

_BUILT = {}


def text_tokenizer(text_data):
  from tmdm.datasets import text  # pylint: disable=import-outside-toplevel
  return text.TextTokenizer(os.path.join(text_data, 'fortunes-smoke', 'spm.model'))


def image_cfg(**kw):
  c = base_config.get_config().image
  c.update(train_steps=150, batch_size=32, width=16, lr=3e-3, encode_batch=128)
  c.update(**kw)
  return c


def audio_cfg(**kw):
  c = base_config.get_config().audio
  c.update(seconds=2.0, min_words=2, max_words=5, speeds=(170, 190), max_items=48, width=32, train_steps=150,
           batch_size=16, lr=3e-3, encode_batch=16, griffin_lim_iters=8, listen=2, val_fraction=0.15)
  c.update(**kw)
  return c


def write_user_images(folder):
  """3 good pairs and 5 bad lines: unreadable file, missing file, empty caption, bad JSON, no caption."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(os.path.join(folder, 'noise.png'))
  rgba = np.zeros((16, 16, 4), np.uint8)
  rgba[4:12, 4:12] = (200, 0, 0, 255)  # A red square on transparency: composited on white.
  Image.fromarray(rgba, 'RGBA').save(os.path.join(folder, 'square.png'))
  Image.fromarray(np.full((32, 32), 90, np.uint8), 'L').save(os.path.join(folder, 'gray.jpg'))
  with open(os.path.join(folder, 'broken.png'), 'wb') as f:
    f.write(b'this is not a png')
  lines = [{'image': 'noise.png', 'caption': 'random coloured noise'},
           {'image': 'square.png', 'caption': 'a red square'},
           {'image': 'gray.jpg', 'caption': 'a flat grey picture'},
           {'image': 'broken.png', 'caption': 'unreadable'},
           {'image': 'missing.png', 'caption': 'no such file'},
           {'image': 'square.png', 'caption': '   '}]
  with open(os.path.join(folder, 'captions.jsonl'), 'w') as f:
    f.writelines(json.dumps(x) + '\n' for x in lines)
    f.write('{not json\n')
    f.write(json.dumps({'image': 'square.png'}) + '\n')
  return os.path.join(folder, 'captions.jsonl')


def write_user_clips(folder, rate=22_050):
  """1 good clip and 5 bad lines: unreadable, silent, too long (3 s > 2 s), empty transcript, bad JSON."""
  from tmdm.datasets import audio  # pylint: disable=import-outside-toplevel
  os.makedirs(folder, exist_ok=True)
  subprocess.run(['espeak-ng', '-v', 'en-us', '-w', os.path.join(folder, 'good.wav'), 'hello there'], check=True)
  audio.write_wav(os.path.join(folder, 'silent.wav'), np.zeros(rate, np.float32), rate)
  tone = 0.3 * np.sin(2 * np.pi * 220 * np.arange(3 * rate) / rate)
  audio.write_wav(os.path.join(folder, 'long.wav'), tone, rate)
  with open(os.path.join(folder, 'broken.wav'), 'wb') as f:
    f.write(b'RIFF not really a wav')
  lines = [{'audio': 'good.wav', 'text': 'hello there'}, {'audio': 'broken.wav', 'text': 'unreadable'},
           {'audio': 'silent.wav', 'text': 'nothing at all'}, {'audio': 'long.wav', 'text': 'a long hum'},
           {'audio': 'good.wav', 'text': ''}]
  path = os.path.join(folder, 'clips.jsonl')
  with open(path, 'w') as f:
    f.writelines(json.dumps(x) + '\n' for x in lines)
    f.write('[1, 2\n')
  return path


@pytest.fixture(scope='session')
def image_data(tmp_path_factory, text_data):
  """(root, manifest) of digits + the user images above, tokenizer trained 150 steps at width 16."""
  if 'image' not in _BUILT:
    from tmdm.datasets import image  # pylint: disable=import-outside-toplevel
    base = tmp_path_factory.mktemp('pairs')
    user = os.path.dirname(write_user_images(str(base / 'user_images')))
    root = str(base / 'digits')  # `folder:DIR` reads DIR/captions.jsonl through the `jsonl:PATH` reader.
    manifest = image.prepare_image(root, text_tokenizer=text_tokenizer(text_data),
                                   cfg=image_cfg(sources=f'digits,folder:{user}'), log=lambda *_: None)
    _BUILT['image'] = (root, manifest)
  return _BUILT['image']


@pytest.fixture(scope='session')
def audio_data(tmp_path_factory, text_data):
  """(root, manifest) of 48 espeak clips of 2 s + the user clips above, tokenizer trained 150 steps."""
  if 'audio' not in _BUILT:
    from tmdm.datasets import audio  # pylint: disable=import-outside-toplevel
    base = tmp_path_factory.mktemp('pairs')
    user = write_user_clips(str(base / 'user_clips'))
    root = str(base / 'speech')
    manifest = audio.prepare_audio(root, text_tokenizer=text_tokenizer(text_data),
                                   cfg=audio_cfg(sources=f'espeak:fortunes,jsonl:{user}'), log=lambda *_: None)
    _BUILT['audio'] = (root, manifest)
  return _BUILT['audio']
