"""One schema and one bad-record policy for the records of a user's files (JSONL lines, Parquet rows),
shared by the text, image-text and audio-text readers, in-process and on Beam.

Fields per kind (FIELDS): text {"text"}; image {"image" (or "file"), "caption"}; audio {"audio",
"text"}. The media field is a path relative to the file, or (Parquet) the encoded bytes.

A record that is not JSON, not an object, lacks a field, has a field of the wrong type, an empty one
or one not in the list, or whose image or clip cannot be used, is bad: it is skipped and counted per
source and reason, and the first FIRST of each source are logged where they are (FILE:LINE, or
FILE:row N in Parquet). When more than data.max_bad_fraction of the records read from a source are
bad, `tmdm prepare` stops with one line naming the source and its first bad record: a systematic
fault (every line has "caption_text") stops the build instead of leaving a small dataset. Two faults
stop it at once, whatever the limit: a byte that is not UTF-8 (a Latin-1 file is wrong on every line
it has an accent on, and guessing its encoding would be silent) and a Parquet file whose columns are
not the kind's (every row would be bad).
"""

import collections
import hashlib
import json
import os
import typing

from tmdm.errors import DataError

FIELDS = {'text': ('text',), 'image': ('image', 'caption'), 'audio': ('audio', 'text')}
MEDIA = {'image': 'image', 'audio': 'audio'}  # The field that holds a path or bytes.
ALIASES = {'image': {'file': 'image'}}  # Another accepted name of a field.
EMPTY = {'text': 'empty_text', 'image': 'empty_caption', 'audio': 'empty_caption'}  # source.skipped names
UNREADABLE = {'image': 'unreadable_image', 'audio': 'unreadable_audio'}
AS = {'image': 'an image', 'audio': 'a WAV'}
FIRST = 5  # Bad records logged (and kept in the manifest) per source.
PANDAS_INDEX = '__index_level_'  # Columns pandas adds for a non-default index: not data.


class Bad(typing.NamedTuple):
  skip: str  # The source.skipped counter it adds to: bad_line, empty_caption, unreadable_image, too_long, ...
  # What is wrong: not_json, not_object, unknown_field, missing_field, wrong_type, empty_field, unreadable, silent,
  # too_long.
  reason: str
  message: str  # "FILE:LINE: field 'x': what is wrong"


def _bad(kind, reason, where, what, field=None, skip=None):
  if skip is None:
    skip = EMPTY[kind] if reason == 'empty_field' and field != MEDIA.get(kind) else 'bad_line'
  return Bad(skip, reason, f'{where}: ' + (f'field {field!r}: ' if field else '') + what)


def _names(kind):
  return ', '.join(repr(f) for f in FIELDS[kind])


def check(kind, row, where):
  """A parsed record -> its fields' values in FIELDS order, or a Bad."""
  if not isinstance(row, dict):
    return _bad(kind, 'not_object', where, f'not an object of {_names(kind)} (got {type(row).__name__})')
  for alias, name in ALIASES.get(kind, {}).items():
    if alias in row:
      if name in row:
        return _bad(kind, 'unknown_field', where, f'another name for {name!r}: give one of them', alias)
      row = {name if k == alias else k: v for k, v in row.items()}
  for k in row:
    if k not in FIELDS[kind]:
      return _bad(kind, 'unknown_field', where, f'unknown ({kind} records have {_names(kind)})', k)
  values = []
  for k in FIELDS[kind]:
    v = row.get(k)
    media = k == MEDIA.get(kind)
    if v is None:
      return _bad(kind, 'missing_field', where, 'missing', k)
    if not isinstance(v, (str, bytes) if media else str):
      return _bad(kind, 'wrong_type', where, f'expected {"a path" if media else "a string"}, got {type(v).__name__}', k)
    if not v.strip():
      return _bad(kind, 'empty_field', where, 'empty', k)
    values.append(v)
  return tuple(values)


def not_utf8(data: bytes, where: str):
  """The one-line message for bytes that are not UTF-8, or None when they are."""
  try:
    data.decode('utf-8')
  except UnicodeDecodeError as e:
    return (f'{where}: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); text and JSONL files must be '
            'UTF-8: convert it first, e.g. `iconv -f latin1 -t utf-8`')
  return None


def parse_line(kind, line: str, where: str):
  """A JSONL line read with errors='surrogateescape' -> check()'s answer. A byte that is not UTF-8
  stops the build (module docstring)."""
  if any('\udc80' <= c <= '\udcff' for c in line):
    raise DataError(not_utf8(line.encode('utf-8', 'surrogateescape'), where))
  try:
    row = json.loads(line.rstrip())
  except json.JSONDecodeError as e:
    return _bad(kind, 'not_json', where, f'not JSON ({e.msg} at column {e.colno})')
  return check(kind, row, where)


def media_ref(value, folder, join):
  """A media field's value -> (what to read: a path or the bytes, the split key, how messages show it).
  Paths are relative to the record's file; bytes are keyed by their hash (the same picture twice
  stays in one split)."""
  if isinstance(value, bytes):
    return value, f'user-{hashlib.sha1(value).hexdigest()}', f'{len(value)} bytes'
  full = join(folder, value)
  return full, f'user-{full}', repr(value)


def unreadable(kind, where, shown, error):
  """A media file that cannot be read; the message is the same on every path (no reader's own text)."""
  what = 'not found' if isinstance(error, FileNotFoundError) else f'cannot be read as {AS[kind]}'
  return _bad(kind, 'unreadable', where, f'{shown} {what}', MEDIA[kind], skip=UNREADABLE[kind])


UNUSABLE = {'silent': 'silent_audio', 'too_long': 'too_long'}  # reason -> source.skipped name


def unusable(kind, where, shown, reason, what):
  """A clip that reads but cannot be kept (reason: a key of UNUSABLE)."""
  return _bad(kind, reason, where, f'{shown} {what}', MEDIA[kind], skip=UNUSABLE[reason])


# Parquet.

def _string(t):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel  (only Parquet sources need it)
  return pa.types.is_string(t) or pa.types.is_large_string(t)


def _binary(t):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def check_columns(kind, path, schema):
  """A Parquet file's columns against the kind's fields: a one-line DataError naming the file and the
  column when one is unknown, missing or of another type."""
  names = [n for n in schema.names if not n.startswith(PANDAS_INDEX)]
  aliases = ALIASES.get(kind, {})
  for n in names:
    if n not in FIELDS[kind] and n not in aliases:
      raise DataError(f'{path}: column {n!r} is not a field of {kind} records ({_names(kind)}): rename or drop it')
  for k in FIELDS[kind]:
    given = [n for n in names if n == k or aliases.get(n) == k]
    if not given:
      raise DataError(f'{path}: no column {k!r} ({kind} records have {_names(kind)})')
    if len(given) > 1:
      raise DataError(f'{path}: columns {given[0]!r} and {given[1]!r} are one field: keep one of them')
    t = schema.field(given[0]).type
    if not (_string(t) or (k == MEDIA.get(kind) and _binary(t))):
      raise DataError(f'{path}: column {given[0]!r} is {t}, expected a string' +
                      (' or binary' if k == MEDIA.get(kind) else ''))


def parquet_schema(kind, path, opener=open):
  """Checks a Parquet file's columns without reading its rows (a source fails before anything is built)."""
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  with opener(path) as f:
    check_columns(kind, path, pq.ParquetFile(f).schema_arrow)


def parquet_rows(kind, path, opener=open, batch_rows=1024):
  """(where, row dict) of each row, 'FILE:row N' counting from 1, after check_columns."""
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  with opener(path) as f:
    pf = pq.ParquetFile(f)
    check_columns(kind, path, pf.schema_arrow)
    n = 0
    for batch in pf.iter_batches(batch_size=batch_rows):
      for row in batch.to_pylist():
        n += 1
        yield f'{path}:row {n}', {k: v for k, v in row.items() if not k.startswith(PANDAS_INDEX)}


# The policy.

class Tally:
  """The bad records of one dataset: per source, counts by reason and the first FIRST located (logged
  as they come); `check` applies data.max_bad_fraction (`limit`) to a source."""

  def __init__(self, limit=1.0, log=None):
    self.limit, self.log = limit, log or (lambda *_: None)
    self.read, self.bad, self.first = collections.Counter(), {}, {}

  def seen(self, source, n=1):
    self.read[source] += n

  def add(self, source, bad: Bad, n=1):
    self.bad.setdefault(source, collections.Counter())[bad.reason] += n
    first = self.first.setdefault(source, [])
    if len(first) < FIRST:
      first.append(bad.message)
      self.log(f'bad record: {bad.message}')
    elif sum(self.bad[source].values()) == FIRST + 1:
      self.log(f'{source}: more bad records; they are counted, not logged')

  def merge(self, source, read, bad: dict, first: list):
    """One source's counts gathered elsewhere (the Beam pipeline's report); logs its first bad records."""
    self.read[source] += read
    self.bad[source] = collections.Counter(bad)
    self.first[source] = list(first)
    for message in first:
      self.log(f'bad record: {message}')

  def check(self, source):
    bad, read = sum(self.bad.get(source, {}).values()), self.read[source]
    if read and bad / read > self.limit:
      reasons = ', '.join(f'{k} {v}' for k, v in sorted(self.bad[source].items()))
      raise DataError(f'{source}: {bad} of {read} records are bad ({bad / read:.1%} > data.max_bad_fraction='
                      f'{self.limit}; {reasons}); the first: {self.first[source][0]}')

  def summary(self) -> dict:
    """The manifest's source.bad_records: per source with bad records, its counts and first ones."""
    return {s: {'read': self.read[s], 'bad': dict(sorted(c.items())), 'first': list(self.first[s])}
            for s, c in self.bad.items()}


def relative_to(path):
  """The folder paths inside a file are relative to (its absolute folder, as the readers always used)."""
  return os.path.dirname(os.path.abspath(path))
