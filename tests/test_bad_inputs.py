"""Bad input gets one line that names the setting or the file (issue 28, items 3 and 5): each case runs
the real `tmdm` command in this process and asserts its exit status, its one-line message and that
nothing was built before the error."""

import collections
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import REPO
from tmdm import cli
from tmdm.datasets import audio, image, records, text

SMOKE = os.path.join(REPO, 'experiments', 'smoke.py')


def _corpus(folder):
  """A small valid text corpus (JSONL) and the bad files of the cases."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, 'ok.jsonl'), 'w', encoding='utf-8') as f:
    for i in range(60):
      f.write(json.dumps({'text': f'line {i} of a small corpus about cats and dogs'}) + '\n')
  with open(os.path.join(folder, 'latin1.jsonl'), 'wb') as f:
    f.write(b'{"text": "fine"}\n{"text": "also fine"}\n{"text": "caf\xe9"}\n')
  with open(os.path.join(folder, 'latin1.txt'), 'wb') as f:
    f.write('une tasse de café'.encode('latin-1'))
  good = [json.dumps({'text': f'line {i} of a small corpus about cats and dogs'}) for i in range(60)]
  for name, last in (('unknown', {'text': 'a cat', 'id': 7}), ('missing', {}), ('wrong_type', {'text': ['a', 'cat']})):
    with open(os.path.join(folder, f'{name}.jsonl'), 'w', encoding='utf-8') as f:
      f.write('\n'.join(good + [json.dumps(last)]) + '\n')
  os.makedirs(os.path.join(folder, 'pairs'), exist_ok=True)
  png = _png(os.path.join(folder, 'pairs', 'red.png'))
  with open(os.path.join(folder, 'pairs', 'captions.jsonl'), 'w', encoding='utf-8') as f:
    f.writelines(json.dumps({'image': 'red.png', 'caption_text': f'a red square {i}'}) + '\n' for i in range(3))
  pq.write_table(pa.table({'image': [png], 'caption_txt': ['a red square']}), os.path.join(folder, 'pairs.parquet'))
  return folder


def _png(path, colour=(200, 0, 0)):
  """A small PNG at path; returns its bytes."""
  Image.new('RGB', (12, 8), colour).save(path)
  with open(path, 'rb') as f:
    return f.read()


def _wav(wave_S, rate=16_000) -> bytes:
  buf = io.BytesIO()
  audio.write_wav(buf, wave_S, rate)
  return buf.getvalue()


def _cases(d):
  prep = ['prepare', f'--config={SMOKE}', f'--config.data.root={d}/data']
  return {
      'int key given a word': (['train', f'--config={SMOKE}', f'--workdir={d}/run', '--config.train.num_steps=abc'],
                               "--config.train.num_steps: expected an integer, got 'abc'"),
      'unknown digit caption style': (['train', f'--config={SMOKE}', f'--workdir={d}/run',
                                       '--config.image.digit_captions=short'],
                                      "image.digit_captions must be 'varied' or 'word', got 'short'"),
      'float key given a word': (['train', f'--config={SMOKE}', f'--workdir={d}/run', '--config.optim.lr=fast'],
                                 "--config.optim.lr: expected a number, got 'fast'"),
      'mesh larger than the devices': (['train', f'--config={SMOKE}', f'--workdir={d}/run', '--config.mesh.data=16'],
                                       'than the 8 visible devices (on a CPU host, --host_devices=16 simulates them)'),
      'text JSONL with a Latin-1 byte': (prep + [f'--config.data.text_sources=jsonl:{d}/latin1.jsonl'],
                                         f'{d}/latin1.jsonl:3: not UTF-8 (byte 0xe9 at offset 13)'),
      'Latin-1 text file': (prep + [f'--config.data.text_sources=txt:{d}/latin1.txt'],
                            f'{d}/latin1.txt: not UTF-8 (byte 0xe9 at offset 16)'),
      'vocabulary larger than the corpus': (
          prep + [f'--config.data.text_sources=jsonl:{d}/ok.jsonl', '--config.vocab.text_size=4000'],
          'vocab.text_size=4000 is more pieces than this corpus supports (at most '),
      'missing image source': (prep + [f'--config.data.text_sources=jsonl:{d}/ok.jsonl', '--config.data.mix_image=0.5',
                                       f'--config.image.sources=jsonl:{d}/nowhere.jsonl'],
                               f'image.sources: {d}/nowhere.jsonl not found'),
      'unknown audio source': (prep + [f'--config.data.text_sources=jsonl:{d}/ok.jsonl', '--config.data.mix_audio=0.5',
                                       '--config.audio.sources=wav:clips'],
                               "audio.sources: unknown source 'wav:clips' (choices: espeak:CORPUS, jsonl:PATH, "
                               'parquet:GLOB)'),
      'text JSONL with an unknown field': (
          prep + [f'--config.data.text_sources=jsonl:{d}/unknown.jsonl'],
          f'jsonl:{d}/unknown.jsonl: 1 of 61 records are bad (1.6% > data.max_bad_fraction=0.01; unknown_field 1); '
          f"the first: {d}/unknown.jsonl:61: field 'id': unknown (text records have 'text')"),
      'text JSONL with a missing field': (
          prep + [f'--config.data.text_sources=jsonl:{d}/missing.jsonl'],
          f"(1.6% > data.max_bad_fraction=0.01; missing_field 1); the first: {d}/missing.jsonl:61: field 'text': "
          'missing'),
      'text JSONL with a field of the wrong type': (
          prep + [f'--config.data.text_sources=jsonl:{d}/wrong_type.jsonl'],
          f"the first: {d}/wrong_type.jsonl:61: field 'text': expected a string, got list"),
      'image Parquet with a misspelled column': (
          prep + [f'--config.data.text_sources=jsonl:{d}/ok.jsonl', '--config.data.mix_image=0.5',
                  f'--config.image.sources=parquet:{d}/*.parquet'],
          f"{d}/pairs.parquet: column 'caption_txt' is not a field of image records ('image', 'caption'): rename or "
          'drop it'),
      'image JSONL whose every line misspells a field': (
          prep + [f'--config.data.text_sources=jsonl:{d}/ok.jsonl', '--config.vocab.text_size=32',
                  '--config.data.mix_image=0.5', f'--config.image.sources=folder:{d}/pairs'],
          f'folder:{d}/pairs: 3 of 3 records are bad (100.0% > data.max_bad_fraction=0.01; unknown_field 3); the '
          f"first: {d}/pairs/captions.jsonl:1: field 'caption_text': unknown (image records have 'image', 'caption')"),
  }


CASES = sorted(_cases('D'))


@pytest.mark.parametrize('case', CASES)
def test_bad_input_is_one_line_naming_it(case, tmp_path, capsys):
  d = _corpus(str(tmp_path))
  argv, message = _cases(d)[case]
  assert cli.main(argv) == 2
  err = [line for line in capsys.readouterr().err.splitlines() if line.startswith('tmdm ')]  # not progress bars
  assert len(err) == 1 and err[0].startswith(f'tmdm {argv[0]}: error: '), err
  assert message in err[0], err[0]
  unbuilt = 'digits-icons' if 'every line' in case else 'fortunes-smoke'  # image records are read after the text
  assert not os.path.exists(os.path.join(d, 'data', unbuilt, 'manifest.json'))  # nothing was built first


def test_bad_records_under_the_limit_are_skipped_and_counted(tmp_path):
  """Bad records of each kind and format, under data.max_bad_fraction: each skipped, counted by reason
  and located, and every good record kept (issue 28)."""
  d = str(tmp_path)
  good = [f'document {i} about cats' for i in range(40)]
  bad = ['{"text": "no end"', '[1, 2]', '{"text": "x", "lang": "en"}', '{}', '{"text": 3}', '{"text": " "}']
  with open(f'{d}/docs.jsonl', 'w', encoding='utf-8') as f:
    f.write('\n'.join([json.dumps({'text': t}) for t in good[:20]] + bad + ['', ''] +
                      [json.dumps({'text': t}) for t in good[20:]]) + '\n')
  counts, tally = collections.Counter(), records.Tally(0.15)
  assert list(text.read_corpus(f'jsonl:{d}/docs.jsonl', counts, tally)) == good  # blank lines are not records
  assert counts == {'read': 46, 'bad_line': 5, 'empty_text': 1}
  assert dict(tally.bad[f'jsonl:{d}/docs.jsonl']) == {'not_json': 1, 'not_object': 1, 'unknown_field': 1,
                                                      'missing_field': 1, 'wrong_type': 1, 'empty_field': 1}
  assert tally.first[f'jsonl:{d}/docs.jsonl'] == [
      f'{d}/docs.jsonl:21: not JSON (Expecting \',\' delimiter at column 18)',
      f"{d}/docs.jsonl:22: not an object of 'text' (got list)",
      f"{d}/docs.jsonl:23: field 'lang': unknown (text records have 'text')",
      f"{d}/docs.jsonl:24: field 'text': missing", f"{d}/docs.jsonl:25: field 'text': expected a string, got int"]
  with pytest.raises(records.DataError, match=r'6 of 46 records are bad \(13.0% > data.max_bad_fraction=0.1;'):
    list(text.read_corpus(f'jsonl:{d}/docs.jsonl', collections.Counter(), records.Tally(0.1)))

  # Image-text pairs in Parquet, the images' bytes in a column: a null caption, bytes that are no image, a blank
  # caption.
  pngs = [_png(f'{d}/{i}.png', (40 * i, 0, 0)) for i in range(3)]
  pq.write_table(pa.table({'image': pngs + [b'not an image', pngs[0]], 'caption': ['a', 'b', None, 'c', ' ']}),
                 f'{d}/pairs.parquet')
  counts, tally = collections.Counter(), records.Tally()
  items = list(image.read_source(f'parquet:{d}/pairs.parquet', 8, None, counts, 'pad', tally))
  assert [it.caption for it in items] == ['a', 'b'] and items[0].image_HWC.shape == (8, 8, 3)
  assert counts == {'read': 5, 'bad_line': 1, 'unreadable_image': 1, 'empty_caption': 1}
  assert tally.first[f'parquet:{d}/pairs.parquet'] == [
      f"{d}/pairs.parquet:row 3: field 'caption': missing",
      f"{d}/pairs.parquet:row 4: field 'image': 12 bytes cannot be read as an image",
      f"{d}/pairs.parquet:row 5: field 'caption': empty"]

  # Audio-text pairs in Parquet, WAV bytes and a path relative to the file cannot share a column: bytes here.
  tone = 0.3 * np.sin(np.arange(8000) / 5)
  pq.write_table(pa.table({'audio': [_wav(tone), b'RIFF....', _wav(tone)], 'text': ['a hum', 'broken', None]}),
                 f'{d}/clips.parquet')
  counts, tally = collections.Counter(), records.Tally()
  clips = list(audio.read_source(f'parquet:{d}/clips.parquet', None, None, counts, None, tally))
  assert [(c[0], c[2], c[3]) for c in clips] == [('a hum', 16_000, f'{d}/clips.parquet:row 1')]
  assert counts == {'read': 3, 'unreadable_audio': 1, 'bad_line': 1}


def test_unknown_characters_are_counted(tmp_path):
  """Characters the text tokenizer never saw become its unknown piece: counted per character and
  document (issue 28), for the log and each dataset's manifest."""
  tok = text.train_tokenizer([f'the cat number {i} sat on the mat with a dog' for i in range(50)],
                             str(tmp_path / 'spm'), 32, 1000)
  report = text.oov_report(text.oov_counts(tok, ['a cat on a mat', 'the 猫 sat', '猫 and 猫\n é']))
  assert report == {'characters': 23, 'unknown_characters': 4, 'unknown_character_share': 0.173913, 'documents': 3,
                    'unknown_documents': 2, 'unknown_document_share': 0.666667, 'top_unknown': [['猫', 3], ['é', 1]]}
  line = text.oov_line('x', report)
  assert "x: 4 of 23 characters (17.391%) in 2 of 3 documents are outside the text vocabulary" in line


def test_every_subcommand_help_names_the_common_flags(capsys):
  for name in ('train', 'sample', 'export'):
    with pytest.raises(SystemExit):
      cli.main([name, '--help'])
    out = ' '.join(capsys.readouterr().out.split())
    assert '--host_devices=N' in out and '--config.KEY=VALUE' in out, name


def test_digit_evaluator_skips_data_that_is_not_digits(tmp_path, caplog):
  """`tmdm eval` on a model of one's own images (issue 28, item 4): the digit classifier's evaluator is
  skipped with a warning instead of reporting digit accuracy 0 for shapes."""
  import types  # pylint: disable=import-outside-toplevel
  from tmdm.config import base as base_config  # pylint: disable=import-outside-toplevel
  from tmdm.data import store  # pylint: disable=import-outside-toplevel
  from tmdm.evaluation import evaluators  # pylint: disable=import-outside-toplevel
  cfg = base_config.get_config()
  cfg.data.root, cfg.image.name, cfg.data.mix_image, cfg.data.mix_audio = str(tmp_path), 'shapes', 0.5, 0.0
  (tmp_path / 'shapes').mkdir()
  store.write_manifest(str(tmp_path / 'shapes'), modality='image', fields=['text', 'image'], tokenizers={}, splits={},
                       source={'settings': {'sources': 'jsonl:shapes/captions.jsonl'}})
  assert evaluators.run(types.SimpleNamespace(cfg=cfg), ['t2i_digits', 't2s']) == {}
  assert any('skipping t2i_digits' in r.message and 'jsonl:shapes' in r.message for r in caplog.records)


@pytest.mark.parametrize('fit', ['pad', 'crop', 'stretch'])
def test_a_wide_image_keeps_its_aspect_ratio(fit):
  """A 200 x 100 image (left half red, right half blue) into 32 x 32 (issue 28, item 2): 'pad' keeps
  it whole between white bands, 'crop' keeps its centre square, 'stretch' squashes it."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from tmdm.datasets import image  # pylint: disable=import-outside-toplevel
  wide = np.zeros((100, 200, 3), np.uint8)
  wide[:, :100] = (255, 0, 0)
  wide[:, 100:] = (0, 0, 255)
  wide[:, :25] = wide[:, 175:] = (0, 255, 0)  # green edges: kept by pad and stretch, cut by crop
  out = image.to_rgb(Image.fromarray(wide), 32, fit).astype(int)
  white, red, blue, green = (255, 255, 255), (255, 0, 0), (0, 0, 255), (0, 255, 0)
  close = lambda px, c: np.abs(px - np.asarray(c)).max() < 60
  if fit == 'pad':  # 200 x 100 -> 200 x 200 with 50 white rows above and below -> 32 x 32: 8 white rows each
    assert close(out[2, 16], white) and close(out[29, 16], white)
    assert close(out[16, 1], green) and close(out[16, 8], red) and close(out[16, 24], blue)
  elif fit == 'crop':  # the centre 100 x 100 (x in 50..150): red left, blue right, no white, no green
    assert close(out[1, 1], red) and close(out[30, 30], blue)
  else:  # squashed: green edges, colour to the top and bottom rows
    assert close(out[1, 1], green) and close(out[1, 8], red) and close(out[30, 24], blue)
  assert out.shape == (32, 32, 3)


def test_digit_caption_styles():
  """'word' captions each digit with its number word alone; 'varied' keeps the eight phrasings, each
  naming the digit (as a word or a numeral); the images and their order do not depend on the style."""
  got = {}
  for style in ('varied', 'word'):
    counts = collections.Counter()
    got[style] = list(image.read_source('digits', 8, np.random.default_rng(0), counts, digit_captions=style))
  word, varied = got['word'], got['varied']
  assert len(word) == len(varied) == 1797
  assert all(it.caption == image.NUMBER_WORDS[it.label] for it in word)
  assert all(np.array_equal(a.image_HWC, b.image_HWC) and a.label == b.label for a, b in zip(word, varied))
  assert len({it.caption for it in varied if it.label == 7}) == len(image.DIGIT_CAPTIONS)
  assert all(image.NUMBER_WORDS[it.label] in it.caption or str(it.label) in it.caption for it in varied)

