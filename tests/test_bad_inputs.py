"""Bad input gets one line that names the setting or the file (issue 28, items 3 and 5): each case runs
the real `tmdm` command in this process and asserts its exit status, its one-line message and that
nothing was built before the error."""

import json
import os

import pytest

from helpers import REPO
from tmdm import cli

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
  return folder


def _cases(d):
  prep = ['prepare', f'--config={SMOKE}', f'--config.data.root={d}/data']
  return {
      'int key given a word': (['train', f'--config={SMOKE}', f'--workdir={d}/run', '--config.train.num_steps=abc'],
                               "--config.train.num_steps: expected an integer, got 'abc'"),
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
                               "audio.sources: unknown source 'wav:clips' (choices: espeak:CORPUS, jsonl:PATH)"),
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
  assert not os.path.exists(os.path.join(d, 'data', 'fortunes-smoke', 'manifest.json'))  # nothing was built first


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
