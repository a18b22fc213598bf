"""`t2i_features`: text -> image measured in the image tokenizer's own features, for
any image data. The Fréchet helper against its closed form, and the evaluator on coloured shapes
(tmdm.tools.example_corpus's drawing) with a small tokenizer trained here and stand-in generators of
known quality: a perfect one (a fresh drawing of the prompt) must land at the second-real-sample
floor and far from noise, one image for every prompt must have no spread and a large distance."""

import types

import numpy as np
import pytest

from tmdm.evaluation import measures as em

SHAPES, COLOURS, SIZE = ('circle', 'square'), ('red', 'green', 'blue'), 16


def test_frechet_is_zero_for_a_set_and_the_squared_shift_for_a_shifted_copy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))  # correlated features
  shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0, -1.0])
  assert abs(em.frechet(x, x)) < 1e-4
  assert em.frechet(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-4)  # same covariance
  # Independent samples of one Gaussian: only sampling noise, far below a unit shift in 6 dimensions.
  assert em.frechet(x[:200], x[200:]) < 0.25 * em.frechet(x, x + np.ones(6))


def test_spread_and_caption_match_by_hand():
  x = np.array([[0, 0], [3, 4], [0, 4]], float)  # pairwise distances 5, 3, 4
  assert em.mean_pairwise_distance(x) == pytest.approx(4.0)
  assert em.spread(np.ones((5, 2)), x) == 0.0 and em.spread(2 * x, x) == pytest.approx(2.0)
  real = np.array([[0, 0], [0, 1], [10, 10], [10, 11]], float)
  captions = ['a red circle', 'A red circle.', 'a blue square', 'a green cross']
  gen = np.array([[0.2, 0.1], [9, 9], [9.5, 10.2], [0, 0.6]])  # nearest real: 0, 2, 2, 1
  match, chance = em.nn_caption_match(gen, real, captions)
  assert match.tolist() == [1, 0, 1, 0] and chance == pytest.approx((2 + 2 + 1 + 1) / 16)
  assert em.nn_caption_match_real(real, captions) == pytest.approx(0.5)  # 0 <-> 1 share one; 2 <-> 3 do not


def _draw(caption, rng):
  from tmdm.datasets import image as image_mod  # pylint: disable=import-outside-toplevel
  from tmdm.tools import example_corpus  # pylint: disable=import-outside-toplevel
  _, size, colour, shape = caption.split()[:4]
  img = example_corpus.draw_shape(shape, colour, size, rng, side=32)
  return image_mod.to_rgb(img, SIZE).astype(np.float32) / 255


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
  """A pair dataset of large coloured circles and squares (6 captions; 96 train, 36 held out) coded by
  a 16 px tokenizer trained here for a few seconds; returns (root, tokenizer, captions)."""
  from tmdm.data import store  # pylint: disable=import-outside-toplevel
  from tmdm.tokenizers import image as image_tok  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  captions = [f'a large {c} {s} on white' for c in COLOURS for s in SHAPES]
  split_ids = {'train': np.arange(96) % len(captions), 'val': rng.permutation(np.arange(36) % len(captions))}
  images = {k: np.stack([_draw(captions[i], rng) for i in ids]) for k, ids in split_ids.items()}
  tok = image_tok.train(images['train'], image_tok.ImageConfig(size=SIZE, width=16), steps=60, batch_size=32,
                        lr=3e-3, seed=0)
  root = tmp_path_factory.mktemp('shapes')
  splits = {k: [store.write_shard(str(root / k / '00000'),
                                  [{'text': [i], 'image': c} for i, c in zip(ids, tok.encode(images[k]))],
                                  ['text', 'image'])] for k, ids in split_ids.items()}
  store.write_manifest(str(root), modality='image', fields=['text', 'image'], tokenizers={}, splits=splits, source={})
  return str(root), tok, captions


def _evaluate(monkeypatch, shapes, draw, num=36):
  """evaluators.t2i_features with generate.generate replaced by `draw(prompt, rng)` -> image, passed
  through the tokenizer as a model's codes would be."""
  from tmdm.evaluation import evaluators  # pylint: disable=import-outside-toplevel
  from tmdm.generation import generate  # pylint: disable=import-outside-toplevel
  root, tok, captions = shapes
  text = types.SimpleNamespace(decode=lambda ids: captions[int(ids[0])])
  ctx = types.SimpleNamespace(cfg=types.SimpleNamespace(eval=types.SimpleNamespace(num=num, seed=0)),
                              root=lambda kind: root, tokenizer=lambda kind: text if kind == 'text' else tok,
                              memo={}, items={}, last={})

  def fake_generate(ctx_, task, *, prompts, n, seed, settings):
    del ctx_, n, settings
    assert task == 't2i'
    rng = np.random.default_rng(seed + 1)
    out = tok.decode(tok.encode(np.stack([draw(p, rng) for p in prompts])))
    return [generate.Sample(task, p, o) for p, o in zip(prompts, out)], {'seconds': 0.0, 'forward_passes': 1.0}

  monkeypatch.setattr(evaluators.generate, 'generate', fake_generate)
  return evaluators.t2i_features(ctx, settings=lambda ctx_, task: None), ctx


def test_t2i_features_places_a_perfect_and_a_collapsed_generator(monkeypatch, shapes):
  perfect, ctx = _evaluate(monkeypatch, shapes, _draw)
  k = 't2i_features/'
  assert perfect[k + 'samples'] == 36 and set(ctx.last) == {'t2i_features'}
  assert em.encoder_features(shapes[1], np.ones((3, SIZE, SIZE, 3))).shape == (3, 16)  # one per encoder channel
  floor, ceiling, fd = perfect[k + 'fd_train'], perfect[k + 'fd_random'], perfect[k + 'fd']
  assert 0 < floor < 0.2 * ceiling  # the references themselves are apart
  assert fd < 2 * floor + 0.02 * ceiling and perfect[k + 'score'] > 0.9  # a second real sample's distance
  assert 0.8 < perfect[k + 'spread'] < 1.25
  chance = perfect[k + 'nn_caption_match_chance']
  assert chance == pytest.approx(1 / 6)  # 6 captions, 6 of each among the 36
  assert perfect[k + 'nn_caption_match'] > 2 * chance and perfect[k + 'nn_caption_match_real'] > 2 * chance

  one = lambda p, rng: _draw('a large red circle', np.random.default_rng(0))  # one image whatever the prompt
  collapsed, _ = _evaluate(monkeypatch, shapes, one)
  assert collapsed[k + 'spread'] == pytest.approx(0.0, abs=1e-6)
  assert collapsed[k + 'fd'] > 5 * floor and collapsed[k + 'score'] < perfect[k + 'score'] - 0.2
  assert collapsed[k + 'nn_caption_match'] == pytest.approx(chance, abs=0.01)  # the red circles' share


def test_t2i_features_runs_on_any_image_data_and_skips_without_it(tmp_path, caplog, monkeypatch):
  """The gating of `evaluators.run`: on images from a user's JSONL the digit evaluator is skipped and
  t2i_features runs; a run without image data skips it; an image set without held-out pairs skips it
  with a warning."""
  from tmdm.config import base as base_config  # pylint: disable=import-outside-toplevel
  from tmdm.data import store  # pylint: disable=import-outside-toplevel
  from tmdm.evaluation import evaluators  # pylint: disable=import-outside-toplevel
  assert 't2i_features' in base_config.get_config().eval.tasks.split(',')
  cfg = base_config.get_config()
  cfg.data.root, cfg.image.name, cfg.data.mix_image, cfg.data.mix_audio = str(tmp_path), 'shapes', 0.5, 0.0
  (tmp_path / 'shapes').mkdir()
  store.write_manifest(str(tmp_path / 'shapes'), modality='image', fields=['text', 'image'], tokenizers={}, splits={},
                       source={'settings': {'sources': 'jsonl:shapes/captions.jsonl'}})
  monkeypatch.setitem(evaluators.EVALUATORS, 't2i_features', lambda ctx: {'t2i_features/fd': 1.0})
  ctx = types.SimpleNamespace(cfg=cfg)
  assert evaluators.run(ctx, ['t2i_digits', 't2i_features']) == {'t2i_features/fd': 1.0}
  cfg.data.mix_image = 0.0
  assert evaluators.run(ctx, ['t2i_features']) == {}
  monkeypatch.undo()
  empty = str(tmp_path / 'empty')
  store.write_manifest(empty, modality='image', fields=['text', 'image'], tokenizers={},
                       splits={'val': [store.write_shard(empty + '/val/00000', [], ['text', 'image'])]}, source={})
  tok = types.SimpleNamespace(name='fsq', sha256='x')
  monkeypatch.setattr(evaluators.em, 'has_encoder_features', lambda t: True)
  ctx = types.SimpleNamespace(cfg=cfg, root=lambda kind: empty, tokenizer=lambda kind: tok, memo={})
  assert evaluators.t2i_features(ctx) == {}
  assert any('skipping t2i_features' in r.message and 'held-out' in r.message for r in caplog.records)


def test_t2i_digits_prompts_in_the_runs_caption_style(monkeypatch):
  """The digit evaluator asks for digits the way the run's training captions named them: the word alone
  under image.digit_captions=word, the eight phrasings under 'varied' and for runs saved before the key
  (a one-word prompt to a model trained on phrasings, or the reverse, measures the wrong thing)."""
  from tmdm.evaluation import evaluators  # pylint: disable=import-outside-toplevel
  asked = []

  class Asked(Exception):
    pass

  def fake_generate(ctx_, task, *, prompts, n, seed, settings):
    del ctx_, n, seed, settings
    assert task == 't2i'
    asked.append(list(prompts))
    raise Asked

  monkeypatch.setattr(evaluators, '_t2i_references', lambda ctx, n: (None, None, None))
  monkeypatch.setattr(evaluators.generate, 'generate', fake_generate)
  for image_cfg in ({'digit_captions': 'word'}, {'digit_captions': 'varied'}, {}):
    ctx = types.SimpleNamespace(cfg=types.SimpleNamespace(eval=types.SimpleNamespace(num=20, seed=0), image=image_cfg))
    with pytest.raises(Asked):
      evaluators.t2i_digits(ctx, settings=lambda ctx_, task: None)
  word, varied, before_key = asked
  assert word == ['zero', 'zero', 'one', 'one', 'two', 'two', 'three', 'three', 'four', 'four', 'five', 'five',
                  'six', 'six', 'seven', 'seven', 'eight', 'eight', 'nine', 'nine']
  assert varied[:4] == ['a handwritten digit zero', 'the number 0 written by hand', 'a handwritten digit one',
                        'the number 1 written by hand']
  assert varied[-1] == 'the number 9 written by hand' and before_key == varied
