"""The reference figures printed beside the speech tasks, on a real espeak-ng dataset and tokenizer
(pairs_fixtures.audio_data): T2S's `score_data` (the held-out clips themselves) and
`score_other_words` (each clip against the next item's transcript) must be what a generator that
returns those clips scores, and the measure must hear the words: the data's own clips well above
clips that say other words. S2T's chance figure against a hand count."""

import os
import types

import numpy as np
import pytest

from pairs_fixtures import audio_cfg, audio_data, text_tokenizer  # pylint: disable=unused-import
from tmdm.config import base as base_config
from tmdm.data import store
from tmdm.evaluation import evaluators
from tmdm.generation import generate
from tmdm.tokenizers import registry


def _ctx(audio_data, text_data):
  root, manifest = audio_data
  cfg = base_config.get_config()
  cfg.audio = audio_cfg()
  cfg.eval.num = 100
  records = store.ShardedRecords(root, 'val')
  heldout = [dict(records[i], label=-1) for i in range(len(records))]
  tokenizers = {'text': text_tokenizer(text_data),
                'audio': registry.load(os.path.join(root, manifest['tokenizers']['audio']['file']))}
  return types.SimpleNamespace(cfg=cfg, memo={}, items={}, heldout=lambda kind, n: heldout[:n],
                               tokenizer=tokenizers.__getitem__), heldout


def _t2s(monkeypatch, ctx, clips_of):
  def fake_generate(ctx_, task, *, prompts, n, seed, settings):
    del ctx_, n, seed, settings
    assert task == 't2s'
    return [generate.Sample(task, p, w) for p, w in zip(prompts, clips_of(prompts))], {'seconds': 0.0,
                                                                                     'forward_passes': 1.0}
  monkeypatch.setattr(evaluators.generate, 'generate', fake_generate)
  return evaluators.t2s(ctx, settings=lambda ctx_, task: None)


def test_t2s_references_are_the_datas_own_clips_and_other_words(monkeypatch, audio_data, text_data):
  ctx, heldout = _ctx(audio_data, text_data)
  assert len(heldout) >= 4
  waves = ctx.tokenizer('audio').decode(np.stack([r['audio'] for r in heldout]))
  own = _t2s(monkeypatch, ctx, lambda prompts: waves)
  other = _t2s(monkeypatch, ctx, lambda prompts: np.roll(waves, 1, axis=0))
  assert own['t2s/score'] == pytest.approx(own['t2s/score_data'], abs=1e-9)
  assert other['t2s/score'] == pytest.approx(own['t2s/score_other_words'], abs=1e-9)
  # The references describe the data, not the model: the same whatever the generator returns.
  assert other['t2s/score_data'] == own['t2s/score_data'] and other['t2s/score_other_words'] == own['t2s/score_other_words']
  # The measure hears the words: the data's clips well above the same clips saying other words, and
  # both above decoded random codes (0).
  assert own['t2s/score_data'] > own['t2s/score_other_words'] + 0.05  # 0.97 against 0.84 here
  assert own['t2s/score_other_words'] > 0


def test_s2t_chance_is_each_true_transcript_read_as_the_next(monkeypatch):
  refs = ['one two three', 'one two four', 'one five six']
  outs = ['one two three', 'one six four', 'one five six']
  samples = [generate.Sample('s2t', 'x', o, reference=r) for o, r in zip(outs, refs)]
  monkeypatch.setattr(evaluators, '_caption_task', lambda ctx, task, settings, records: (samples, {}, {}))
  ctx = types.SimpleNamespace(cfg=types.SimpleNamespace(eval=types.SimpleNamespace(num=3)), items={},
                              heldout=lambda kind, n: [])
  out = evaluators.s2t(ctx)
  assert out['s2t/word_acc'] == pytest.approx(8 / 9)  # one substitution in nine reference words
  # 'one two three' read as 'one five six' (2 edits), 'one two four' as 'one two three' (1),
  # 'one five six' as 'one two four' (2): 5 edits in 9 words.
  assert out['s2t/word_acc_other_words'] == pytest.approx(4 / 9)
