"""Subcommands of the `tmdm` CLI (COMMANDS registry); cli.py parses flags and calls these."""

import json
import logging
import os

import jax
import tqdm

from tmdm import config_lib, generate, train
from tmdm.data import store
from tmdm.modalities import text

log = logging.getLogger('tmdm')

USER_ERRORS = (config_lib.ConfigError, store.DataError, text.MissingCorpus, FileNotFoundError)


def _progress(iterable, **kwargs):
  return tqdm.tqdm(iterable, dynamic_ncols=True, leave=False, **kwargs)


def prepare(args, overrides):
  cfg = config_lib.load(args.config, overrides)
  root = train.text_root(cfg)
  sources = [x.strip() for x in cfg.data.text_sources.split(',') if x.strip()]
  manifest_path = os.path.join(root, store.MANIFEST)
  if os.path.isfile(manifest_path) and not args.force:
    manifest = store.read_manifest(root)
    same = (manifest['source']['corpora'] == sources and
            manifest['tokenizers']['text']['vocab_size'] == cfg.vocab.text_size)
    if same:
      log.info('text dataset %s is ready (use --force to rebuild)', root)
      return 0
    raise config_lib.ConfigError(f'{root} holds a different dataset ({manifest["source"]}); use --force or '
                                 'another data.text_name')
  manifest = text.prepare_text(root, sources=sources, vocab_size=cfg.vocab.text_size,
                               val_fraction=cfg.data.val_fraction, max_docs=cfg.data.text_max_docs,
                               spm_sample_docs=cfg.data.spm_sample_docs, progress=_progress)
  for split, info in manifest['splits'].items():
    tokens = sum(s['num_tokens']['text'] for s in info['shards'])
    log.info('text %s: %d documents, %d tokens -> %s', split, info['num_records'], tokens, root)
  return 0


def train_cmd(args, overrides):
  cfg = config_lib.load(args.config, overrides, num_devices=jax.device_count(),
                        process_count=jax.process_count())
  final = train.run(cfg, args.workdir)
  log.info('final: %s', json.dumps({k: round(v, 4) for k, v in final.items()}))
  return 0


def sample(args, overrides):
  texts = generate.sample_text(args.workdir, n=args.n, prompt=args.prompt, out_dir=args.out, seed=args.seed,
                               overrides=overrides)
  for i, t in enumerate(texts):
    print(f'--- sample {i}\n{t}')
  return 0


COMMANDS = {'prepare': prepare, 'train': train_cmd, 'sample': sample}
