"""Subcommands of the `tmdm` CLI: COMMANDS maps a name to its help, its argparse arguments and the
function that runs it (args, config overrides) -> exit status. cli.py builds the parser from it."""

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Command:
  help: str
  add_arguments: object  # argparse parser -> None
  run: object  # (args, overrides) -> exit status


def _config_arg(p, required=True):
  p.add_argument('--config', required=required, help='experiments/FILE.py[:preset]')


def _prepare_args(p):
  _config_arg(p)
  p.add_argument('--force', action='store_true', help='rebuild datasets that exist')


def _train_args(p):
  _config_arg(p)
  p.add_argument('--workdir', required=True, help='run folder: checkpoints, metrics, config')


def _sample_args(p):
  p.add_argument('--workdir', required=True, help='a training workdir (its latest checkpoint is used)')
  p.add_argument('--n', type=int, default=0, help='number of samples (default: sample.num)')
  p.add_argument('--prompt', default='', help='text the samples start with')
  p.add_argument('--out', default=None, help='output folder (default: WORKDIR/samples)')
  p.add_argument('--seed', type=int, default=0, help='random seed')


COMMANDS = {
    'prepare': Command('build datasets and tokenizers', _prepare_args, prepare),
    'train': Command('train, or resume from the latest checkpoint', _train_args, train_cmd),
    'sample': Command('generate from a trained workdir', _sample_args, sample),
}
