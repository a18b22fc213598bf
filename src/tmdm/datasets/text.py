"""Text: offline English corpora, a SentencePiece tokenizer, and `prepare_text` which writes a
tokenized dataset (data/store.py format).

Corpora (Debian packages, no download at run time):
  fortunes  package `fortunes`: /usr/share/games/fortunes, one document per fortune ('%' separated)
  kjv       package `bible-kjv`: the King James Bible through the `bible` program, one document per chapter
  gcide     package `dict-gcide`: GNU Collaborative International Dictionary of English, one per entry
A user's own text: `txt:GLOB` (one document per file), `jsonl:PATH` (objects with a "text" field) or
`parquet:GLOB` (a "text" column); their bad records follow records.py's policy.
"""

import collections
import glob
import gzip
import hashlib
import io
import logging
import os
import re
import shutil
import subprocess

import numpy as np
import sentencepiece as spm

from tmdm import storage
from tmdm.data import store
from tmdm.datasets import records
from tmdm.errors import ConfigError, DataError, MissingCorpus

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


def read_files(pattern, counts=None):
  """`txt:GLOB`: one document per file. An empty file is skipped and counted (not a bad record: a
  file holds no record to be wrong)."""
  counts = collections.Counter() if counts is None else counts
  paths = sorted(glob.glob(pattern, recursive=True))
  if not paths:
    raise MissingCorpus(f'no files match {pattern!r}')
  empty = 0
  for path in paths:
    with open(path, 'rb') as f:
      doc = decode_utf8(f.read(), path).strip()
    counts['read'] += 1
    if doc:
      yield doc
    else:
      empty += 1
      counts['empty_text'] += 1
  if empty:
    log.warning('%d of the %d files of %r are empty and were skipped', empty, len(paths), pattern)


def decode_utf8(data: bytes, where: str) -> str:
  """UTF-8 text, or a one-line error naming the file and the first byte that is not UTF-8 (a Latin-1
  file would otherwise become replacement characters, silently)."""
  message = records.not_utf8(data, where)
  if message:
    raise MissingCorpus(message)
  return data.decode('utf-8').replace('\r\n', '\n').replace('\r', '\n')  # Newlines as text mode reads them.


def _user_docs(name, rows, counts, tally):
  """Documents of (where, row or line) records; bad ones go to the tally (records.py), or without one
  stop the build at the first (audio's espeak:jsonl:PATH reads sentences this way)."""
  for where, raw in rows:
    counts['read'] += 1
    if tally is not None:
      tally.seen(name)
    got = records.parse_line('text', raw, where) if isinstance(raw, str) else records.check('text', raw, where)
    if isinstance(got, records.Bad):
      counts[got.skip] += 1
      if tally is None:
        raise DataError(got.message)
      tally.add(name, got)
      continue
    yield got[0]
  if tally is not None:
    tally.check(name)


def jsonl_lines(path):
  """(FILE:LINE, line) of the non-blank lines, as text mode splits them; bytes that are not UTF-8 are
  kept as surrogates for records.parse_line to name."""
  with open(path, encoding='utf-8', errors='surrogateescape') as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        yield f'{path}:{n}', line


def read_jsonl(path, counts=None, tally=None):
  """`jsonl:PATH`: one JSON object per line with a "text" field."""
  if not os.path.isfile(path):
    raise MissingCorpus(f'{path} not found')
  counts = collections.Counter() if counts is None else counts
  yield from _user_docs(f'jsonl:{path}', jsonl_lines(path), counts, tally)


def read_parquet(pattern, counts=None, tally=None):
  """`parquet:GLOB`: a "text" column, one document per row."""
  paths = sorted(glob.glob(pattern, recursive=True))
  if not paths:
    raise MissingCorpus(f'no files match {pattern!r}')
  counts = collections.Counter() if counts is None else counts
  rows = (r for path in paths for r in records.parquet_rows('text', path, lambda p: open(p, 'rb')))
  yield from _user_docs(f'parquet:{pattern}', rows, counts, tally)


DIGIT_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')


def read_numbers(count: int = 6000, seed: int = 0):
  """Sequences of three or four digit words ("seven two nine"), generated: a closed-vocabulary corpus
  for speech (`audio.sources=espeak:numbers`), whose transcripts the audio alone decides (no template
  words around what the condition says)."""
  rng = np.random.default_rng(seed)
  for _ in range(count):
    yield ' '.join(DIGIT_WORDS[d] for d in rng.integers(0, 10, int(rng.integers(3, 5))))


CORPORA = {'fortunes': read_fortunes, 'kjv': read_kjv, 'gcide': read_gcide, 'numbers': read_numbers}
USER_CORPORA = {'txt': read_files, 'jsonl': read_jsonl, 'parquet': read_parquet}  # 'kind:argument' entries


def read_corpus(name, counts=None, tally=None):
  """The documents of one data.text_sources entry; counts (source.skipped) and the bad-record tally
  are filled as it is read."""
  counts = collections.Counter() if counts is None else counts
  kind, sep, arg = name.partition(':')
  if sep and kind == 'txt':
    return read_files(arg, counts)
  if sep and kind in USER_CORPORA:
    return USER_CORPORA[kind](arg, counts, tally)
  if name not in CORPORA:
    raise MissingCorpus(f'unknown text corpus {name!r} (choices: {", ".join(CORPORA)}, txt:GLOB, jsonl:PATH, '
                        'parquet:GLOB)')
  return _counted(CORPORA[name](), counts)


def _counted(docs, counts):
  for doc in docs:
    counts['read'] += 1
    yield doc


class TextTokenizer:
  """SentencePiece wrapper: ids are 0-based tokenizer ids (the vocab layout shifts them)."""

  def __init__(self, model_path):
    self.path = model_path
    proto = storage.read_bytes(model_path)  # A local file or a URL (gs://...).
    self.sp = spm.SentencePieceProcessor(model_proto=proto)
    self.vocab_size = self.sp.get_piece_size()
    self.sha256 = hashlib.sha256(proto).hexdigest()
    self.unknown = {}  # character -> whether it encodes to the unknown piece (oov_counts)

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


def oov_counts(tok: TextTokenizer, texts) -> collections.Counter:
  """Out-of-vocabulary counts, summable across workers: 'characters' (not counting whitespace),
  'unknown_characters' (those that encode to SentencePiece's unknown piece on their own: characters the
  tokenizer was not trained on), 'documents', 'unknown_documents', and 'char:C' per unknown character."""
  counts, unknown = collections.Counter(), tok.unknown
  for doc in texts:
    chars = collections.Counter(doc)
    hit = False
    for c, n in chars.items():
      if c.isspace():
        continue
      counts['characters'] += n
      if c not in unknown:
        unknown[c] = tok.sp.unk_id() in tok.sp.encode(c)
      if unknown[c]:
        counts['unknown_characters'] += n
        counts[f'char:{c}'] += n
        hit = True
    counts['documents'] += 1
    counts['unknown_documents'] += hit
  return counts


def oov_report(counts, top=5) -> dict:
  """The manifest's source.oov: shares of characters and documents affected, the commonest unknown
  characters (ties by character)."""
  chars = sorted(((k[5:], n) for k, n in counts.items() if k.startswith('char:')), key=lambda x: (-x[1], x[0]))
  share = lambda a, b: round(counts.get(a, 0) / counts[b], 6) if counts.get(b) else 0.0
  return {'characters': counts.get('characters', 0), 'unknown_characters': counts.get('unknown_characters', 0),
          'unknown_character_share': share('unknown_characters', 'characters'),
          'documents': counts.get('documents', 0), 'unknown_documents': counts.get('unknown_documents', 0),
          'unknown_document_share': share('unknown_documents', 'documents'),
          'top_unknown': [[c, n] for c, n in chars[:top]]}


def oov_line(what, report) -> str:
  """The log line of an oov_report."""
  top = ', '.join(f'{c!r} {n}' for c, n in report['top_unknown'])
  return (f'{what}: {report["unknown_characters"]} of {report["characters"]} characters '
          f'({report["unknown_character_share"]:.3%}) in {report["unknown_documents"]} of {report["documents"]} '
          'documents are outside the text vocabulary (they become its unknown piece)' +
          (f'; most common: {top}' if top else ''))


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


SKIPS = ('read', 'empty_text', 'bad_line', 'duplicate', 'empty_tokens')  # source.skipped, in this order


def _is_val(doc: str, fraction: float) -> bool:
  """Deterministic split by content hash (stable under re-ordering and re-running)."""
  h = int.from_bytes(hashlib.sha1(doc.encode()).digest()[:8], 'little')
  return h / 2**64 < fraction


def prepare_text(root, *, sources, vocab_size, val_fraction, max_docs=0, spm_sample_docs=200_000,
                 shard_records=50_000, progress=None, max_bad_fraction=1.0):
  """Reads corpora, trains SentencePiece, writes the tokenized dataset; returns the manifest.
  max_bad_fraction: records.py's policy for the user files (`tmdm prepare` passes data.max_bad_fraction)."""
  progress = progress or (lambda it, **_: it)
  counts = collections.Counter({k: 0 for k in SKIPS})
  tally = records.Tally(max_bad_fraction, log.warning)
  docs = []
  for name in sources:
    docs.extend(progress(read_corpus(name, counts, tally), desc=f'reading {name}', unit='doc'))
  unique = list(dict.fromkeys(docs))  # Exact duplicates would leak between train and val.
  counts['duplicate'] = len(docs) - len(unique)
  docs = unique[:max_docs] if max_docs else unique
  if not docs:
    raise MissingCorpus(f'no documents found in {sources}')
  os.makedirs(root, exist_ok=True)
  splits = {'train': [d for d in docs if not _is_val(d, val_fraction)],
            'val': [d for d in docs if _is_val(d, val_fraction)]}
  tok = train_tokenizer(splits['train'], os.path.join(root, 'spm'), vocab_size, spm_sample_docs)
  oov = oov_report(oov_counts(tok, progress(docs, desc='counting unknown characters', unit='doc')))
  log.info('%s', oov_line('text', oov))
  entries = {}
  for split, split_docs in splits.items():
    entries[split] = []
    for s, lo in enumerate(range(0, max(len(split_docs), 1), shard_records)):
      chunk = split_docs[lo:lo + shard_records]
      ids = []
      for b in progress(range(0, len(chunk), 1000), desc=f'tokenizing {split} shard {s}', unit='kdoc'):
        ids.extend(tok.encode(chunk[b:b + 1000]))
      rows = [{'text': x} for x in ids if len(x)]
      counts['empty_tokens'] += len(ids) - len(rows)
      entries[split].append(store.write_shard(os.path.join(root, split, f'{s:05d}'), rows, ['text']))
  tokenizer = {'name': 'sentencepiece', 'file': 'spm.model', 'vocab_size': tok.vocab_size, 'sha256': tok.sha256}
  source = {'corpora': list(sources), 'documents': len(docs), 'skipped': dict(counts), 'oov': oov}
  if tally.bad:
    source['bad_records'] = tally.summary()
  return store.write_manifest(root, modality='text', fields=['text'], tokenizers={'text': tokenizer},
                              splits=entries, source=source)
