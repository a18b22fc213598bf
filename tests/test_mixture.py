"""Pair rows, the text/image/audio mixture and bad-record accounting, on synthetic token datasets."""

import os

import numpy as np
import pytest

from tmdm import vocab as vocab_lib
from tmdm.config import base as base_config
from tmdm.data import mixture, pipeline, shards as shards_lib, store
from tmdm.training import setup as setup_lib, validation

VOCAB = vocab_lib.VocabSpec(37, 11, 13, multiple=8)
TOK = {'text': {'name': 'fake-spm', 'vocab_size': 37, 'sha256': 'abc'}}


def _write(root, kind, n, seed, bad=(), val=10):
  """n records, the last `val` of them the validation split; indices in `bad` get an out-of-range or
  empty field."""
  rng = np.random.default_rng(seed)
  fields = ['text'] if kind == 'text' else ['text', kind]
  sizes = {'text': 37, 'image': 11, 'audio': 13}
  records = []
  for i in range(n):
    rec = {'text': rng.integers(0, 37, rng.integers(3, 9))}
    if kind != 'text':
      rec[kind] = rng.integers(0, sizes[kind], 6 if kind == 'image' else 8)
    if i in bad:
      rec[fields[-1]] = np.array([], np.int32) if i % 2 else np.array([999])
    records.append(rec)
  splits = {split: [store.write_shard(os.path.join(root, split, '00000'), records[lo:hi], fields)]
            for split, (lo, hi) in {'train': (0, n - val), 'val': (n - val, n)}.items()}
  toks = dict(TOK)
  if kind != 'text':
    toks[kind] = {'name': 'fake-fsq', 'codebook_size': sizes[kind], 'tokens_per_item': 6, 'sha256': 'def'}
  store.write_manifest(root, modality=kind, fields=fields, tokenizers=toks, splits=splits, source={})


@pytest.fixture(scope='module')
def cfg(tmp_path_factory):
  root = tmp_path_factory.mktemp('mix')
  c = base_config.get_config()
  c.data.update(root=str(root), seq_len=24, mix_text=0.5, mix_image=0.3, mix_audio=0.2, p_text_first=0.5)
  c.vocab.update(text_size=37, image_size=11, audio_size=13, multiple=8)
  for kind, name in (('text', c.data.text_name), ('image', c.image.name), ('audio', c.audio.name)):
    _write(os.path.join(str(root), name), kind, 300, seed=len(kind))
  return c


def _component_of(row_tokens):
  first = row_tokens[0]
  if first in (VOCAB.id('[T2I]'), VOCAB.id('[I2T]')):
    return 'image'
  if first in (VOCAB.id('[T2S]'), VOCAB.id('[S2T]')):
    return 'audio'
  return 'text'


def test_pair_row_layout():
  make = pipeline.PairToRow(VOCAB, 'image', 24, p_text_first=0.5)
  record = {'text': np.array([1, 2, 3]), 'image': np.array([0, 5, 10, 4, 4, 4])}
  seen = set()
  for seed in range(20):
    row = make(record, np.random.default_rng(seed))
    t2i = row['tokens'][0] == VOCAB.id('[T2I]')
    seen.add(bool(t2i))
    text = [VOCAB.id('<txt>'), *(np.array([1, 2, 3]) + VOCAB.text_start), VOCAB.id('</txt>')]
    image = [VOCAB.id('<img>'), *(np.array([0, 5, 10, 4, 4, 4]) + VOCAB.image_start), VOCAB.id('</img>')]
    body = text + image if t2i else image + text
    np.testing.assert_array_equal(row['tokens'][1:1 + len(body)], body)
    n = 1 + len(body)
    assert (row['tokens'][n:] == VOCAB.pad_id).all() and (row['role'][n:] == vocab_lib.FIXED).all()
    assert (row['segment_ids'][:n] == 1).all() and (row['segment_ids'][n:] == 0).all()
    text_pos = np.flatnonzero(VOCAB.modality_of(row['tokens']) == vocab_lib.TEXT)
    image_pos = np.flatnonzero(VOCAB.modality_of(row['tokens']) == vocab_lib.IMAGE)
    assert (row['role'][text_pos] == (vocab_lib.CONDITION if t2i else vocab_lib.TARGET)).all()
    assert (row['role'][image_pos] == (vocab_lib.TARGET if t2i else vocab_lib.CONDITION)).all()
    assert (row['modality'][image_pos] == vocab_lib.IMAGE).all() and (row['modality'][text_pos] == vocab_lib.TEXT).all()
    layout = np.isin(row['tokens'], [VOCAB.id(t) for t in vocab_lib.SPECIALS])
    assert (row['role'][layout] == vocab_lib.FIXED).all()  # layout tokens and [PAD] never in the loss
  assert seen == {True, False}


def test_mixture_proportions_and_resume(cfg):
  it = iter(pipeline.batched(mixture.train_rows(cfg, VOCAB, seed=0, shard_index=0, shard_count=1), 10, 0))
  counts = {'text': 0, 'image': 0, 'audio': 0}
  for _ in range(30):
    for row in next(it)['tokens']:
      counts[_component_of(row)] += 1
  total = sum(counts.values())
  for name, w in (('text', 0.5), ('image', 0.3), ('audio', 0.2)):
    assert abs(counts[name] / total - w) < 0.02, counts
  state = it.get_state()
  expected = [next(it)['tokens'] for _ in range(3)]
  again = iter(pipeline.batched(mixture.train_rows(cfg, VOCAB, seed=0, shard_index=0, shard_count=1), 10, 0))
  again.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(again)['tokens'], want)


def test_processes_read_disjoint_records(cfg):
  def texts(index):
    ds = mixture.component(cfg, 'image', VOCAB, 'train', seed=0, shard_index=index, shard_count=2, repeat=False)
    return {tuple(r['tokens'][r['modality'] == vocab_lib.TEXT]) for r in ds}
  a, b = texts(0), texts(1)
  assert a and b and not a & b


def test_bad_records_are_skipped_and_counted(tmp_path):
  root = str(tmp_path / 'pairs')
  _write(root, 'image', 300, seed=1, bad={3, 4, 50})
  skips = pipeline.SkipCounter(max_fraction=0.05)
  rows = list(pipeline.pair_dataset(root, 'train', VOCAB, kind='image', seq_len=24, seed=0, p_text_first=0.5,
                                    repeat=False, skips=skips))
  assert len(rows) == 290 - 3
  assert skips.counts == {'empty': 1, 'out_of_range': 2} and skips.seen == 290
  strict = pipeline.SkipCounter(max_fraction=0.001, min_records=10)
  with pytest.raises(store.DataError, match='records were bad'):
    list(pipeline.pair_dataset(root, 'train', VOCAB, kind='image', seq_len=24, seed=0, p_text_first=0.5,
                               repeat=False, skips=strict))


def test_codes_that_do_not_fit_a_row_are_skipped():
  make = pipeline.PairToRow(VOCAB, 'audio', 12, p_text_first=1.0)
  out = make({'text': np.array([1]), 'audio': np.zeros(8, np.int64)}, np.random.default_rng(0))
  assert out[pipeline.SKIP][0] == 'too_long'


def test_check_rejects_mismatched_vocab(cfg):
  mixture.check(cfg)
  bad = cfg.copy_and_resolve_references()
  bad.vocab.image_size = 12
  with pytest.raises(store.DataError, match='vocab.image_size is 12 but the image tokenizer'):
    mixture.check(bad)


def test_validation_reports_joint_and_conditional_elbo_per_component(cfg, tmp_path):
  """eval/<component>/joint counts every non-layout position of the rows; eval/<component>/conditional
  (pairs) counts only the targets: captions of I2T rows as text, codes of T2I rows as image."""
  import jax  # pylint: disable=import-outside-toplevel
  from tmdm.training import state as train_state, step as train_step  # pylint: disable=import-outside-toplevel
  from helpers import tiny_config  # pylint: disable=import-outside-toplevel
  c = tiny_config()
  c.data, c.image, c.audio = cfg.data.copy_and_resolve_references(), cfg.image, cfg.audio
  for name in (c.image.name, c.audio.name):  # The fixture's pairs, beside a text set with more val rows.
    os.symlink(os.path.join(cfg.data.root, name), str(tmp_path / name))
  _write(str(tmp_path / c.data.text_name), 'text', 300, seed=4, val=80)
  c.data.root = str(tmp_path)
  c.train.update(batch_size=8, eval_batches=2)
  s = setup_lib.build(c)
  val = shards_lib.eval_batches(s.cfg, s.vocab, s.sharder, shards_lib.owned(c))
  state_sh = train_state.state_shardings(s.model, s.tx, s.sharder, s.seq_len)
  _, eval_fn = train_step.jit_steps(s.model, s.tx, s.diffusion, s.vocab, s.sharder, state_sh, 1)
  params = train_state.create(s.model, s.tx, s.sharder, s.seq_len, 0).params
  out = validation.evaluate(eval_fn, params, val, seed=1)
  for key in ('eval/text/joint/loss/text', 'eval/image/joint/loss/image', 'eval/image/conditional/loss/text',
              'eval/image/conditional/loss/image', 'eval/audio/conditional/loss/audio', 'eval/loss/text'):
    assert key in out, key
  assert 'eval/text/conditional/loss/text' not in out  # Text rows have no condition.
  for batch in val['image']:
    rows = {k: np.asarray(jax.device_get(v)) for k, v in batch.items()}
    text, image = rows['modality'] == vocab_lib.TEXT, rows['modality'] == vocab_lib.IMAGE
    supervised, target = rows['role'] != vocab_lib.FIXED, rows['role'] == vocab_lib.TARGET
    joint = jax.device_get(eval_fn(params, batch, jax.random.PRNGKey(0), mode='joint'))
    cond = jax.device_get(eval_fn(params, batch, jax.random.PRNGKey(0), mode='conditional'))
    assert joint['count/text'] == (supervised & text).sum() and joint['count/image'] == (supervised & image).sum()
    assert cond['count/text'] == (target & text).sum() and cond['count/image'] == (target & image).sum()
    assert 0 < cond['count/text'] < joint['count/text']
  # Focus positions: the supervised text positions holding the chosen ids, summed alone.
  batch = val['image'][0]
  rows = {k: np.asarray(jax.device_get(v)) for k, v in batch.items()}
  caption_ids = rows['tokens'][(rows['role'] == vocab_lib.TARGET) & (rows['modality'] == vocab_lib.TEXT)]
  focus = tuple(int(i) for i in np.unique(caption_ids)[:2])
  _, focused = train_step.jit_steps(s.model, s.tx, s.diffusion, s.vocab, s.sharder, state_sh, 1, focus_ids=focus)
  cond = jax.device_get(focused(params, batch, jax.random.PRNGKey(0), mode='conditional'))
  want = (np.isin(rows['tokens'], focus) & (rows['role'] == vocab_lib.TARGET) & (rows['modality'] == vocab_lib.TEXT)).sum()
  assert cond['count/focus'] == want > 0
  assert 0 < cond['elbo_sum/focus'] < cond['elbo_sum/text']


def test_shards_do_not_share_a_permutation(tmp_path):
  """Slot k of every data shard must not hold neighbours in storage order (records 4j .. 4j+3 with
  4 shards): each shard shuffles and draws its coins with a seed of its own."""
  root = str(tmp_path / 'pairs')
  rng = np.random.default_rng(0)
  records = [{'text': np.array([i % 37, i // 37]), 'image': rng.integers(0, 11, 6)} for i in range(400)]
  splits = {'train': [store.write_shard(os.path.join(root, 'train', '00000'), records, ['text', 'image'])],
            'val': [store.write_shard(os.path.join(root, 'val', '00000'), records[:10], ['text', 'image'])]}
  store.write_manifest(root, modality='image', fields=['text', 'image'],
                       tokenizers={**TOK, 'image': {'name': 'f', 'codebook_size': 11, 'tokens_per_item': 6,
                                                    'sha256': 'x'}}, splits=splits, source={})
  def first_indices(shard):
    ds = pipeline.pair_dataset(root, 'train', VOCAB, kind='image', seq_len=24, seed=5, p_text_first=1.0,
                               shard_index=shard, shard_count=4)
    it = iter(ds)
    out = []
    for _ in range(16):
      text = next(it)['tokens'][2:4] - VOCAB.text_start  # [T2I] <txt> a b </txt>: a = i % 37, b = i // 37
      out.append(int(text[1]) * 37 + int(text[0]))
    return np.array(out)
  slots = np.stack([first_indices(s) for s in range(4)])  # [shard, slot] record indices
  assert all((slots[s] % 4 == s).all() for s in range(4))  # Shard s reads records s, s + 4, ...
  neighbours = np.mean([len(set(slots[:, k] // 4)) == 1 for k in range(16)])
  assert neighbours < 0.2, slots  # With one permutation for all shards it was 1.0.
