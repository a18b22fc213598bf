"""Generation tasks and their canvases, built in exactly the training layouts (data/pipeline.py).

TASKS maps a task to the dataset kind whose layout and tokenizers it uses:
  text  <txt> prompt [MASK]... </txt>                               unconditional (no prompt), prompted,
        or infilling: each '[MASK]' in the prompt becomes sample.infill_len masked tokens
  t2i   [T2I] <txt> caption </txt> <img> [MASK]*T </img> [PAD]...   caption is the condition
  t2s   [T2S] <txt> text </txt> <aud> [MASK]*T </aud> [PAD]...
  i2t   [I2T] <img> codes </img> <txt> [MASK]*n </txt> [PAD]...     image codes are the condition
  s2t   [S2T] <aud> codes </aud> <txt> [MASK]*n </txt> [PAD]...
Pair rows come from the pipeline's own `PairToRow` (its TARGET positions become [MASK], its
CONDITION positions are the ones classifier-free guidance masks), so a canvas can never drift from
what the model was trained on.

Caption and transcript length n (I2T, S2T): training rows give the caption a slot of its exact length
followed by `</txt>` and [PAD], and [PAD] is never predicted (it is FIXED, outside the loss), so the
model cannot choose a length: the caller must. Evaluation on held-out pairs uses each reference's
length; otherwise `sample.caption_len`.

Legend: N rows, L row length, T codes per item.
"""

import dataclasses

import numpy as np

from tmdm import vocab as vocab_lib
from tmdm.data import pipeline

INFILL_MARK = '[MASK]'


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  kind: str  # dataset kind: 'text', 'image' or 'audio'
  media_first: bool  # the condition is the image / audio (I2T, S2T)
  output: int  # modality the task generates (vocab_lib.TEXT / IMAGE / AUDIO)
  help: str


TASKS = {
    'text': Task('text', 'text', False, vocab_lib.TEXT, 'unconditional, prompted, or infilling ([MASK] in the prompt)'),
    't2i': Task('t2i', 'image', False, vocab_lib.IMAGE, 'text -> image'),
    't2s': Task('t2s', 'audio', False, vocab_lib.AUDIO, 'text -> speech'),
    'i2t': Task('i2t', 'image', True, vocab_lib.TEXT, 'image -> caption'),
    's2t': Task('s2t', 'audio', True, vocab_lib.TEXT, 'speech -> transcript'),
}


def sampler_section(sample_cfg, task: str):
  """The config section holding a task's sampler keys: `sample` itself for text, else `sample.<task>`."""
  return sample_cfg if task == 'text' else sample_cfg[task]


def _stack(rows, length):
  """Rows (dicts of 1-D arrays, possibly shorter than length) -> canvas of [N, length] arrays; the
  tail is [PAD] in segment 0, which attends only to itself (layers.Attention)."""
  out = {k: np.zeros((len(rows), length), np.int32) for k in ('tokens', 'segment_ids', 'positions', 'modality', 'cond')}
  out['tokens'][:] = vocab_lib.SPECIALS.index('[PAD]')
  for r, row in enumerate(rows):
    n = len(row['tokens'])
    for k in out:
      out[k][r, :n] = row[k]
  return out


def text_canvas(vocab: vocab_lib.VocabSpec, tokenizer, prompts, length: int, infill_len: int):
  """One document per row: `<txt> prompt [MASK]... </txt>` filling `length`, or, when the prompt
  holds INFILL_MARK, its pieces with infill_len masks in each gap."""
  rows = []
  for prompt in prompts:
    pieces = prompt.split(INFILL_MARK)
    encoded = [tokenizer.encode([p])[0] if p.strip() else np.zeros((0,), np.int32) for p in pieces]
    if len(pieces) == 1:  # Prompted / unconditional: generate up to the end of the row.
      gaps = [max(length - 2 - len(encoded[0]), 0)]
      encoded.append(np.zeros((0,), np.int32))
    else:
      gaps = [infill_len] * (len(pieces) - 1)
    body, masked = [], []
    for piece, gap in zip(encoded, gaps + [0]):
      body += [piece, np.zeros((gap,), np.int32)]
      masked += [np.zeros(len(piece), bool), np.ones(gap, bool)]
    body, masked = np.concatenate(body).astype(np.int64), np.concatenate(masked)
    if len(body) + 2 > length or not masked.any():
      raise ValueError(f'prompt {prompt!r} leaves no room to generate in a row of {length} tokens')
    rows.append((body, masked))
  return text_rows(vocab, rows, length)


def text_rows(vocab: vocab_lib.VocabSpec, rows, length: int):
  """(tokenizer ids [n], bool [n] masked) per row -> canvas of `<txt> ids </txt>` documents."""
  out = []
  for body, masked in rows:
    row = pipeline.TextToRow(vocab)({'text': np.asarray(body, np.int64)})
    row['tokens'][1:-1] = np.where(masked, vocab.mask_id, row['tokens'][1:-1])
    n = len(row['tokens'])
    out.append(dict(row, segment_ids=np.ones(n, np.int32), positions=np.arange(n, dtype=np.int32),
                    cond=np.zeros(n, np.int32)))
  return _stack(out, length)


def pair_canvas(vocab: vocab_lib.VocabSpec, task: Task, seq_len: int, *, texts=None, codes=None,
                tokens_per_item: int = 0, caption_lens=None):
  """T2I / T2S: `texts` (caption ids per row, tokenizer ids) and the media slot masked
  (`tokens_per_item` codes). I2T / S2T: `codes` [N, T] and a caption slot of caption_lens[i] masks."""
  to_row = pipeline.PairToRow(vocab, task.kind, seq_len, p_text_first=0.0 if task.media_first else 1.0)
  n = len(codes) if task.media_first else len(texts)
  rows = []
  for i in range(n):
    if task.media_first:
      record = {'text': np.zeros((int(caption_lens[i]),), np.int64), task.kind: np.asarray(codes[i], np.int64)}
    else:
      record = {'text': np.asarray(texts[i], np.int64), task.kind: np.zeros((tokens_per_item,), np.int64)}
    row = to_row(record, np.random.default_rng(0))
    if pipeline.SKIP in row:
      raise ValueError(f'{task.name} row {i} does not fit a row of {seq_len} tokens: {row[pipeline.SKIP]}')
    target = row['role'] == vocab_lib.TARGET
    rows.append({'tokens': np.where(target, vocab.mask_id, row['tokens']), 'segment_ids': row['segment_ids'],
                 'positions': row['positions'], 'modality': row['modality'],
                 'cond': (row['role'] == vocab_lib.CONDITION).astype(np.int32)})
  return _stack(rows, seq_len)


def generated(canvas, vocab: vocab_lib.VocabSpec):
  """Bool [N, L]: the positions a sampler fills."""
  return canvas['tokens'] == vocab.mask_id


def text_ids(out_NL, canvas, vocab: vocab_lib.VocabSpec, only_generated: bool):
  """Per row, the text tokenizer ids of its text positions (or of its generated ones)."""
  lo, _ = vocab.range(vocab_lib.TEXT)
  keep = vocab.modality_of(out_NL) == vocab_lib.TEXT
  if only_generated:
    keep &= generated(canvas, vocab)
  return [row[k] - lo for row, k in zip(out_NL, keep)]


def media_codes(out_NL, canvas, vocab: vocab_lib.VocabSpec, modality: int):
  """[N, T] codebook ids of the generated image / audio positions."""
  lo, _ = vocab.range(modality)
  keep = generated(canvas, vocab) & (canvas['modality'] == modality)
  return np.stack([row[k] - lo for row, k in zip(out_NL, keep)])
