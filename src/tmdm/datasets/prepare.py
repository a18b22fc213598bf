"""`tmdm prepare`: the datasets a config trains on, each built once and checked on later runs.

The text dataset first (its SentencePiece model tokenizes every caption and transcript), then the
image-text and audio-text datasets the mixture needs. Each is skipped when its manifest says it was
built with the same settings, and refused (one-line error) when it was built with others.
"""

import logging
import os
import time

import tqdm

from tmdm.data import shards as shards_lib, store
from tmdm.datasets import audio, image, pairs, text
from tmdm.errors import ConfigError

log = logging.getLogger('tmdm')


def _progress(iterable, **kwargs):
  return tqdm.tqdm(iterable, dynamic_ncols=True, leave=False, **kwargs)


def prepare(cfg, *, force: bool = False, progress=_progress) -> int:
  """The text dataset, then the image-text and audio-text ones the config trains on (data.mix_image,
  data.mix_audio > 0; captions through the text tokenizer); each is skipped when already built with
  the same settings, rebuilt with --force."""
  root = shards_lib.text_root(cfg)
  sources = [x.strip() for x in cfg.data.text_sources.split(',') if x.strip()]
  manifest_path = os.path.join(root, store.MANIFEST)
  if os.path.isfile(manifest_path) and not force:
    manifest = store.read_manifest(root)
    same = (manifest['source']['corpora'] == sources and
            manifest['tokenizers']['text']['vocab_size'] == cfg.vocab.text_size)
    if not same:
      raise ConfigError(f'{root} holds a different dataset ({manifest["source"]}); use --force or '
                                   'another data.text_name')
    log.info('text dataset %s is ready (use --force to rebuild)', root)
  else:
    start = time.time()
    manifest = text.prepare_text(root, sources=sources, vocab_size=cfg.vocab.text_size,
                                 val_fraction=cfg.data.val_fraction, max_docs=cfg.data.text_max_docs,
                                 spm_sample_docs=cfg.data.spm_sample_docs, progress=progress)
    for split, info in manifest['splits'].items():
      tokens = sum(s['num_tokens']['text'] for s in info['shards'])
      log.info('text %s: %d documents, %d tokens -> %s', split, info['num_records'], tokens, root)
    log.info('text dataset built in %.0f s', time.time() - start)

  text_tok = text.TextTokenizer(os.path.join(root, manifest['tokenizers']['text']['file']))
  for mod, build in (('image', image.prepare_image), ('audio', audio.prepare_audio)):
    section, pair_root = cfg[mod], os.path.join(cfg.data.root, cfg[mod].name)
    if cfg.data[f'mix_{mod}'] <= 0 or not section.sources.strip():
      log.info('%s dataset not needed (data.mix_%s is 0 or %s.sources is empty)', mod, mod, mod)
      continue
    settings = pairs.settings_of(section, text_tok.sha256)
    if os.path.isfile(os.path.join(pair_root, store.MANIFEST)) and not force:
      if store.read_manifest(pair_root)['source'].get('settings') == settings:
        log.info('%s dataset %s is ready (use --force to rebuild)', mod, pair_root)
        continue
      raise ConfigError(f'{pair_root} holds an {mod} dataset built with other {mod}.* settings or another '
                                   f'text tokenizer; use --force or another {mod}.name')
    start = time.time()
    pair_manifest = build(pair_root, text_tokenizer=text_tok, cfg=section, progress=progress, log=log.info)
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
