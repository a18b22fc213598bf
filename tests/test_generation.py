"""Task canvases in the training layouts, the evaluation measures, the gallery, one text generation."""

import json
import os

import numpy as np
import pytest

from tmdm import errors, vocab as vocab_lib
from tmdm.config import loader as config_loader
from tmdm.data import pipeline
from tmdm.evaluation import measures as em
from tmdm.generation import gallery, generate, tasks
from tmdm.training import setup as setup_lib, state as train_state
from helpers import REPO

VOCAB = vocab_lib.VocabSpec(37, 11, 13, multiple=8)


class _WordTokenizer:
  """Stand-in for SentencePiece: one id per word (its length)."""

  def encode(self, texts):
    return [np.asarray([len(w) for w in t.split()], np.int32) for t in texts]


def test_t2i_canvas_is_the_training_row_with_the_target_masked():
  caption = np.array([3, 5, 7])
  canvas = tasks.pair_canvas(VOCAB, tasks.TASKS['t2i'], 29, texts=[caption], tokens_per_item=6)
  row = pipeline.PairToRow(VOCAB, 'image', 29, p_text_first=1.0)({'text': caption, 'image': np.zeros(6)},
                                                                  np.random.default_rng(0))
  target, cond = row['role'] == vocab_lib.TARGET, row['role'] == vocab_lib.CONDITION
  np.testing.assert_array_equal(canvas['tokens'][0], np.where(target, VOCAB.mask_id, row['tokens']))
  np.testing.assert_array_equal(canvas['cond'][0], cond)
  assert canvas['tokens'][0, 0] == VOCAB.id('[T2I]') and target.sum() == 6 and cond.sum() == 3
  for k in ('segment_ids', 'positions', 'modality'):
    np.testing.assert_array_equal(canvas[k][0], row[k])
  assert (canvas['modality'][0][target] == vocab_lib.IMAGE).all() and canvas['tokens'][0, -1] == VOCAB.pad_id


def test_s2t_canvas_has_a_caption_slot_of_the_given_length_then_padding():
  codes = np.arange(7)[None] % VOCAB.audio_size
  canvas = tasks.pair_canvas(VOCAB, tasks.TASKS['s2t'], 23, codes=codes, caption_lens=[4])
  toks = canvas['tokens'][0]
  audio_lo = VOCAB.range(vocab_lib.AUDIO)[0]
  expected = ([VOCAB.id('[S2T]'), VOCAB.id('<aud>')] + list(codes[0] + audio_lo) +
              [VOCAB.id('</aud>'), VOCAB.id('<txt>')]
              + [VOCAB.mask_id] * 4 + [VOCAB.id('</txt>')])
  np.testing.assert_array_equal(toks[:len(expected)], expected)
  assert (toks[len(expected):] == VOCAB.pad_id).all() and (canvas['segment_ids'][0, len(expected):] == 0).all()
  np.testing.assert_array_equal(np.nonzero(canvas['cond'][0])[0], np.arange(2, 9))  # the audio codes


def test_text_canvas_prompted_and_infilling():
  tok = _WordTokenizer()
  c = tasks.text_canvas(VOCAB, tok, ['ab cde', 'x [MASK] yy [MASK]'], length=11, infill_len=2)
  lo = VOCAB.text_start
  np.testing.assert_array_equal(c['tokens'][0], [VOCAB.id('<txt>'), lo + 2, lo + 3] + [VOCAB.mask_id] * 7 +
                                [VOCAB.id('</txt>')])
  np.testing.assert_array_equal(c['tokens'][1, :9], [VOCAB.id('<txt>'), lo + 1, VOCAB.mask_id, VOCAB.mask_id, lo + 2,
                                                     VOCAB.mask_id, VOCAB.mask_id, VOCAB.id('</txt>'), VOCAB.pad_id])
  assert (c['segment_ids'][1, 8:] == 0).all() and not c['cond'].any()
  with pytest.raises(ValueError):
    tasks.text_canvas(VOCAB, tok, ['a b c d e f g h i j'], length=11, infill_len=2)


def test_dtw_frechet_wer_and_digit_words():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(30, 5))
  assert em.dtw_distance(a, a) == 0.0
  stretched = np.repeat(a, 2, axis=0)  # the same speech, twice as slow: DTW aligns it perfectly
  assert em.dtw_distance(a, stretched) == 0.0
  assert em.dtw_distance(a, a + 1.0) == pytest.approx(1.0)
  x = rng.normal(size=(400, 3))
  assert abs(em.frechet(x, x)) < 1e-6
  assert em.frechet(x, x + 2.0) == pytest.approx(12.0, rel=1e-6)
  assert em.word_errors('the cat sat', 'the cat sat down') == (1, 4)
  assert em.word_errors('a b', 'c d') == (2, 2)
  assert em.digit_in('a handwritten digit seven') == 7 and em.digit_in('the number 3 by hand') == 3
  assert em.digit_in('an icon of folder') == -1
  assert em.token_accuracy([1, 2, 3], [1, 0, 3, 4]) == 0.5
  quiet = np.full((50, 4), -10.0)
  quiet[10:20] = 0.0
  assert len(em.trim_silence(quiet)) == 10


def test_gallery_writes_images_audio_and_text(tmp_path):
  samples = [generate.Sample('t2i', 'a digit <one>', np.full((8, 8, 3), 0.5)),
             generate.Sample('t2s', 'hello', np.zeros(160, np.float32)),
             generate.Sample('i2t', 'held-out image 0', 'a digit two', condition=np.ones((8, 8, 3)), reference='two')]
  page = gallery.write(str(tmp_path), samples, title='test', audio_rate=16000, settings={'steps': 4})
  html = open(page, encoding='utf-8').read()
  assert '<img src="000.png"' in html and '<audio controls src="001.wav"' in html and 'a digit &lt;one&gt;' in html
  assert {'000.png', '001.wav', '002.txt', '002_input.png', 'samples.txt'} <= set(os.listdir(tmp_path))


def test_text_generation_end_to_end_on_the_8_device_mesh(text_data, tmp_path):
  cfg = config_loader.load(os.path.join(REPO, 'experiments', 'smoke.py'), num_devices=8)
  cfg.data.root = text_data
  cfg.model.update(d_model=16, n_layers=1, n_heads=2, d_head=8, d_ff=24, base_width=16, base_depth=1)
  cfg.sample.update(sampler='confidence', steps=4, text_len=17, infill_len=3, batch=8)
  s = setup_lib.build(cfg)
  ctx = generate.Context.for_training(s, train_state.create(s.model, s.tx, s.sharder, s.seq_len, 0).params, 0)
  samples, info = generate.generate(ctx, 'text', prompts=['The [MASK] is', ''], n=3, seed=0)
  assert len(samples) == 6 and all(isinstance(x.output, str) and x.output for x in samples)
  assert samples[0].output.startswith('The') and 1 <= info['forward_passes'] <= 4


def test_bench_sample_compares_settings_on_the_same_items(text_data):
  """`tmdm bench-sample --workdir` through the infilling evaluator on held-out text: one row per
  setting, cached steps counted as partial passes, intervals paired against the first setting."""
  from tmdm.tools import sample_bench  # pylint: disable=import-outside-toplevel
  cfg = config_loader.load(os.path.join(REPO, 'experiments', 'smoke.py'), num_devices=8)
  cfg.data.root = text_data
  cfg.model.update(d_model=16, n_layers=1, n_heads=2, d_head=8, d_ff=24, base_width=16, base_depth=1)
  cfg.sample.update(sampler='confidence', steps=8, text_len=24, block_len=8, batch=8)
  cfg.eval.num = 12
  s = setup_lib.build(cfg)
  ctx = generate.Context.for_training(s, train_state.create(s.model, s.tx, s.sharder, s.seq_len, 0).params, 0)
  rows = sample_bench.compare(ctx, 'text', ['baseline', 'cache=1', 'sampler=entropy,entropy_budget=0.5,cache=1'])
  assert [r['setting'] for r in rows] == ['baseline', 'cache=1', 'sampler=entropy,entropy_budget=0.5,cache=1']
  base, cached, _ = rows
  assert base['delta_interval'] == (0.0, 0.0) and base['speedup'] == 1.0 and base['within_noise']
  # 3 blocks of 8 with 8 steps in all: 3 steps a block, the first a full pass, the others 8 of 24 positions.
  assert base['forward_passes'] <= 9 and cached['forward_passes'] < base['forward_passes']
  assert all(0 <= r['text/infill_token_acc'] <= 1 and r['wall_s'] > 0 and r['tokens_per_s'] > 0 for r in rows)
  lo, hi = cached['interval']
  assert lo <= cached['text/infill_token_acc'] <= hi
  # The unigram reference, counted here with a Counter over every training document.
  import collections  # pylint: disable=import-outside-toplevel
  from tmdm.data import store  # pylint: disable=import-outside-toplevel
  from tmdm.evaluation import evaluators as evaluate  # pylint: disable=import-outside-toplevel
  train = store.ShardedRecords(ctx.root('text'), 'train')
  assert len(train) < evaluate.UNIGRAM_DOCS
  counts = collections.Counter(int(t) for i in range(len(train)) for t in train[i]['text'])
  targets = [int(t) for ids, m in evaluate.infill_rows(ctx) for t in ids[m]]
  expected = sum(counts[t] for t in targets) / len(targets) / sum(counts.values())
  assert base['text/infill_unigram_acc'] == pytest.approx(expected, rel=1e-9)
  assert base['text/infill_over_unigram'] == pytest.approx(base['text/infill_token_acc'] / expected)
  most = max(counts, key=lambda t: (counts[t], -t))
  assert base['text/infill_majority_acc'] == pytest.approx(sum(t == most for t in targets) / len(targets))
  with pytest.raises(errors.ConfigError, match='not KEY=VALUE'):
    sample_bench.parse_setting('cache', cfg.sample)
  with pytest.raises(errors.ConfigError, match='steps must be of type int'):
    sample_bench.parse_setting('steps=many', cfg.sample)


def test_sweep_parses_rules_and_records_the_chosen_defaults(tmp_path):
  from tmdm.config import base as base_config  # pylint: disable=import-outside-toplevel
  from tmdm.tools import sample_sweep
  section = base_config.get_config().sample.t2i
  assert sample_sweep.parse_rule('confidence:linear', section) == ('confidence', {'schedule': 'linear'})
  assert sample_sweep.parse_rule('threshold:0.7', section) == ('threshold', {'threshold': 0.7})
  with pytest.raises(errors.ConfigError):
    sample_sweep.parse_rule('beam', section)
  chosen = {'sampler': 'confidence', 'schedule': 'linear', 'threshold': 0.9, 'steps': 16, 'temperature': 0.7,
            'guidance': 2.0, 'metric': 0.5}
  path = str(tmp_path / 'd.json')
  line = sample_sweep.record('t2i', chosen, 't2i/digit_acc', 'tmdm sample-sweep ...', path=path)
  with open(path, encoding='utf-8') as f:
    data = json.load(f)
  assert data['tasks']['t2i']['chosen']['steps'] == 16 and data['tasks']['t2i']['command'].startswith('tmdm')
  c = base_config.get_config()  # The printed line, pasted into an experiment file, sets exactly those keys.
  exec(line, {'c': c})  # pylint: disable=exec-used
  assert (c.sample.t2i.schedule, c.sample.t2i.steps, c.sample.t2i.guidance) == ('linear', 16, 2.0)
  assert base_config.get_config().sample.t2i.steps == 32  # Recording changed no default.


def test_base_config_reads_no_file(monkeypatch):
  """get_config() is pure: with every file open refused it still builds, twice the same."""
  import builtins  # pylint: disable=import-outside-toplevel
  from tmdm.config import base as base_config  # pylint: disable=import-outside-toplevel
  first = base_config.get_config().to_dict()

  def refuse(*args, **kwargs):
    raise AssertionError(f'get_config opened a file: {args[:1]}')
  monkeypatch.setattr(builtins, 'open', refuse)
  assert base_config.get_config().to_dict() == first


def test_a_runs_saved_sample_section_is_used(tmp_path):
  """`tmdm sample` / `tmdm eval` take the run's own sample.* settings; command-line overrides win."""
  from tmdm.config import base as base_config  # pylint: disable=import-outside-toplevel
  cfg = base_config.get_config()
  cfg.sample.t2i.update(steps=7, guidance=2.5)
  cfg.sample.num = 3
  (tmp_path / 'config.json').write_text(json.dumps(cfg.to_dict()))
  loaded = generate.load_workdir_config(str(tmp_path))
  assert (loaded.sample.t2i.steps, loaded.sample.t2i.guidance, loaded.sample.num) == (7, 2.5, 3)
  loaded = generate.load_workdir_config(str(tmp_path), ['--config.sample.t2i.steps=9'])
  assert (loaded.sample.t2i.steps, loaded.sample.t2i.guidance) == (9, 2.5)


def _ran(ctx, passes, seconds=(1.0, 1.0), batch=10, correct=None):
  """What Context.run and an evaluator leave on the context after sampling."""
  ctx.last_run = {'forward_passes': passes, 'seconds': sum(seconds), 'batch_seconds': list(seconds),
                  'batch_rows': [batch] * len(seconds), 'batch_size': batch, 'generated_tokens': 64 * batch}
  if correct is not None:
    ctx.items['t2i'] = (np.asarray(correct, float), np.ones(len(correct)))


def test_sweep_fastest_within_the_noise_of_the_best(monkeypatch):
  """Of three settings on the same 200 items (accuracy 0.60 in 1.0 s, 0.58 in 0.4 s, 0.30 in 0.1 s per
  sample; the second loses 7 of the first's items and wins 3; a fourth, 0.575 in 0.2 s, only loses 5), --fastest picks the 0.4 s one: its paired bootstrap interval against the best reaches 0,
  the 0.1 s one's does not."""
  import types  # pylint: disable=import-outside-toplevel
  from tmdm.config import base as base_config  # pylint: disable=import-outside-toplevel
  from tmdm.evaluation import evaluators as evaluate
  from tmdm.tools import sample_sweep
  rng = np.random.default_rng(0)
  best = rng.random(200) < 0.6
  close = best.copy()
  close[np.flatnonzero(best)[:7]] = False  # 7 items lost, 3 won: 0.6 -> 0.58
  close[np.flatnonzero(~best)[:3]] = True
  subset = best.copy()
  subset[np.flatnonzero(best)[:5]] = False  # the same items, 5 of them lost and none won: 0.6 -> 0.575
  table = {8: (best, 10.0), 4: (close, 4.0), 2: (rng.random(200) < 0.3, 1.0), 3: (subset, 2.0)}

  def fake_t2i(ctx, settings):
    _, knobs = settings(ctx, 't2i')
    correct, seconds = table[int(knobs.steps)]
    _ran(ctx, passes=int(knobs.steps), seconds=(seconds, seconds), correct=correct)
    return {'t2i/digit_acc': float(correct.mean()), 't2i/fd': 50.0, 't2i/diversity': 1.0}

  monkeypatch.setitem(evaluate.EVALUATORS, 't2i_digits', fake_t2i)
  ctx = types.SimpleNamespace(cfg=base_config.get_config(), items={}, last_run={})
  rows, chosen, _, _ = sample_sweep.run_sweep(ctx, 't2i', rules=['confidence:cosine'], steps=[8, 4, 2, 3],
                                              temperatures=[1.0], guidance=[1.0], fastest=True)
  # Paired on the same items: a setting that only ever loses is out, though its mean is as close as the
  # second's (an unpaired interval of the difference would keep it).
  assert [r['within_noise'] for r in rows] == [True, True, False, False]
  assert chosen['steps'] == 4 and chosen['wall_s'] == pytest.approx(0.4)
  _, slow, _, _ = sample_sweep.run_sweep(ctx, 't2i', rules=['confidence:cosine'], steps=[8, 4, 2],
                                         temperatures=[1.0], guidance=[1.0])
  assert slow['steps'] == 8  # without --fastest: the best score


def test_sweep_breaks_ties_by_the_secondary_metric_then_cost(monkeypatch):
  import types  # pylint: disable=import-outside-toplevel
  from tmdm.config import base as base_config  # pylint: disable=import-outside-toplevel
  from tmdm.evaluation import evaluators as evaluate
  from tmdm.tools import sample_sweep

  def fake_t2i(ctx, settings):  # accuracy ties at w > 0; the ancestral rule has the better FD
    spec_, knobs = settings(ctx, 't2i')
    acc = 0.5 if knobs.guidance > 0 else 0.2
    fd = 40.0 if spec_.sampler == 'ancestral' else 90.0
    _ran(ctx, passes=10 if fd < 50 else 5)
    return {'t2i/digit_acc': acc, 't2i/fd': fd - knobs.guidance,
            't2i/diversity': 1.3}  # above 1 counts as 1: the score is the accuracy

  monkeypatch.setitem(evaluate.EVALUATORS, 't2i_digits', fake_t2i)
  ctx = types.SimpleNamespace(cfg=base_config.get_config(), items={}, last_run={})
  rows, chosen, metric, higher = sample_sweep.run_sweep(ctx, 't2i', rules=['confidence:cosine', 'ancestral'],
                                                        steps=[8], temperatures=[1.0], guidance=[0.0, 2.0, 4.0])
  assert len(rows) == 6 and metric == 't2i/digit_acc' and higher
  assert (chosen['sampler'], chosen['guidance'], chosen['metric']) == ('ancestral', 4.0, 0.5)


def test_sweep_weighs_diversity_with_accuracy(monkeypatch):
  """A setting that draws one image per digit (high accuracy, diversity 0.2) loses to a less accurate
  but varied one: score = accuracy x min(1, diversity)."""
  import types  # pylint: disable=import-outside-toplevel
  from tmdm.config import base as base_config  # pylint: disable=import-outside-toplevel
  from tmdm.evaluation import evaluators as evaluate
  from tmdm.tools import sample_sweep
  table = {(0.5, 4.0): (0.70, 0.20), (0.5, 0.0): (0.30, 0.95), (1.0, 4.0): (0.55, 0.80), (1.0, 0.0): (0.25, 1.10)}

  def fake_t2i(ctx, settings):
    _, knobs = settings(ctx, 't2i')
    acc, div = table[(knobs.temperature, knobs.guidance)]
    _ran(ctx, passes=8)
    return {'t2i/digit_acc': acc, 't2i/fd': 50.0, 't2i/diversity': div}

  monkeypatch.setitem(evaluate.EVALUATORS, 't2i_digits', fake_t2i)
  ctx = types.SimpleNamespace(cfg=base_config.get_config(), items={}, last_run={})
  rows, chosen, _, _ = sample_sweep.run_sweep(ctx, 't2i', rules=['confidence:cosine'], steps=[8],
                                              temperatures=[0.5, 1.0], guidance=[0.0, 4.0])
  assert (chosen['temperature'], chosen['guidance']) == (1.0, 4.0)  # 0.55 x 0.8 = 0.44 beats 0.70 x 0.2 = 0.14
  assert sorted(round(r['score'], 6) for r in rows) == [0.14, 0.25, 0.285, 0.44]
  with pytest.raises(errors.ConfigError, match='2 or more samples per class'):  # e.g. eval.num=10
    sample_sweep.score('t2i', {'metric': 0.5, 't2i/diversity': float('nan')}, True)


def test_class_spread():
  from tmdm.evaluation import measures as em  # pylint: disable=import-outside-toplevel
  x = np.array([[0, 0], [3, 4], [0, 0], [1, 0], [0, 1], [7, 7]], float)
  labels = [0, 0, 1, 1, 1, 2]  # class 2 has one item: no pairs, left out
  assert em.class_spread(x, labels) == pytest.approx((5.0 + (2 + np.sqrt(2)) / 3) / 2)
  assert em.class_spread(np.ones((4, 3)), [0, 0, 1, 1]) == 0.0
