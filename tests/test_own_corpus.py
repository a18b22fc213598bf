"""A corpus of one's own end to end (issue 28): `python -m tmdm.tools.example_corpus` writes text files,
captioned PNGs and espeak-ng WAVs at 22.05 kHz in the documented layout (docs/own_data.md);
experiments/custom.py prepares them (the images from a Parquet file of PNG bytes), in-process and on
Beam to the same bytes, trains a few steps, samples every task from files and prompts and evaluates,
the demo's digit and espeak evaluators skipped."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from helpers import REPO
from tmdm import cli
from tmdm.config import loader as config_loader
from tmdm.data import store
from tmdm.tools import example_corpus

CUSTOM = os.path.join(REPO, 'experiments', 'custom.py')
TINY = {'vocab.text_size': 300, 'data.seq_len': 128, 'model.d_model': 40, 'model.n_layers': 2, 'model.n_heads': 4,
        'model.d_head': 10, 'model.d_ff': 28, 'model.base_width': 40, 'model.base_depth': 2,
        'model.compute_dtype': 'float32', 'mesh.fsdp': 1, 'image.train_steps': 20, 'image.width': 16,
        'image.encode_batch': 64, 'audio.train_steps': 20, 'audio.width': 16, 'audio.encode_batch': 16,
        'audio.listen': 1, 'audio.griffin_lim_iters': 2, 'train.num_steps': 3, 'train.batch_size': 8,
        'train.progress': False, 'checkpoint.every_steps': 3, 'eval.num': 4, 'sample.num': 2}


def tree(root) -> dict:
  """Relative path -> sha256 of every file but the Orbax tokenizer folders' (their files carry
  timestamps; the manifests hold the tokenizers' weight hashes)."""
  out = {}
  for folder, _, files in os.walk(root):
    rel = os.path.relpath(folder, root)
    if rel.split(os.sep)[0] != 'tokenizer':
      for name in files:
        with open(os.path.join(folder, name), 'rb') as f:
          out[os.path.normpath(os.path.join(rel, name))] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """The example corpus (its images read from the Parquet file of PNG bytes), prepared in-process once:
  (corpus folder, config overrides, base folder; the datasets are under base/data)."""
  if shutil.which('espeak-ng') is None:
    pytest.skip('espeak-ng is not installed (launch/setup.sh)')
  base = tmp_path_factory.mktemp('own_corpus')
  corpus = str(base / 'my_corpus')
  assert example_corpus.main([corpus, '--docs=80', '--images=48', '--clips=16', '--parquet']) == 0
  overrides = [f'--config.{k}={v}' for k, v in {**TINY, 'data.root': str(base / 'data'),
                                                 'image.sources': f'parquet:{corpus}/images/pairs.parquet'}.items()]
  assert cli.main(['prepare', f'--config={CUSTOM}:{corpus}', *overrides]) == 0
  return corpus, overrides, base


@pytest.mark.slow
def test_beam_prepares_the_same_bytes(prepared, tmp_path):
  """`tmdm prepare --beam_runner=DirectRunner` of the same corpus (text files, Parquet image pairs, JSONL
  clips): every shard, label file, preview, listening file and manifest equal the in-process ones."""
  pytest.importorskip('apache_beam')
  corpus, overrides, base = prepared
  root = tmp_path / 'beam'
  args = [o for o in overrides if not o.startswith('--config.data.root=')] + [f'--config.data.root={root}']
  assert cli.main(['prepare', f'--config={CUSTOM}:{corpus}', *args, '--beam_runner=DirectRunner']) == 0
  for name in ('custom-text', 'custom-images', 'custom-speech'):
    got, want = tree(str(root / name)), tree(str(base / 'data' / name))
    assert got == want and store.MANIFEST in got, name


@pytest.mark.slow
def test_own_corpus_prepares_trains_samples_and_evaluates(prepared, tmp_path):
  from tmdm.evaluation import evaluators  # pylint: disable=import-outside-toplevel
  from tmdm.training import loop  # pylint: disable=import-outside-toplevel
  corpus, overrides, base = prepared
  images = json.load(open(base / 'data' / 'custom-images' / 'manifest.json', encoding='utf-8'))
  speech = json.load(open(base / 'data' / 'custom-speech' / 'manifest.json', encoding='utf-8'))
  assert sum(s['num_records'] for s in images['splits'].values()) == 48  # every pair kept
  assert sum(s['num_records'] for s in speech['splits'].values()) == 16
  for manifest in (images, speech):  # nothing skipped, every character known
    assert not any(v for k, v in manifest['source']['skipped'].items() if k != 'read')
    assert manifest['source']['oov']['unknown_characters'] == 0 and 'bad_records' not in manifest['source']

  cfg = config_loader.load(f'{CUSTOM}:{corpus}', overrides, num_devices=8)
  workdir = str(tmp_path / 'run')
  loop.run(cfg, workdir)
  png = os.path.join(corpus, 'images', 'shapes', '0005.png')
  wav = os.path.join(corpus, 'speech', 'wav', '0003.wav')
  for task, extra in (('text', []), ('t2i', ['--prompt=a small blue square on white']),
                      ('t2s', ['--prompt=draw a large green cross']), ('i2t', [f'--input={png}']),
                      ('s2t', [f'--input={wav}'])):
    out = str(tmp_path / 'samples' / task)
    assert cli.main(['sample', f'--workdir={workdir}', f'--task={task}', f'--out={out}', '--n=1', *extra]) == 0, task
    assert os.path.isfile(os.path.join(out, 'index.html')), task
  results = evaluators.eval_command(workdir)
  assert {'text/infill_token_acc', 'i2t/token_acc', 's2t/word_acc', 't2i_features/fd', 't2i_features/spread'} <= set(results)
  assert np.isfinite(results['t2i_features/fd']) and results['t2i_features/fd_random'] > 0
  assert not any(k.startswith('t2i/digit') for k in results)
