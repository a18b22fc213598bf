"""`tmdm prepare`: the datasets a config trains on, each built once and checked on later runs.

The text dataset first (its SentencePiece model tokenizes every caption and transcript), then the
image-text and audio-text datasets the mixture needs. Each is skipped when its manifest says it was
built with the same settings, and refused (one-line error) when it was built with others.

By default each is built in this process (text.py, image.py, audio.py). With a Beam runner
(`--beam_runner=DirectRunner`, DataflowRunner, FlinkRunner, ...) the same datasets, byte for byte, are
built by an Apache Beam pipeline (beam.py; `pip install -e .[beam]`).

The same config gives the same bytes in any folder, run after run (tests/test_reproducible.py), the
Orbax folders of the learned tokenizers aside (file names and timestamps; tokenizer.json holds the
weights' hash): SentencePiece trains on one thread, and the `tmdm prepare` process runs XLA on one CPU
device with a fixed thread pool (cli._pin_prepare_backend), on which the image and audio tokenizers'
bits depend.

A data root may be a URL (`--config.data.root=gs://bucket/data`): each dataset is then built in a
local staging folder and uploaded, its manifest last, so a reader sees a whole dataset or none; a
rebuild (--force) deletes the old manifest first, then the old objects.
"""

import contextlib
import functools
import glob
import logging
import os
import shutil
import time

import tqdm

from tmdm import storage
from tmdm.data import shards as shards_lib, store
from tmdm.datasets import audio, image, pairs, records, text
from tmdm.errors import ConfigError

log = logging.getLogger('tmdm')


def _progress(iterable, **kwargs):
  return tqdm.tqdm(iterable, dynamic_ncols=True, leave=False, **kwargs)


def _builders(cfg, beam_runner: str, beam_options: str):
  """(text, image, audio) builders: the in-process ones, or with a runner the Beam ones (imported only
  then: apache-beam is an optional extra)."""
  if not beam_runner:
    return text.prepare_text, image.prepare_image, audio.prepare_audio
  from tmdm.datasets import beam  # pylint: disable=import-outside-toplevel
  run = beam.BeamRun.from_config(cfg, beam_runner, beam_options)
  log.info('building with Apache Beam: runner %s, options %r', beam_runner, beam_options)
  return (functools.partial(beam.prepare_text, run=run), functools.partial(beam.prepare_image, run=run),
          functools.partial(beam.prepare_audio, run=run))


@contextlib.contextmanager
def _building(root):
  """The folder to build the dataset at `root` into (module docstring: URLs are staged)."""
  if storage.is_url(root) and storage.exists(root):
    storage.remove(storage.join(root, store.MANIFEST))  # First: no reader takes the old objects for a dataset.
    storage.remove(root)
  with storage.staged(root, last=store.MANIFEST) as local:
    yield local


def check_pair_sources(mod: str, spec: str):
  """A one-line error for an image or audio source that cannot be read, before anything is built (a
  missing file would otherwise surface only after the text dataset was built); Parquet files' columns
  are checked here too."""
  builtin = image.IMAGE_SOURCES if mod == 'image' else {}
  user = ('jsonl', 'folder', 'parquet') if mod == 'image' else ('jsonl', 'parquet')
  for name in (x.strip() for x in spec.split(',') if x.strip()):
    kind, sep, arg = name.partition(':')
    if name in builtin:
      continue
    if sep and kind == 'espeak' and mod == 'audio':
      if shutil.which('espeak-ng') is None:
        raise text.MissingCorpus(f'{mod}.sources has {name!r} but espeak-ng is missing: `apt-get install espeak-ng`')
      continue
    path = storage.join(arg, 'captions.jsonl') if kind == 'folder' and mod == 'image' else arg
    if not sep or kind not in user:
      choices = ', '.join(list(builtin) + (['jsonl:PATH', 'folder:DIR', 'parquet:GLOB'] if mod == 'image' else
                                           ['espeak:CORPUS', 'jsonl:PATH', 'parquet:GLOB']))
      raise text.MissingCorpus(f'{mod}.sources: unknown source {name!r} (choices: {choices})')
    found = (storage.exists(path) if storage.is_url(path) else
             bool(glob.glob(path, recursive=True)) if any(c in path for c in '*?[') else os.path.isfile(path))
    if not found:
      raise text.MissingCorpus(f'{mod}.sources: {path} not found (from {name!r})')
    if kind == 'parquet' and not storage.is_url(path):
      for f in sorted(glob.glob(path, recursive=True)):
        records.parquet_schema(mod, f, lambda p: open(p, 'rb'))


def prepare(cfg, *, force: bool = False, progress=_progress, beam_runner: str = '', beam_options: str = '') -> int:
  """The text dataset, then the image-text and audio-text ones the config trains on (data.mix_image,
  data.mix_audio > 0; captions through the text tokenizer); each is skipped when already built with
  the same settings, rebuilt with --force. beam_runner: build them with that Beam runner (and the
  pipeline flags in beam_options) instead of in this process."""
  for mod in ('image', 'audio'):
    if cfg.data[f'mix_{mod}'] > 0 and cfg[mod].sources.strip():
      check_pair_sources(mod, cfg[mod].sources)
  build_text, build_image, build_audio = _builders(cfg, beam_runner, beam_options)
  root = shards_lib.text_root(cfg)
  sources = [x.strip() for x in cfg.data.text_sources.split(',') if x.strip()]
  if storage.isfile(storage.join(root, store.MANIFEST)) and not force:
    manifest = store.read_manifest(root)
    same = (manifest['source']['corpora'] == sources and
            manifest['tokenizers']['text']['vocab_size'] == cfg.vocab.text_size)
    if not same:
      raise ConfigError(f'{root} holds a different dataset ({manifest["source"]}); use --force or '
                        'another data.text_name')
    log.info('text dataset %s is ready (use --force to rebuild)', root)
  else:
    start = time.time()
    with _building(root) as local:
      manifest = build_text(local, sources=sources, vocab_size=cfg.vocab.text_size,
                            val_fraction=cfg.data.val_fraction, max_docs=cfg.data.text_max_docs,
                            spm_sample_docs=cfg.data.spm_sample_docs, progress=progress,
                            max_bad_fraction=cfg.data.max_bad_fraction)
    for split, info in manifest['splits'].items():
      tokens = sum(s['num_tokens']['text'] for s in info['shards'])
      log.info('text %s: %d documents, %d tokens -> %s', split, info['num_records'], tokens, root)
    log.info('text dataset built in %.0f s', time.time() - start)

  text_tok = text.TextTokenizer(storage.join(root, manifest['tokenizers']['text']['file']))
  for mod, build in (('image', build_image), ('audio', build_audio)):
    section, pair_root = cfg[mod], storage.join(cfg.data.root, cfg[mod].name)
    if cfg.data[f'mix_{mod}'] <= 0 or not section.sources.strip():
      log.info('%s dataset not needed (data.mix_%s is 0 or %s.sources is empty)', mod, mod, mod)
      continue
    settings = pairs.settings_of(section, text_tok.sha256)
    if storage.isfile(storage.join(pair_root, store.MANIFEST)) and not force:
      saved = store.read_manifest(pair_root)['source'].get('settings') or {}
      saved = {**pairs.ADDED_SETTINGS.get(mod, {}), **saved}  # Keys newer than the dataset: what it was built with.
      if saved == settings:
        log.info('%s dataset %s is ready (use --force to rebuild)', mod, pair_root)
        continue
      differ = [f'{mod}.{k} ({saved.get(k, "absent")!r} in the dataset, {settings.get(k, "absent")!r} now)'
                for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
      raise ConfigError(f'{pair_root} holds an {mod} dataset built with other settings: {", ".join(differ[:3])}; '
                        f'use --force to rebuild it or another {mod}.name')
    start = time.time()
    with _building(pair_root) as local:
      pair_manifest = build(local, text_tokenizer=text_tok, cfg=section, progress=progress, log=log.info,
                            max_bad_fraction=cfg.data.max_bad_fraction)
    codebook = pair_manifest['tokenizers'][mod]['codebook_size']
    if codebook != cfg.vocab[f'{mod}_size']:
      raise ConfigError(f'the {mod} tokenizer has {codebook} codes but vocab.{mod}_size is '
                        f'{cfg.vocab[f"{mod}_size"]}')
    for split, info in pair_manifest['splits'].items():
      tokens = {k: sum(s['num_tokens'][k] for s in info['shards']) for k in ('text', mod)}
      log.info('%s %s: %d pairs, %d text + %d %s tokens -> %s', mod, split, info['num_records'], tokens['text'],
               tokens[mod], mod, pair_root)
    log.info('%s dataset built in %.0f s (skipped inputs: %s)', mod, time.time() - start,
             pair_manifest['source']['skipped'])
  return 0
