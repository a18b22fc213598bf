"""The image-text and audio-text datasets: manifest contents, records, skipped inputs, labels,
listening files, the config check and `tmdm prepare`'s skip / rebuild rule."""

import argparse
import json
import os

import numpy as np
import pytest

from pairs_fixtures import audio_cfg, audio_data, image_cfg, image_data, text_tokenizer  # pylint: disable=unused-import
from tmdm import errors
from tmdm.config import loader as config_loader
from tmdm.data import store
from tmdm.datasets import audio, image, text
from tmdm.tokenizers import registry


def _check_common(root, manifest, text_data, field, tokens_per_item):
  assert manifest['fields'] == ['text', field] and manifest['modality'] == field
  text_manifest = store.read_manifest(os.path.join(text_data, 'fortunes-smoke'))
  assert manifest['tokenizers']['text'] == text_manifest['tokenizers']['text']  # The shared text tokenizer.
  assert os.path.isfile(os.path.join(root, manifest['tokenizers']['text']['file']))
  entry = manifest['tokenizers'][field]
  assert {'name', 'codebook_size', 'tokens_per_item', 'sha256', 'file'} <= set(entry)
  assert entry['codebook_size'] == 1000 and entry['tokens_per_item'] == tokens_per_item
  tok = registry.load(os.path.join(root, entry['file']))
  assert tok.sha256 == entry['sha256'] and tok.name == entry['name']
  assert manifest == store.read_manifest(root)
  tt = text_tokenizer(text_data)
  for split in ('train', 'val'):
    records = store.ShardedRecords(root, split)
    assert len(records) == manifest['splits'][split]['num_records'] > 0
    for i in (0, len(records) - 1):
      r = records[i]
      assert set(r) == {'text', field} and r[field].dtype == np.int32
      assert r[field].shape == (tokens_per_item,) and 0 <= r[field].min() and r[field].max() < 1000
      assert len(r['text']) and tt.decode(r['text']).strip()
  return tok


def test_image_dataset_manifest_records_and_skips(image_data, text_data):
  root, manifest = image_data
  _check_common(root, manifest, text_data, 'image', 64)
  source = manifest['source']
  assert list(source['sources'].values()) == [1797, 3]  # digits, then the user's good images.
  # One unreadable and one missing file; one blank caption; one malformed line and one without a caption.
  assert source['skipped'] == {'read': 1797 + 8, 'unreadable_image': 2, 'empty_caption': 1, 'bad_line': 2,
                               'duplicate': 0}
  assert source['items'] == 1800
  quality = source['tokenizer_quality']
  assert quality['val_psnr_db'] > 15 and quality['val_items'] == manifest['splits']['val']['num_records']
  assert os.path.isfile(os.path.join(root, 'preview_val.png'))
  labels = {s: np.load(os.path.join(root, 'labels', f'{s}.npy')) for s in ('train', 'val')}
  for split, lab in labels.items():
    assert len(lab) == manifest['splits'][split]['num_records'] and set(np.unique(lab)) <= set(range(-1, 10))
  assert (labels['val'] >= 0).sum() + (labels['train'] >= 0).sum() == 1797
  assert 0.05 < len(labels['val']) / 1800 < 0.15
  # A val digit's caption names its label.
  tt = text_tokenizer(text_data)
  records = store.ShardedRecords(root, 'val')
  i = int(np.flatnonzero(labels['val'] >= 0)[0])
  caption, label = tt.decode(records[i]['text']), int(labels['val'][i])
  assert str(label) in caption or ('zero one two three four five six seven eight nine'.split()[label] in caption)


def test_icon_captions_and_digit_transform():
  assert image.icon_phrase('/x/48x48/places/folder-open-symbolic.symbolic.png') == 'folder open'
  assert image.icon_phrase('application-exit-symbolic-rtl.png') == 'application exit'
  digit = np.zeros((8, 8))
  digit[2:6, 3] = 16
  rgb = image.digit_to_rgb(digit)
  assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
  assert rgb[0, 0, 0] == 255 and rgb[16, 14].max() < 100  # White paper, dark ink.


@pytest.mark.skipif(not os.path.isdir('/usr/share/icons/Adwaita'), reason='adwaita-icon-theme not installed')
def test_adwaita_source_reads_icons():
  counts = {k: 0 for k in ('read', 'unreadable_image', 'duplicate')}
  items = [x for _, x in zip(range(50), image.read_adwaita(32, np.random.default_rng(0), counts))]
  assert len(items) == 50 and all(x.image_HWC.shape == (32, 32, 3) for x in items)
  assert all('icon' in x.caption or 'picture' in x.caption for x in items)


def test_audio_dataset_manifest_records_skips_and_listening(audio_data, text_data):
  root, manifest = audio_data
  tok = _check_common(root, manifest, text_data, 'audio', 50)  # 2 s at 25 tokens per second.
  skipped = manifest['source']['skipped']
  assert {k: skipped[k] for k in ('unreadable_audio', 'silent_audio', 'empty_caption', 'bad_line')} == {
      'unreadable_audio': 1, 'silent_audio': 1, 'empty_caption': 1, 'bad_line': 1}
  assert skipped['too_long'] >= 1  # The 3 s hum, and any espeak sentence spoken longer than 2 s.
  sources = manifest['source']['sources']
  assert sources['espeak:fortunes'] == 48 and list(sources.values())[1] == 1
  assert manifest['source']['items'] == 49
  assert manifest['source']['tokenizer_quality']['val_logmel_l1'] < 1.2
  listen = os.path.join(root, 'listen')
  for i in range(2):
    for kind in ('original', 'mel', 'tokens'):
      wave, rate = audio.read_wav(os.path.join(listen, f'{i:02d}_{kind}.wav'))
      assert rate == 16_000 and len(wave) == tok.cfg.samples
  with open(os.path.join(listen, 'transcripts.txt')) as f:
    assert len(f.read().strip().splitlines()) == 2


def test_missing_espeak_is_one_clear_line(monkeypatch, tmp_path, text_data):
  monkeypatch.setattr(audio.shutil, 'which', lambda _: None)
  with pytest.raises(text.MissingCorpus, match=r'apt-get install espeak-ng'):
    audio.prepare_audio(str(tmp_path / 'a'), text_tokenizer=text_tokenizer(text_data), cfg=audio_cfg())


def test_levels_must_match_vocab():
  cfg = config_loader.load('experiments/smoke.py')
  assert np.prod(cfg.image.levels) == cfg.vocab.image_size
  with pytest.raises(errors.ConfigError, match=r'image.levels \(8, 5, 5\) give 200 codes but vocab.image_size '
                     r'is 1000'):
    config_loader.load('experiments/smoke.py', ['--config.image.levels=(8, 5, 5)'])
  with pytest.raises(errors.ConfigError, match='vocab.audio_size'):
    config_loader.load('experiments/smoke.py', ['--config.vocab.audio_size=512'])


def test_prepare_skips_ready_pairs_and_refuses_changed_settings(image_data, audio_data, text_data, tmp_path,
                                                                  caplog):
  """`tmdm prepare` on datasets built by the fixtures with the same settings does no work."""
  from tmdm import cli as commands  # pylint: disable=import-outside-toplevel
  data_root = str(tmp_path / 'data')
  os.makedirs(data_root)
  for name, (root, _) in (('fortunes-smoke', (os.path.join(text_data, 'fortunes-smoke'), None)),
                          ('img', image_data), ('aud', audio_data)):
    os.symlink(root, os.path.join(data_root, name))
  img, aud = image_data[1]['source']['settings'], audio_data[1]['source']['settings']
  overrides = [f'--config.data.root={data_root}', '--config.data.text_sources=fortunes', '--config.vocab.text_size=512',
               '--config.image.name=img', '--config.audio.name=aud', '--config.data.mix_image=0.3',
               '--config.data.mix_audio=0.3']  # prepare builds pair datasets only for a mixture that uses them
  for section, settings in (('image', img), ('audio', aud)):
    for key, value in settings.items():
      if key not in ('name', 'text_tokenizer_sha256'):
        overrides.append(f'--config.{section}.{key}={value if not isinstance(value, list) else tuple(value)}')
  args = argparse.Namespace(config='experiments/smoke.py', force=False, beam_runner='', beam_options='')
  with caplog.at_level('INFO', logger='tmdm'):
    assert commands.prepare(args, overrides) == 0
  assert 'image dataset' in caplog.text and 'audio dataset' in caplog.text and caplog.text.count('is ready') == 3
  changed = r'holds an image dataset built with other settings: image.train_steps \(150 in the dataset, 7 now\)'
  with pytest.raises(errors.ConfigError, match=changed):
    commands.prepare(args, overrides + ['--config.image.train_steps=7'])
  json.dumps(img)  # Settings are plain JSON.
