"""Paths that are local folders or object-store URLs (gs://bucket/path, or any scheme etils.epath
knows): the one module that knows the difference.

Every file tmdm writes or reads outside a temporary folder goes through here (workdirs, checkpoints'
neighbours, metrics, datasets, tokenizers, galleries), so `--workdir=gs://bucket/run` is a bucket
path and never a local folder named `gs:`. Object stores differ from disks in three ways this module
hides or states: an object is written whole (no append: `write_text` replaces, and the metrics writer
writes bounded parts), a "folder" is a name prefix (`makedirs` is a no-op for them), and a move is a
server-side copy then a delete (`move`). Recursive globbing is refused on gs://, so nothing here globs.
"""

import contextlib
import os
import shutil
import tempfile

from etils import epath

try:  # Other processes write the same bucket: a cached listing would hide their objects (measured:
  # a reader polling a run's metrics never saw a new part). gcsfs reads this when it is created.
  import fsspec.config
  for _protocol in ('gs', 'gcs'):
    fsspec.config.conf.setdefault(_protocol, {})['use_listings_cache'] = False
except ImportError:  # Local paths only.
  pass


def is_url(path) -> bool:
  return '://' in str(path)


def as_path(path) -> epath.Path:
  return epath.Path(str(path))


def join(base, *parts) -> str:
  if is_url(base):
    return '/'.join([str(base).rstrip('/'), *(str(p).strip('/') for p in parts)])
  return os.path.join(str(base), *map(str, parts))


def absolute(path) -> str:
  """A local path made absolute (Orbax and tensorstore want one); a URL unchanged."""
  return str(path) if is_url(path) else os.path.abspath(str(path))


def relative(path, start) -> str:
  """`path` relative to `start` (both local or both under the same URL)."""
  if is_url(path):
    prefix = str(start).rstrip('/') + '/'
    if not str(path).startswith(prefix):
      raise ValueError(f'{path} is not under {start}')
    return str(path)[len(prefix):]
  return os.path.relpath(str(path), str(start))


def parent(path) -> str:
  return str(path).rstrip('/').rsplit('/', 1)[0] if is_url(path) else os.path.dirname(str(path).rstrip('/'))


def makedirs(path):
  """A folder on disk; nothing on an object store, where a folder is the prefix of the objects under it
  (and gcsfs' makedirs can hang on an existing bucket: measured against fake-gcs-server)."""
  if not is_url(path):
    os.makedirs(str(path), exist_ok=True)


def exists(path) -> bool:
  return as_path(path).exists()


def isfile(path) -> bool:
  """One request on an object store (epath's is_file asks twice: exists, then is_dir)."""
  if is_url(path):
    import fsspec  # pylint: disable=import-outside-toplevel  (only with a URL, as epath does)
    fs, p = fsspec.core.url_to_fs(str(path))
    return fs.isfile(p)
  return os.path.isfile(str(path))


def missing_files(paths, max_workers=32) -> list:
  """The paths that are not files, in order; on an object store the checks run concurrently (a
  dataset of N shards has 4 N array headers: one at a time they cost minutes on a bucket)."""
  paths = list(paths)
  if not any(is_url(p) for p in paths):
    return [p for p in paths if not isfile(p)]
  from concurrent import futures  # pylint: disable=import-outside-toplevel
  with futures.ThreadPoolExecutor(min(max_workers, max(1, len(paths)))) as pool:
    found = list(pool.map(isfile, paths))
  return [p for p, ok in zip(paths, found) if not ok]


def isdir(path) -> bool:
  return as_path(path).is_dir()


def listdir(path) -> list:
  """Names of the entries directly under `path` ([] when it does not exist)."""
  p = as_path(path)
  return sorted(child.name for child in p.iterdir()) if p.exists() else []


def read_text(path) -> str:
  return as_path(path).read_text()


def read_bytes(path) -> bytes:
  return as_path(path).read_bytes()


def write_text(path, text: str):
  """Writes the whole file: on disk through a temporary name and a rename, so a reader never sees
  half of it; an object store replaces an object whole by itself."""
  write_bytes(path, text.encode())


def write_bytes(path, data: bytes):
  if is_url(path):
    as_path(path).write_bytes(data)
    return
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def remove(path):
  p = as_path(path)
  if p.is_dir():
    p.rmtree()
  elif p.exists():
    p.unlink()


def copytree(src, dst, last: str = ''):
  """Copies a local folder to `dst` (local or URL), files in sorted order; the top-level file named
  `last` (a manifest, a page) after every other, so a reader that waits for it sees a whole copy."""
  final = None
  for root, _, files in sorted(os.walk(src)):
    rel = os.path.relpath(root, src)
    target = dst if rel == '.' else join(dst, *rel.split(os.sep))
    makedirs(target)
    for name in sorted(files):
      if rel == '.' and name == last:
        final = os.path.join(root, name)
        continue
      with open(os.path.join(root, name), 'rb') as f:
        write_bytes(join(target, name), f.read())
  if final is not None:
    with open(final, 'rb') as f:
      write_bytes(join(dst, last), f.read())


def move(src, dst):
  """Moves a file or folder. Within one object store each object is copied by the server (GCS's
  rewrite: no byte passes through this process, however large the files) and then deleted."""
  makedirs(parent(dst))
  if not is_url(src) and not is_url(dst):
    shutil.move(src, dst)
    return
  import fsspec  # pylint: disable=import-outside-toplevel  (only with a URL, as epath does)
  src_fs, src_path = fsspec.core.url_to_fs(str(src))
  dst_fs, dst_path = fsspec.core.url_to_fs(str(dst))
  if type(src_fs) is type(dst_fs):  # pylint: disable=unidiomatic-typecheck
    files = src_fs.find(src_path) if src_fs.isdir(src_path) else [src_path]
    for f in files:  # Objects one by one: fsspec's recursive copy nests or not by whether dst exists.
      src_fs.copy(f, dst_path + f[len(src_path):])
    src_fs.rm(src_path, recursive=True)
    return
  src_p = as_path(src)  # Across stores (disk to bucket or back): through this process.
  if src_p.is_dir():
    for child in sorted(src_p.iterdir(), key=lambda c: c.name):
      move(str(child), join(dst, child.name))
    remove(src)
  else:
    as_path(dst).write_bytes(src_p.read_bytes())
    src_p.unlink()


def tensorstore_kvstore(path):
  """The kvstore spec of a tensorstore array at `path`: the `file` driver on disk, the URL itself
  (tensorstore's `gcs` driver for gs://) otherwise."""
  return str(path) if is_url(path) else {'driver': 'file', 'path': os.path.abspath(str(path))}


@contextlib.contextmanager
def staged(path, last: str = ''):
  """A local folder to build into: `path` itself when local; for a URL a temporary folder, uploaded
  to it on a clean exit with the file `last` (the completion marker) uploaded after every other."""
  if not is_url(path):
    yield str(path)
    return
  with tempfile.TemporaryDirectory(prefix='tmdm-stage-') as tmp:
    yield tmp
    copytree(tmp, path, last=last)


@contextlib.contextmanager
def local_copy(path):
  """A local path holding the file or folder at `path` (downloaded for a URL), for libraries that
  read only from disk (SentencePiece)."""
  if not is_url(path):
    yield str(path)
    return
  with tempfile.TemporaryDirectory(prefix='tmdm-fetch-') as tmp:
    local = os.path.join(tmp, as_path(path).name)
    _download(as_path(path), local)
    yield local


def _download(src: epath.Path, dst: str):
  if src.is_dir():
    os.makedirs(dst, exist_ok=True)
    for child in src.iterdir():
      _download(child, os.path.join(dst, child.name))
  else:
    with open(dst, 'wb') as f:
      f.write(src.read_bytes())
