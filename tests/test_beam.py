"""`tmdm prepare` on Apache Beam (datasets/beam.py): the same bytes as the in-process builders, on one
worker or two, after a crash, with bad records counted and the run failing above the threshold.

Tiny data (a few hundred fortunes, a few dozen pairs) and tokenizers trained for a handful of steps:
what is checked is the pipeline, not the tokenizers' quality.
"""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from pairs_fixtures import audio_cfg, image_cfg, write_user_clips, write_user_images
from tmdm import cli
from tmdm.data import store
from tmdm.datasets import audio, image, text
from tmdm.errors import DataError

pytest.importorskip('apache_beam')  # The `beam` extra (the `test` extra installs it).
beam = pytest.importorskip('tmdm.datasets.beam')
beam_stages = pytest.importorskip('tmdm.datasets.beam_stages')

MULTI = '--direct_num_workers=2 --direct_running_mode=multi_processing'
TEXT = dict(vocab_size=256, val_fraction=0.1, max_docs=300, spm_sample_docs=200_000)
SHARD = 50  # Text records per shard: several shards per split.


def tree(root) -> dict:
  """Relative path -> sha256 of every file, less the tokenizer folder (Orbax's own files carry
  timestamps; the tokenizer's identity is its weight hash, which the manifests compare)."""
  out = {}
  for folder, _, files in os.walk(root):
    rel = os.path.relpath(folder, root)
    if rel.split(os.sep)[0] == image.TOKENIZER_DIR:
      continue
    for name in files:
      with open(os.path.join(folder, name), 'rb') as f:
        out[os.path.normpath(os.path.join(rel, name))] = hashlib.sha256(f.read()).hexdigest()
  return out


def manifest(root) -> dict:
  with open(os.path.join(root, store.MANIFEST)) as f:
    return json.load(f)


def text_sources(folder):
  """fortunes, two text files (one empty: skipped) and a JSONL with a duplicate of one of the files."""
  os.makedirs(os.path.join(folder, 'txt'), exist_ok=True)
  for name, body in (('a.txt', 'A first user document.\nWith two lines.'), ('b.txt', '   \n'),
                     ('c.txt', 'The third file, read after the empty one.')):
    with open(os.path.join(folder, 'txt', name), 'w') as f:
      f.write(body)
  path = os.path.join(folder, 'docs.jsonl')
  with open(path, 'w') as f:
    for doc in ('one JSON document', 'A first user document.\nWith two lines.', 'and the last one'):
      f.write(json.dumps({'text': doc}) + '\n')
  return ['fortunes', f'txt:{folder}/txt/*.txt', f'jsonl:{path}']


@pytest.fixture(scope='module')
def text_ref(tmp_path_factory):
  """The in-process text dataset (SentencePiece trained reproducibly, on one thread: text.train_tokenizer)."""
  base = tmp_path_factory.mktemp('beam_text')
  sources = text_sources(str(base / 'src'))
  root = str(base / 'in_process')
  text.prepare_text(root, sources=sources, shard_records=SHARD, **TEXT)
  return sources, root, base


def beam_text(root, sources, **run):
  return beam.prepare_text(root, sources=sources, run=beam.BeamRun(shard_records=SHARD, **run), **TEXT)


def test_text_matches_in_process(text_ref):
  sources, ref, base = text_ref
  root = str(base / 'beam1')
  got = beam_text(root, sources)
  assert tree(root) == tree(ref)  # Shards and manifest (skip counts, unknown characters) byte for byte.
  assert got == manifest(ref) and len(got['splits']['train']['shards']) > 1
  skipped = got['source']['skipped']
  assert skipped['empty_text'] == 1 and skipped['duplicate'] >= 1 and skipped['read'] > TEXT['max_docs']
  assert got['source']['oov']['documents'] == TEXT['max_docs'] and 'bad_records' not in got['source']
  assert not os.path.exists(os.path.join(root, beam_stages.WORK_DIR))
  records = store.ShardedRecords(root, 'train')  # The training side reads it unchanged.
  assert len(records) == got['splits']['train']['num_records'] and records[0]['text'].dtype == np.int32


def test_manifest_absent_until_the_end_and_rerun_after_crash(text_ref, monkeypatch):
  sources, _, base = text_ref
  root = str(base / 'crash')
  first = beam_text(root, sources)
  before = tree(root)
  seen = []
  real_publish = beam_stages.publish

  def publish(tmp, final, fields):
    seen.append(os.path.exists(os.path.join(root, store.MANIFEST)))
    real_publish(tmp, final, fields)
  monkeypatch.setattr(beam_stages, 'publish', publish)
  with pytest.raises(Exception, match='injected fault'):  # A rebuild that dies on its second train shard.
    beam_text(root, sources, fault='train/1')
  assert seen and not any(seen)  # The old manifest went first, before any shard was replaced.
  assert not os.path.exists(os.path.join(root, store.MANIFEST))
  leftovers = os.listdir(os.path.join(root, beam_stages.WORK_DIR, 'tmp'))
  assert any(name.startswith('train-00001-') for name in leftovers)  # The dead writer's temporary shard.
  os.makedirs(os.path.join(root, 'train', '00099', 'text'))  # And a stray shard of some older build.
  monkeypatch.undo()
  assert beam_text(root, sources) == first
  assert tree(root) == before  # Byte for byte, manifest included; nothing left over.


def test_text_bad_records_are_counted(tmp_path):
  path = tmp_path / 'bad.jsonl'
  lines = [json.dumps({'text': f'a good document number {i} with some words in it'}) for i in range(20)]
  lines += ['{not json', json.dumps({'text': '  '}), json.dumps({'text': 7}), json.dumps({'body': 'x'})]
  path.write_bytes(('\n'.join(lines) + '\n').encode())
  counters = {}
  got = beam.prepare_text(str(tmp_path / 'out'), sources=[f'jsonl:{path}'], vocab_size=30, val_fraction=0.1,
                          run=beam.BeamRun(), counters=counters)
  assert got['source']['skipped'] == {'read': 24, 'empty_text': 1, 'bad_line': 3, 'duplicate': 0, 'empty_tokens': 0}
  assert counters['tmdm.prepare.text/bad_line'] == 3 and counters['tmdm.prepare.text/empty_text'] == 1
  bad = got['source']['bad_records'][f'jsonl:{path}']
  assert bad['read'] == 24 and bad['bad'] == {'empty_field': 1, 'not_json': 1, 'unknown_field': 1, 'wrong_type': 1}
  assert bad['first'][0] == f'{path}:21: not JSON (Expecting property name enclosed in double quotes at column 2)'
  ref = text.prepare_text(str(tmp_path / 'ref'), sources=[f'jsonl:{path}'], vocab_size=30, val_fraction=0.1)
  assert got == ref  # The in-process build counts the same.
  with pytest.raises(DataError, match=rf'^jsonl:{path}: 4 of 24 records are bad \(16.7% > data.max_bad_fraction=0.1; '
                     rf'empty_field 1, not_json 1, unknown_field 1, wrong_type 1\); the first: {path}:21: not JSON'):
    beam.prepare_text(str(tmp_path / 'strict'), sources=[f'jsonl:{path}'], vocab_size=30, val_fraction=0.1,
                      run=beam.BeamRun(), max_bad_fraction=0.1)
  assert not os.path.exists(tmp_path / 'strict' / store.MANIFEST)
  with open(path, 'ab') as f:  # A byte that is not UTF-8 stops the build whatever the limit.
    f.write(b'{"text": "bad \xff byte"}\n')
  with pytest.raises(DataError, match=rf'{path}:25: not UTF-8 \(byte 0xff at offset 14\)'):
    beam.prepare_text(str(tmp_path / 'latin'), sources=[f'jsonl:{path}'], vocab_size=30, val_fraction=0.1,
                      run=beam.BeamRun())


@pytest.fixture(scope='module')
def pair_inputs(text_ref):
  """The text tokenizer, the user images and clips with their known defects, and the in-process image
  and audio datasets (tokenizers trained a few steps)."""
  _, ref, base = text_ref
  tok = text.TextTokenizer(os.path.join(ref, 'spm.model'))
  users = os.path.dirname(write_user_images(str(base / 'user_images')))
  clips = write_user_clips(str(base / 'user_clips'))
  cfgs = {'image': image_cfg(sources=f'digits,folder:{users}', max_items=24, train_steps=3, width=8, batch_size=8,
                             encode_batch=8),
          'audio': audio_cfg(sources=f'espeak:fortunes,jsonl:{clips}', max_items=6, train_steps=3,
                             width=8, batch_size=4, encode_batch=4, listen=1)}
  refs = {}
  for mod, build in (('image', image.prepare_image), ('audio', audio.prepare_audio)):
    refs[mod] = str(base / f'{mod}_in_process')
    build(refs[mod], text_tokenizer=tok, cfg=cfgs[mod], log=lambda *_: None)
  return tok, cfgs, refs, base


@pytest.mark.parametrize('mod', ['image', 'audio'])
def test_pairs_match_in_process(pair_inputs, mod):
  tok, cfgs, refs, base = pair_inputs
  root, counters = str(base / f'{mod}_beam1'), {}
  build = beam.prepare_image if mod == 'image' else beam.prepare_audio
  got = build(root, text_tokenizer=tok, cfg=cfgs[mod], run=beam.BeamRun(), log=lambda *_: None, counters=counters)
  assert tree(root) == tree(refs[mod])  # Shards, labels, previews or listening files, and the manifest.
  assert got == manifest(refs[mod])
  skipped = got['source']['skipped']
  if mod == 'image':
    assert (skipped['unreadable_image'], skipped['bad_line'], skipped['empty_caption']) == (2, 2, 1)
    assert counters['tmdm.prepare.image/unreadable_image'] == 2
  else:
    assert skipped['too_long'] >= 1 and skipped['silent_audio'] == 1 and skipped['unreadable_audio'] >= 1
    assert counters['tmdm.prepare.audio/too_long'] >= skipped['too_long']  # Counters see past a source's cap.


def test_pairs_fail_above_the_bad_fraction(pair_inputs):
  tok, cfgs, refs, base = pair_inputs
  root = str(base / 'strict_images')
  cfg = cfgs['image'].copy_and_resolve_references()
  cfg.sources = cfgs['image'].sources.split(',', 1)[1]  # The user images alone: 5 bad lines of 8.
  cfg.tokenizer_path = os.path.join(refs['image'], image.TOKENIZER_DIR)
  with pytest.raises(DataError, match=r'5 of 8 records are bad \(62.5% > data.max_bad_fraction=0.5; empty_field 1, '
                     r'missing_field 1, not_json 1, unreadable 2\); the first: .*captions.jsonl:4: field .image.: '
                     r"'broken.png' cannot be read as an image"):
    beam.prepare_image(root, text_tokenizer=tok, cfg=cfg, run=beam.BeamRun(), log=lambda *_: None, max_bad_fraction=0.5)
  assert not os.path.exists(os.path.join(root, store.MANIFEST))


@pytest.mark.slow
def test_two_worker_processes_give_the_same_bytes(text_ref, pair_inputs):
  """DirectRunner with 2 worker processes: text (several shards), image and audio equal the in-process
  datasets, as the single-worker runs do."""
  sources, ref, base = text_ref
  tok, cfgs, refs, _ = pair_inputs
  root = str(base / 'text_beam2')
  got = beam_text(root, sources, runner='DirectRunner', options=MULTI)
  assert got == manifest(ref) and tree(root) == tree(ref)
  for mod, build in (('image', beam.prepare_image), ('audio', beam.prepare_audio)):
    root = str(base / f'{mod}_beam2')
    build(root, text_tokenizer=tok, cfg=cfgs[mod], run=beam.BeamRun(options=MULTI), log=lambda *_: None)
    assert tree(root) == tree(refs[mod]), mod


def test_cli_prepare_with_a_beam_runner(tmp_path, capsys):
  common = ['prepare', '--config=experiments/smoke.py', f'--config.data.root={tmp_path}',
            '--config.data.text_max_docs=200', '--config.vocab.text_size=256']
  assert cli.main(common + ['--beam_options=--direct_num_workers=1']) == 2
  assert '--beam_options needs --beam_runner' in capsys.readouterr().err
  assert cli.main(common + ['--beam_runner=DirectRunner', '--beam_options=--direct_num_workers=1']) == 0
  root = tmp_path / 'fortunes-smoke'
  got = manifest(str(root))
  assert got['source']['documents'] == 200 and 'skipped' in got['source']
  stamp = os.path.getmtime(root / store.MANIFEST)
  assert cli.main(common + ['--beam_runner=DirectRunner']) == 0  # Built with the same settings: kept.
  assert os.path.getmtime(root / store.MANIFEST) == stamp
  shutil.rmtree(root)


@pytest.mark.slow
def test_a_killed_prepare_leaves_no_dataset_and_reruns_to_the_same_bytes(tmp_path):
  """SIGKILL of `tmdm prepare --beam_runner=DirectRunner` while its pipeline writes shards: no
  manifest (no readable dataset); the same command again gives the in-process bytes."""
  import signal  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  common = ['prepare', f'--config={os.path.join(repo, "experiments", "smoke.py")}',
            '--config.data.text_max_docs=300', '--config.vocab.text_size=256']
  ref = tmp_path / 'in_process'
  assert cli.main(common + [f'--config.data.root={ref}']) == 0
  root = tmp_path / 'beam'
  argv = [sys.executable, '-m', 'tmdm.cli', *common, f'--config.data.root={root}', '--beam_runner=DirectRunner']
  proc = subprocess.Popen(argv, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  work = root / 'fortunes-smoke' / '.beam-work'
  end = time.time() + 240
  while not work.exists() and proc.poll() is None and time.time() < end:
    time.sleep(0.02)
  assert proc.poll() is None, 'prepare finished before it could be killed'
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (root / 'fortunes-smoke' / store.MANIFEST).exists()
  assert subprocess.run(argv, cwd=repo, capture_output=True, check=False).returncode == 0
  got, want = tree(str(root / 'fortunes-smoke')), tree(str(ref / 'fortunes-smoke'))
  want.pop('spm.vocab', None)  # Only the in-process builder lists the pieces (nothing reads it).
  assert got == want  # Manifest included.
