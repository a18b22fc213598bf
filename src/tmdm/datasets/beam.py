"""`tmdm prepare --beam_runner=RUNNER`: the text, image-text and audio-text datasets built by an Apache
Beam pipeline, for corpora one process cannot tokenize. Any runner and pipeline option passes through
(DirectRunner here; Dataflow, Flink or Spark for a real corpus).

The same sources and config give the same bytes (shards, labels, previews, manifest) on every run,
whatever the runner and the worker count, and they are the in-process builders' (text.py, image.py,
audio.py) bytes wherever those are reproducible themselves: text manifests add `source.skipped`
SentencePiece is trained on one thread (text.train_tokenizer, both paths); image and audio tokenizers
equal the in-process ones while data.beam_tokenizer_sample covers every pair (as on the demo data).
Per dataset:
  1. the driver removes the old manifest first, so a dataset being rebuilt is never readable, then the
     old shards;
  2. it reads the tokenizer sample in source order and trains the tokenizer there, once: SentencePiece
     on the first data.spm_sample_docs training documents, the image or audio tokenizer on the first
     data.beam_tokenizer_sample pairs (tokenizer quality is measured on that sample's validation part);
     the files and their hashes are written before the pipeline starts, and workers check the hash;
  3. the pipeline reads, decodes, caps, ranks, encodes and writes the shards (beam_stages.py);
  4. the driver checks that every shard exists and that each user source's bad records stay under
     data.max_bad_fraction (records.py, the in-process rule and message), then writes the manifest, last.
A crashed run leaves no manifest; running prepare again rebuilds the dataset from step 1.
"""

import collections
import concurrent.futures
import dataclasses
import heapq
import itertools
import logging
import os
import shlex
import shutil
import time
import types

import apache_beam as beam
import numpy as np
import tensorstore as ts
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineState

from tmdm.data import store
from tmdm.datasets import audio, beam_sources as src, beam_stages as stages, image, pairs, records, text
from tmdm.errors import DataError, MissingCorpus
from tmdm.tokenizers import audio as audio_tok, image as image_tok, registry as tok_registry

log = logging.getLogger('tmdm')


@dataclasses.dataclass(frozen=True)
class BeamRun:
  """How to run the pipeline: the runner and its options (passed through), and the data.beam_* keys."""
  runner: str = 'DirectRunner'
  options: str = ''  # Beam pipeline flags, one string: '--direct_num_workers=2 --direct_running_mode=multi_processing'
  shard_records: int = 50_000
  tokenizer_sample: int = 100_000
  fault: str = ''  # Tests only: 'split/shard' fails that shard's writer after its temporary files exist.

  @classmethod
  def from_config(cls, cfg, runner: str, options: str = '') -> 'BeamRun':
    return cls(runner=runner, options=options, shard_records=cfg.data.beam_shard_records,
               tokenizer_sample=cfg.data.beam_tokenizer_sample)


def pipeline_options(run: BeamRun) -> PipelineOptions:
  flags = shlex.split(run.options)
  if not any(f == '--runner' or f.startswith('--runner=') for f in flags):
    flags.append(f'--runner={run.runner}')
  return PipelineOptions(flags)


def _run(build, run: BeamRun, counters=None) -> dict:
  """Builds and runs one pipeline to the end; returns its Beam counters (also into `counters`)."""
  start = time.time()
  pipeline = beam.Pipeline(options=pipeline_options(run))
  build(pipeline)
  result = pipeline.run()
  state = result.wait_until_finish()
  if state != PipelineState.DONE:
    raise DataError(f'the Beam pipeline ended in state {state}')
  log.info('beam pipeline on %s finished in %.1f s', run.runner, time.time() - start)
  found = collections.Counter()
  for r in result.metrics().query()['counters']:
    found[f'{r.key.metric.namespace}/{r.key.metric.name}'] += r.committed or 0
  if counters is not None:
    counters.update(found)
  log.info('beam counters: %s', dict(sorted(found.items())))
  return dict(found)


def _clear(root):
  """The manifest goes first: from here until the end a reader finds no dataset, never a half one."""
  manifest = os.path.join(root, store.MANIFEST)
  if os.path.lexists(manifest):
    os.remove(manifest)
  for name in ('train', 'val', image.LABELS_DIR, audio.LISTEN_DIR, stages.WORK_DIR):
    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
  os.makedirs(root, exist_ok=True)


def _entry(path, fields) -> dict:
  """A shard's manifest entry, read back from its offsets (what store.write_shard returned)."""
  num_tokens, counts = {}, set()
  for field in fields:
    where = os.path.abspath(os.path.join(path, field, 'offsets'))
    spec = {'driver': 'zarr3', 'kvstore': {'driver': 'file', 'path': where}}
    offsets = np.asarray(ts.open(spec, read=True).result().read().result())
    num_tokens[field] = int(offsets[-1])
    counts.add(len(offsets) - 1)
  if len(counts) != 1:
    raise DataError(f'{path}: its fields hold different record counts {sorted(counts)}')
  return {'path': path, 'num_records': counts.pop(), 'num_tokens': num_tokens}


def _finalize_shards(root, fields, report, shard_records, labels=False) -> dict:
  """Every shard the ranks call for must exist (an empty split gets one empty shard, as in-process);
  joins the pairs' labels. Returns the manifest's split entries."""
  entries = {}
  for split in ('train', 'val'):
    n = report.get(f'split/{split}', 0)
    entries[split], parts = [], []
    for shard in range(max(1, -(-n // shard_records))):
      path = stages.shard_path(root, split, shard)
      if n == 0:
        tmp = os.path.join(root, stages.WORK_DIR, 'tmp', f'{split}-empty')
        store.write_shard(tmp, [], fields)
        stages.publish(tmp, path, fields)
        parts.append(np.zeros((0,), np.int32))
      elif labels:
        label_file = os.path.join(root, stages.WORK_DIR, 'labels', f'{split}-{shard:05d}.npy')
        if not os.path.isfile(label_file):
          raise DataError(f'{label_file} is missing: the pipeline did not finish (no manifest written)')
        parts.append(np.load(label_file))
      if not stages.shard_complete(path, fields):
        raise DataError(f'{path} is missing or incomplete: the pipeline did not write every shard '
                        '(no manifest written)')
      entries[split].append(_entry(path, fields))
    if labels:
      os.makedirs(os.path.join(root, image.LABELS_DIR), exist_ok=True)
      np.save(os.path.join(root, image.LABELS_DIR, f'{split}.npy'), np.concatenate(parts).astype(np.int32))
  return entries


def _skipped(report, names) -> dict:
  extra = sorted(k.split('/', 1)[1] for k in report if k.startswith('skipped/') and k.split('/', 1)[1] not in names)
  return {k: report.get(f'skipped/{k}', 0) for k in tuple(names) + tuple(extra)}


def _tally(report, sources, limit, log_fn) -> records.Tally:
  """records.Tally of the pipeline's report; raises as the in-process build does (source by source,
  the same one-line message) when a source has too many bad records. Shards are written, no manifest."""
  tally = records.Tally(limit, log_fn)
  for s, name in enumerate(sources):
    bad = {k.split('/', 2)[2]: v for k, v in report.items() if k.startswith(f'bad/{s}/')}
    if bad:
      tally.merge(name, report.get(f'read/{s}', 0), bad, report.get(f'first/{s}', []))
  for name in sources:
    tally.check(name)
  return tally


def _oov(report) -> dict:
  return text.oov_report({k.split('/', 1)[1]: v for k, v in report.items() if k.startswith('oov/')})


def _finish(root, work):
  shutil.rmtree(os.path.join(root, stages.WORK_DIR), ignore_errors=True)
  return work


# Counting helpers for the report ((category, name), n).

def _read_one(_):
  return ('skipped', 'read'), 1


def _reason(skip):
  return ('skipped', stages.skip_name(skip[1])), 1


def _split_of_ranked(ranked):
  return ('split', ranked[0]), 1


def _source_of(item):
  return ('source', item[0][0]), 1


def _replayed(source_counts):
  return [(('skipped', k), v) for k, v in source_counts[1].items()]


def _not_tallied(item, tallied):
  return item[0][0] not in tallied


# Text.

def train_spm(docs, model_prefix, vocab_size, max_docs) -> text.TextTokenizer:
  """The reproducible SentencePiece trainer both paths use (text.train_tokenizer)."""
  return text.train_tokenizer(docs, model_prefix, vocab_size, max_docs)


def text_sample(sources, val_fraction, max_docs, sample_docs, progress):
  """The documents text.prepare_text trains SentencePiece on (the first `sample_docs` training documents
  after deduplication and the max_docs cap), read in source order; stops as soon as it has them."""
  events = itertools.chain.from_iterable(src.read_text_task(t) for t in src.text_tasks(sources))
  seen, train = set(), []
  for kind, _, doc in progress(events, desc='reading the tokenizer sample', unit='doc'):
    if kind != src.ITEM or doc in seen:
      continue
    seen.add(doc)
    if not pairs.is_val(doc, val_fraction):
      train.append(doc)
    if (max_docs and len(seen) >= max_docs) or len(train) >= sample_docs:
      break
  if not seen:
    raise MissingCorpus(f'no documents found in {sources}')
  return train


def _text_record(item, val_fraction):
  key, doc = item
  return key, src.split_of(doc, val_fraction), doc


def _text_pipeline(p, root, tasks, *, val_fraction, max_docs, shard_records, spm, fault):
  read = stages.read(p | 'tasks' >> beam.Create(tasks) | 'spread tasks' >> beam.Reshuffle(), 'text',
                     src.read_text_task, label='read')
  unique = (read[src.ITEM] | 'by content' >> beam.Map(stages._by_content) | 'group content' >> beam.GroupByKey()
            | 'keep first' >> beam.ParDo(stages.KeepFirst()).with_outputs(src.SKIP, main='docs'))
  ranked = (unique['docs'] | 'split' >> beam.Map(_text_record, val_fraction)
            | 'rank' >> stages.Rank(cap=max_docs))
  written = (ranked | 'by shard' >> beam.Map(stages.by_shard, shard_records) | 'group shards' >> beam.GroupByKey()
             | 'write' >> beam.ParDo(stages.WriteShard(root, ['text'], spm=spm, fault=fault)))
  everything = (read[src.ITEM], read[src.SKIP]) | 'all read' >> beam.Flatten()
  per_source, firsts = stages.tally(everything, read[src.SKIP])
  stages.report([read[src.ITEM] | 'count items' >> beam.Map(_read_one),
                 read[src.SKIP] | 'count skips' >> beam.Map(_read_one),
                 read[src.SKIP] | 'count reasons' >> beam.Map(_reason),
                 unique[src.SKIP], ranked | 'count splits' >> beam.Map(_split_of_ranked), written, *per_source],
                root, firsts)


def prepare_text(root, *, sources, vocab_size, val_fraction, max_docs=0, spm_sample_docs=200_000, run=BeamRun(),
                 progress=None, counters=None, max_bad_fraction=1.0):
  """text.prepare_text on Beam (same arguments, shard size from run.shard_records); returns the manifest."""
  progress = progress or (lambda it, **_: it)
  start = time.time()
  tasks = src.text_tasks(sources)  # Missing sources fail here, before the old dataset is removed.
  _clear(root)
  sample = text_sample(sources, val_fraction, max_docs, spm_sample_docs, progress)
  tok = train_spm(sample, os.path.join(root, 'spm'), vocab_size, spm_sample_docs)
  log.info('text tokenizer: sampled %d documents and trained in %.1f s', len(sample), time.time() - start)
  _run(lambda p: _text_pipeline(p, root, tasks, val_fraction=val_fraction, max_docs=max_docs,
                                shard_records=run.shard_records, spm=(tok.path, tok.sha256), fault=run.fault),
       run, counters)
  report = stages.read_report(root)
  entries = _finalize_shards(root, ['text'], report, run.shard_records)
  skipped = _skipped(report, src.TEXT_SKIPS)
  tally = _tally(report, sources, max_bad_fraction, log.warning)
  oov = _oov(report)
  log.info('%s', text.oov_line('text', oov))
  tokenizer = {'name': 'sentencepiece', 'file': 'spm.model', 'vocab_size': tok.vocab_size, 'sha256': tok.sha256}
  documents = report.get('split/train', 0) + report.get('split/val', 0)
  source = {'corpora': list(sources), 'documents': documents, 'skipped': skipped, 'oov': oov}
  if tally.bad:
    source['bad_records'] = tally.summary()
  manifest = store.write_manifest(root, modality='text', fields=['text'], tokenizers={'text': tokenizer},
                                  splits=entries, source=source)
  return _finish(root, manifest)


# Image and audio pairs.

@dataclasses.dataclass(frozen=True)
class _Modality:
  name: str
  tasks: object  # sources -> tasks
  reader: object  # (task, cfg) -> events
  decoder: object  # (key, job, arg) -> event
  decode_arg: object  # cfg -> the decoder's third argument
  skips: tuple


MODALITIES = {
    'image': _Modality('image', src.image_tasks, src.read_image_task, src.decode_image, lambda c: (c.size, c.fit),
                       src.IMAGE_SKIPS),
    'audio': _Modality('audio', src.audio_tasks, src.read_audio_task, src.decode_audio, lambda c: c, src.AUDIO_SKIPS),
}


def _plain(cfg):
  """A config section as a plain namespace: what the workers get (pickled with the pipeline)."""
  return types.SimpleNamespace(**cfg.to_dict())


def _decoded(events, decoder, arg, workers):
  """Events with each TASK replaced by its decoded event, in order; decoding runs on a thread pool a
  window ahead (espeak-ng and image decoding release the GIL), as audio.read_espeak does."""
  window = 4 * workers
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as ex:
    pending = collections.deque()
    try:
      for event in events:
        pending.append(ex.submit(decoder, event[1], event[2], arg) if event[0] == src.TASK else event)
        while len(pending) > window:
          head = pending.popleft()
          yield head.result() if isinstance(head, concurrent.futures.Future) else head
      while pending:
        head = pending.popleft()
        yield head.result() if isinstance(head, concurrent.futures.Future) else head
    finally:
      for f in pending:
        if isinstance(f, concurrent.futures.Future):
          f.cancel()


def pair_sample(mod: _Modality, sources, cfg, text_tok, limit, progress) -> list:
  """The first `limit` usable pairs (all when 0) in source order: [(payload, caption ids)], what
  image.prepare_image / audio.prepare_audio keep, with the same per-source cap."""
  streams = [(e for e in mod.reader(t, cfg) if e[0] != src.TALLY) for t in mod.tasks(sources)]
  merged = heapq.merge(*streams, key=lambda e: e[1])
  got, kept = collections.Counter(), []
  events = _decoded(merged, mod.decoder, mod.decode_arg(cfg), 2 * (os.cpu_count() or 1))
  for kind, key, payload in progress(events, desc='reading the tokenizer sample', unit=mod.name):
    if kind != src.ITEM or (cfg.max_items and got[key[0]] >= cfg.max_items):
      continue
    got[key[0]] += 1
    ids = text_tok.encode([payload['caption']])[0]
    if len(ids):
      kept.append((payload, ids))
      if limit and len(kept) >= limit:
        break
  events.close()
  if not kept:
    raise MissingCorpus(f'no usable {mod.name}-text pairs in {cfg.sources!r}')
  return kept


def _as_float(part):
  return np.stack([p['media'] for p, _ in part]).astype(np.float32) / 255


def _stack_waves(part, cfg):
  return audio_tok.fit_length([p['media'] for p, _ in part], int(round(cfg.seconds * cfg.sample_rate)))


def _train_tokenizer(mod, root, cfg, train, progress):
  """(tokenizer, manifest file) as the in-process builder makes them: trained on the train part of the
  sample and saved under root/tokenizer, or cfg.tokenizer_path."""
  if cfg.tokenizer_path:
    return tok_registry.load(cfg.tokenizer_path), os.path.abspath(cfg.tokenizer_path)
  if mod.name == 'image':
    tok_cfg = image_tok.ImageConfig(size=cfg.size, levels=tuple(cfg.levels), downsamples=cfg.downsamples,
                                    width=cfg.width)
    tokenizer = image_tok.train(_as_float(train), tok_cfg, steps=cfg.train_steps, batch_size=cfg.batch_size,
                                lr=cfg.lr, seed=cfg.seed, progress=progress)
  else:
    tok_cfg = audio_tok.AudioConfig(sample_rate=cfg.sample_rate, seconds=cfg.seconds, n_fft=cfg.n_fft, hop=cfg.hop,
                                    n_mels=cfg.n_mels, levels=tuple(cfg.levels), downsamples=cfg.downsamples,
                                    width=cfg.width, griffin_lim_iters=cfg.griffin_lim_iters)
    tokenizer = audio_tok.train(_stack_waves(train, cfg), tok_cfg, steps=cfg.train_steps, batch_size=cfg.batch_size,
                                lr=cfg.lr, seed=cfg.seed, progress=progress)
  tokenizer.save(os.path.join(root, image.TOKENIZER_DIR))
  return tokenizer, image.TOKENIZER_DIR


def _encode_in_batches(tokenizer, batch, size):
  codes = [tokenizer.encode(batch[lo:lo + size]) for lo in range(0, len(batch), size)]
  return np.concatenate(codes) if codes else np.zeros((0, tokenizer.tokens_per_item), np.int32)


def _image_quality(root, tokenizer, val, cfg) -> dict:
  """image.prepare_image's PSNR figures and preview, on the sample's validation pairs."""
  if not val:
    return {}
  images = _as_float(val)
  codes = _encode_in_batches(tokenizer, images, cfg.encode_batch)
  labels = np.asarray([p['label'] for p, _ in val], np.int32)
  return image.tokenizer_quality(root, tokenizer, images, codes, labels)


def _audio_quality(root, tokenizer, val, cfg) -> dict:
  """audio.prepare_audio's log-mel distance and listening files, on the sample's validation clips."""
  if not val or not isinstance(tokenizer, audio_tok.AudioTokenizer):
    return {}
  waves = _stack_waves(val, cfg)
  codes = np.concatenate([tokenizer.encode(_stack_waves(val[lo:lo + cfg.encode_batch], cfg))
                          for lo in range(0, len(val), cfg.encode_batch)])
  dist = audio_tok.logmel_l1(tokenizer.log_mel(waves), tokenizer.decode_mel(codes))
  quality = {'val_logmel_l1': round(float(dist.mean()), 4), 'val_items': len(val)}
  n = min(cfg.listen, len(val))
  if n:
    transcripts = [p['caption'] for p, _ in val[:n]]
    audio.write_listening(os.path.join(root, audio.LISTEN_DIR), tokenizer, waves[:n], transcripts)
  return quality


def _pairs_pipeline(p, mod, root, tasks, cfg, *, tallied, spm, media, shard_records, fault):
  read = stages.read(p | 'tasks' >> beam.Create(tasks) | 'spread tasks' >> beam.Reshuffle(), mod.name, mod.reader,
                     cfg, label='read')
  decoded = stages.read(read[src.TASK] | 'spread decoding' >> beam.Reshuffle(), mod.name, mod.decoder,
                        mod.decode_arg(cfg), label='decode', decode=True)
  items = (read[src.ITEM], decoded[src.ITEM]) | 'items' >> beam.Flatten()
  skips = (read[src.SKIP], decoded[src.SKIP]) | 'skips' >> beam.Flatten()
  items, skips = stages.cap_per_source(items, skips, cfg.max_items)
  captioned = (items | 'caption batches' >> beam.BatchElements(min_batch_size=64, max_batch_size=1024)
               | 'encode captions' >> beam.ParDo(stages.EncodeCaptions(mod.name, *spm, cfg.val_fraction)).with_outputs(
                   src.SKIP, stages.OOV, main='kept'))
  ranked = captioned['kept'] | 'rank' >> stages.Rank()
  samples = int(round(cfg.seconds * cfg.sample_rate)) if mod.name == 'audio' else 0
  written = (ranked | 'by encode batch' >> beam.Map(stages.by_encode_batch, cfg.encode_batch)
             | 'group encode batches' >> beam.GroupByKey()
             | 'encode media' >> beam.ParDo(stages.EncodeMedia(mod.name, *media, shard_records, samples))
             | 'group shards' >> beam.GroupByKey()
             | 'write' >> beam.ParDo(stages.WriteShard(root, ['text', mod.name], fault=fault)))
  per_source, firsts = stages.tally((items, skips) | 'all read' >> beam.Flatten(), skips)
  stages.report([items | 'untallied' >> beam.Filter(_not_tallied, tallied) | 'count items' >> beam.Map(_read_one),
                 skips | 'count skips' >> beam.Map(_read_one), skips | 'count reasons' >> beam.Map(_reason),
                 read[src.TALLY] | 'tallies' >> beam.FlatMap(_replayed), items | 'per source' >> beam.Map(_source_of),
                 captioned[src.SKIP] | 'count empty captions' >> beam.Map(_reason), captioned[stages.OOV],
                 ranked | 'count splits' >> beam.Map(_split_of_ranked), written, *per_source], root, firsts)


def _prepare_pairs(mod, root, *, text_tokenizer, cfg, run, progress, log_fn, counters, max_bad_fraction):
  progress = progress or (lambda it, **_: it)
  sources = src.split_sources(cfg.sources)
  start = time.time()
  tasks = mod.tasks(sources)  # Missing sources fail here, before the old dataset is removed.
  _clear(root)
  pairs.copy_text_tokenizer(text_tokenizer, root)
  sample = pair_sample(mod, sources, cfg, text_tokenizer, run.tokenizer_sample, progress)
  part = {s: [x for x in sample if src.split_of(x[0]['split_key'], cfg.val_fraction) == s] for s in ('train', 'val')}
  tokenizer, tok_file = _train_tokenizer(mod, root, cfg, part['train'], progress)
  quality = (_image_quality if mod.name == 'image' else _audio_quality)(root, tokenizer, part['val'], cfg)
  log.info('%s tokenizer: sampled %d pairs, trained and measured in %.1f s', mod.name, len(sample), time.time() - start)
  del sample, part
  replayed = [s for s, name in enumerate(sources) if name in image.IMAGE_SOURCES] if mod.name == 'image' else []
  spm = (os.path.join(root, os.path.basename(text_tokenizer.path)), text_tokenizer.sha256)
  media = (os.path.abspath(os.path.join(root, tok_file)), tokenizer.sha256)
  plain = _plain(cfg)
  _run(lambda p: _pairs_pipeline(p, mod, root, tasks, plain, tallied=replayed, spm=spm, media=media,
                                 shard_records=run.shard_records, fault=run.fault), run, counters)
  report = stages.read_report(root)
  entries = _finalize_shards(root, ['text', mod.name], report, run.shard_records, labels=mod.name == 'image')
  skipped = _skipped(report, mod.skips)
  items = report.get('split/train', 0) + report.get('split/val', 0)
  if not items:
    raise MissingCorpus(f'no usable {mod.name}-text pairs in {cfg.sources!r} (skipped: {skipped})')
  tally = _tally(report, sources, max_bad_fraction, log_fn)
  oov = _oov(report)
  log_fn(text.oov_line('image captions' if mod.name == 'image' else 'audio transcripts', oov))
  log_fn(f'{mod.name} tokenizer {tokenizer.name}: {quality}; skipped {skipped}')
  per_source = {}
  for s, name in enumerate(sources):
    per_source[name] = report.get(f'source/{s}', 0)
  source = {'sources': per_source, 'items': items, 'skipped': skipped, 'tokenizer_quality': quality,
            'settings': pairs.settings_of(cfg, text_tokenizer.sha256)}
  if mod.name == 'image':
    source['labels'] = {s: f'{image.LABELS_DIR}/{s}.npy' for s in entries}
  source['oov'] = oov
  if tally.bad:
    source['bad_records'] = tally.summary()
  manifest = store.write_manifest(root, modality=mod.name, fields=['text', mod.name],
                                  tokenizers={'text': pairs.text_tokenizer_entry(text_tokenizer),
                                              mod.name: tokenizer.manifest_entry(tok_file)},
                                  splits=entries, source=source)
  return _finish(root, manifest)


def prepare_image(root, *, text_tokenizer, cfg, run=BeamRun(), progress=None, log=print, counters=None,
                  max_bad_fraction=1.0):
  """image.prepare_image on Beam (same arguments); returns the manifest."""
  return _prepare_pairs(MODALITIES['image'], root, text_tokenizer=text_tokenizer, cfg=cfg, run=run, progress=progress,
                        log_fn=log, counters=counters, max_bad_fraction=max_bad_fraction)


def prepare_audio(root, *, text_tokenizer, cfg, run=BeamRun(), progress=None, log=print, counters=None,
                  max_bad_fraction=1.0):
  """audio.prepare_audio on Beam (same arguments); returns the manifest."""
  return _prepare_pairs(MODALITIES['audio'], root, text_tokenizer=text_tokenizer, cfg=cfg, run=run, progress=progress,
                        log_fn=log, counters=counters, max_bad_fraction=max_bad_fraction)
