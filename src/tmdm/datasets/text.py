"""Text: offline English corpora, a SentencePiece tokenizer, and `prepare_text` which writes a
tokenized dataset (data/store.py format).

Corpora (Debian packages, no download at run time):
  fortunes  package `fortunes`: /usr/share/games/fortunes, one document per fortune ('%' separated)
  kjv       package `bible-kjv`: the King James Bible through the `bible` program, one document per chapter
  gcide     package `dict-gcide`: GNU Collaborative International Dictionary of English, one per entry
A user's own text: `txt:GLOB` (one document per file) or `jsonl:PATH` (objects with a "text" field).
"""

import glob
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess

import numpy as np
import sentencepiece as spm

from tmdm import storage
from tmdm.data import store
from tmdm.errors import ConfigError, MissingCorpus

log = logging.getLogger('tmdm')

NEWLINE = '<n>'  # SentencePiece folds whitespace; newlines survive as this symbol.
FORTUNE_DIR = '/usr/share/games/fortunes'
GCIDE_FILE = '/usr/share/dictd/gcide.dict.dz'
KJV_BOOKS = ('Gen Exo Lev Num Deu Jos Jdg Rut 1Sa 2Sa 1Ki 2Ki 1Ch 2Ch Ezr Neh Est Job Psa Pro Ecc Son Isa Jer '
             'Lam Eze Dan Hos Joe Amo Oba Jon Mic Nah Hab Zep Hag Zec Mal Mat Mar Luk Joh Act Rom 1Co 2Co Gal '
             'Eph Phi Col 1Th 2Th 1Ti 2Ti Tit Phm Heb Jas 1Pe 2Pe 1Jo 2Jo 3Jo Jud Rev').split()




def read_fortunes():
  if not os.path.isdir(FORTUNE_DIR):
    raise MissingCorpus(f'{FORTUNE_DIR} not found: install it with `apt-get install fortunes`')
  seen = set()
  for path in sorted(glob.glob(os.path.join(FORTUNE_DIR, '*'))):
    real = os.path.realpath(path)
    if real.endswith('.dat') or real in seen or not os.path.isfile(real):
      continue
    seen.add(real)
    with open(real, encoding='utf-8', errors='replace') as f:
      for doc in f.read().split('\n%\n'):
        doc = doc.strip('%\n ')
        if doc:
          yield doc


def read_kjv():
  if shutil.which('bible') is None:
    raise MissingCorpus('the `bible` program is missing: install it with `apt-get install bible-kjv`')
  for book in KJV_BOOKS:
    out = subprocess.run(['bible', '-f', f'{book}1:1-{book}150:200'], capture_output=True, text=True,
                         check=False).stdout
    chapters = {}
    for line in out.splitlines():
      m = re.match(r'^\S+?(\d+):(\d+) (.*)$', line)
      if m:
        chapters.setdefault(int(m.group(1)), []).append(m.group(3))
    for _, verses in sorted(chapters.items()):
      yield ' '.join(verses)


def read_gcide():
  if not os.path.isfile(GCIDE_FILE):
    raise MissingCorpus(f'{GCIDE_FILE} not found: install it with `apt-get install dict-gcide`')
  with gzip.open(GCIDE_FILE, 'rt', encoding='utf-8', errors='replace') as f:
    entry = []
    for line in f:
      if line.strip() == '' and entry:
        text = ' '.join(x.strip() for x in entry if not x.startswith('00-'))
        if len(text) > 40:
          yield text
        entry = []
      elif line.strip():
        entry.append(line)


def read_files(pattern):
  """`txt:GLOB`: one document per file."""
  paths = sorted(glob.glob(pattern, recursive=True))
  if not paths:
    raise MissingCorpus(f'no files match {pattern!r}')
  empty = 0
  for path in paths:
    with open(path, 'rb') as f:
      doc = decode_utf8(f.read(), path).strip()
    if doc:
      yield doc
    else:
      empty += 1
  if empty:
    log.warning('%d of the %d files of %r are empty and were skipped', empty, len(paths), pattern)


def decode_utf8(data: bytes, where: str) -> str:
  """UTF-8 text, or a one-line error naming the file and the first byte that is not UTF-8 (a Latin-1
  file would otherwise become replacement characters, silently)."""
  try:
    return data.decode('utf-8').replace('\r\n', '\n').replace('\r', '\n')  # Newlines as text mode reads them.
  except UnicodeDecodeError as e:
    raise MissingCorpus(f'{where}: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); text sources must '
                        'be UTF-8: convert it first, e.g. `iconv -f latin1 -t utf-8`') from None


def read_jsonl(path):
  """`jsonl:PATH`: one JSON object per line with a "text" field."""
  if not os.path.isfile(path):
    raise MissingCorpus(f'{path} not found')
  with open(path, encoding='utf-8', errors='surrogateescape') as f:  # Lines as text mode splits them.
    for n, line in enumerate(f, 1):
      if any('\udc80' <= c <= '\udcff' for c in line):  # A byte that is not UTF-8, kept as a surrogate.
        decode_utf8(line.encode('utf-8', 'surrogateescape'), f'{path}:{n}')
      if not line.strip():
        continue
      try:
        doc = json.loads(line)['text']
      except (json.JSONDecodeError, KeyError, TypeError):
        raise MissingCorpus(f'{path}:{n}: expected a JSON object with a "text" field') from None
      if doc.strip():
        yield doc


DIGIT_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')


def read_numbers(count: int = 6000, seed: int = 0):
  """Sequences of three or four digit words ("seven two nine"), generated: a closed-vocabulary corpus
  for speech (`audio.sources=espeak:numbers`), whose transcripts the audio alone decides (no template
  words around what the condition says)."""
  rng = np.random.default_rng(seed)
  for _ in range(count):
    yield ' '.join(DIGIT_WORDS[d] for d in rng.integers(0, 10, int(rng.integers(3, 5))))


CORPORA = {'fortunes': read_fortunes, 'kjv': read_kjv, 'gcide': read_gcide, 'numbers': read_numbers}
USER_CORPORA = {'txt': read_files, 'jsonl': read_jsonl}  # 'kind:argument' entries of data.text_sources


def read_corpus(name):
  kind, sep, arg = name.partition(':')
  if sep and kind in USER_CORPORA:
    return USER_CORPORA[kind](arg)
  if name not in CORPORA:
    raise MissingCorpus(f'unknown text corpus {name!r} (choices: {", ".join(CORPORA)}, txt:GLOB, jsonl:PATH)')
  return CORPORA[name]()


class TextTokenizer:
  """SentencePiece wrapper: ids are 0-based tokenizer ids (the vocab layout shifts them)."""

  def __init__(self, model_path):
    self.path = model_path
    proto = storage.read_bytes(model_path)  # A local file or a URL (gs://...).
    self.sp = spm.SentencePieceProcessor(model_proto=proto)
    self.vocab_size = self.sp.get_piece_size()
    self.sha256 = hashlib.sha256(proto).hexdigest()

  def encode(self, texts):
    return [np.asarray(ids, np.int32) for ids in self.sp.encode([t.replace('\n', NEWLINE) for t in texts])]

  def word_ids(self, words) -> list[int]:
    """Ids of the pieces that spell each word as it stands after a space, less the bare word-boundary
    piece and unk: the positions of validation's `loss/focus` (train.eval_focus_words)."""
    ids = {int(i) for w in words for i in self.encode([w])[0]}
    return sorted(ids - {self.sp.piece_to_id('\u2581'), self.sp.unk_id()})

  def decode(self, ids) -> str:
    ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
    return self.sp.decode(ids).replace(NEWLINE, '\n')


def train_tokenizer(docs, model_prefix, vocab_size, max_docs):
  """SentencePiece on the first max_docs documents, reproducibly: on one thread (the multi-threaded
  trainer gave two models on two runs over the same 1,904 documents) and through a model writer (a
  model written under model_prefix records that path, so the same data in another folder would hash
  differently). Writes MODEL_PREFIX.model only (no .vocab listing: nothing reads it)."""
  model = io.BytesIO()
  try:
    _train_spm(docs, model, vocab_size, max_docs)
  except RuntimeError as e:
    most = re.search(r'Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)', str(e))
    if most:
      raise ConfigError(f'vocab.text_size={most.group(1)} is more pieces than this corpus supports (at most '
                        f'{most.group(2)}): set --config.vocab.text_size={most.group(2)} or lower, or add text') from None
    raise
  storage.write_bytes(model_prefix + '.model', model.getvalue())
  return TextTokenizer(model_prefix + '.model')


def _train_spm(docs, model, vocab_size, max_docs):
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([d.replace('\n', NEWLINE) for d in docs[:max_docs]]), model_writer=model,
      vocab_size=vocab_size, model_type='unigram', character_coverage=0.9995,
      unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, user_defined_symbols=[NEWLINE],
      max_sentence_length=1 << 16, num_threads=1, minloglevel=2)


def _is_val(doc: str, fraction: float) -> bool:
  """Deterministic split by content hash (stable under re-ordering and re-running)."""
  h = int.from_bytes(hashlib.sha1(doc.encode()).digest()[:8], 'little')
  return h / 2**64 < fraction


def prepare_text(root, *, sources, vocab_size, val_fraction, max_docs=0, spm_sample_docs=200_000,
                 shard_records=50_000, progress=None):
  """Reads corpora, trains SentencePiece, writes the tokenized dataset; returns the manifest."""
  progress = progress or (lambda it, **_: it)
  docs = []
  for name in sources:
    docs.extend(progress(read_corpus(name), desc=f'reading {name}', unit='doc'))
  docs = list(dict.fromkeys(docs))  # Exact duplicates would leak between train and val.
  if max_docs:
    docs = docs[:max_docs]
  if not docs:
    raise MissingCorpus(f'no documents found in {sources}')
  os.makedirs(root, exist_ok=True)
  splits = {'train': [d for d in docs if not _is_val(d, val_fraction)],
            'val': [d for d in docs if _is_val(d, val_fraction)]}
  tok = train_tokenizer(splits['train'], os.path.join(root, 'spm'), vocab_size, spm_sample_docs)
  entries = {}
  for split, split_docs in splits.items():
    entries[split] = []
    for s, lo in enumerate(range(0, max(len(split_docs), 1), shard_records)):
      chunk = split_docs[lo:lo + shard_records]
      ids = []
      for b in progress(range(0, len(chunk), 1000), desc=f'tokenizing {split} shard {s}', unit='kdoc'):
        ids.extend(tok.encode(chunk[b:b + 1000]))
      records = [{'text': x} for x in ids if len(x)]
      entries[split].append(store.write_shard(os.path.join(root, split, f'{s:05d}'), records, ['text']))
  tokenizer = {'name': 'sentencepiece', 'file': 'spm.model', 'vocab_size': tok.vocab_size, 'sha256': tok.sha256}
  return store.write_manifest(root, modality='text', fields=['text'], tokenizers={'text': tokenizer},
                              splits=entries, source={'corpora': list(sources), 'documents': len(docs)})
