"""Writes generated samples as files and one HTML page that shows them beside their prompts.

  NNN.png / NNN.wav / NNN.txt   each sample's output (images are the tokenizer's resolution; the
                                page scales them up without smoothing)
  NNN_input.png / .wav          I2T / S2T: the image or speech the caption was generated from
  samples.txt                   every prompt and text output, one block per sample
  index.html                    the gallery: a card per sample with its prompt, output and reference
"""

import html
import os

import numpy as np
from PIL import Image

from tmdm import storage
from tmdm.datasets import audio

_STYLE = """body{font-family:sans-serif;margin:1.5em;background:#fafafa}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;width:260px}
.card img{width:128px;height:128px;image-rendering:pixelated;display:block;margin:4px 0}
.card audio{width:100%}.p{color:#555;font-size:90%}.ref{color:#080;font-size:90%}
pre{white-space:pre-wrap;margin:4px 0}table{font-size:85%;border-collapse:collapse}td{padding:0 8px}"""


def _media(out_dir, name, item, audio_rate):
  """Writes an image or waveform; returns its HTML tag."""
  item = np.asarray(item)
  if item.ndim == 3:
    Image.fromarray((np.clip(item, 0, 1) * 255).round().astype(np.uint8)).save(os.path.join(out_dir, name + '.png'))
    return f'<img src="{name}.png" alt="{name}">'
  audio.write_wav(os.path.join(out_dir, name + '.wav'), item, audio_rate)
  return f'<audio controls src="{name}.wav"></audio>'


def write(out_dir, samples, *, title: str, audio_rate: int, settings: dict | None = None) -> str:
  """Writes every sample and index.html into out_dir (a folder or a URL: built locally, then
  uploaded, the page last); returns the page's path."""
  with storage.staged(out_dir, last='index.html') as local:
    _write_local(local, samples, title=title, audio_rate=audio_rate, settings=settings)
  return storage.join(out_dir, 'index.html')


def _write_local(out_dir, samples, *, title: str, audio_rate: int, settings: dict | None):
  os.makedirs(out_dir, exist_ok=True)
  cards, texts = [], []
  for i, smp in enumerate(samples):
    name = f'{i:03d}'
    parts = [f'<div class="p">{html.escape(smp.prompt) or "<i>(unconditional)</i>"}</div>']
    if smp.condition is not None:
      parts.append(_media(out_dir, name + '_input', smp.condition, audio_rate))
    if isinstance(smp.output, str):
      with open(os.path.join(out_dir, name + '.txt'), 'w', encoding='utf-8') as f:
        f.write(smp.output + '\n')
      parts.append(f'<pre>{html.escape(smp.output)}</pre>')
      texts.append(f'--- sample {i} ({smp.task}, prompt {smp.prompt!r})\n{smp.output}\n')
    else:
      parts.append(_media(out_dir, name, smp.output, audio_rate))
    if smp.reference:
      parts.append(f'<div class="ref">reference: {html.escape(smp.reference)}</div>')
    cards.append(f'<div class="card"><b>{name}</b>{"".join(parts)}</div>')
  if texts:
    with open(os.path.join(out_dir, 'samples.txt'), 'w', encoding='utf-8') as f:
      f.writelines(texts)
  rows = ''.join(f'<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>'
                 for k, v in (settings or {}).items())
  page = (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
          f'<style>{_STYLE}</style></head><body><h2>{html.escape(title)}</h2><table>{rows}</table>'
          f'<div class="grid">{"".join(cards)}</div></body></html>\n')
  with open(os.path.join(out_dir, 'index.html'), 'w', encoding='utf-8') as f:
    f.write(page)
