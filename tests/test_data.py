import os

import numpy as np
import pytest

from tmdm import vocab as vocab_lib
from tmdm.data import pipeline, store
from tmdm.datasets import text

VOCAB = vocab_lib.VocabSpec(512, 16, 16, multiple=8)


def _rows(root, **kwargs):
  args = dict(seq_len=64, seed=3)
  args.update(kwargs)
  return pipeline.text_dataset(os.path.join(root, 'fortunes-smoke'), 'train', VOCAB, **args)


def test_manifest_and_tokenizer_round_trip(text_data):
  root = os.path.join(text_data, 'fortunes-smoke')
  manifest = store.read_manifest(root)
  assert manifest['tokenizers']['text']['vocab_size'] == 512
  assert len(manifest['splits']['train']['shards']) == 3  # 700 records per shard
  records = store.ShardedRecords(root, 'train')
  assert len(records) == manifest['splits']['train']['num_records'] > 1800
  tok = text.TextTokenizer(os.path.join(root, 'spm.model'))
  doc = 'The quick brown fox\njumps over the lazy dog.'
  assert tok.decode(tok.encode([doc])[0]) == doc
  assert records[len(records) - 1]['text'].dtype == np.int32  # last record of the last shard


def test_packed_rows_layout(text_data):
  batch = next(iter(pipeline.batched(_rows(text_data), 8, 0)))
  assert set(batch) == set(pipeline.ROW_KEYS) and batch['tokens'].shape == (8, 64)
  for r in range(8):
    tokens, seg, role, pos = batch['tokens'][r], batch['segment_ids'][r], batch['role'][r], batch['positions'][r]
    assert (seg > 0).all()  # Packed training rows carry no padding.
    for s in np.unique(seg):
      idx = np.flatnonzero(seg == s)
      assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))  # A document is contiguous ...
      np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))  # ... with its own positions.
    boundary = np.isin(tokens, [VOCAB.id('<txt>'), VOCAB.id('</txt>')])
    np.testing.assert_array_equal(role == vocab_lib.FIXED, boundary)
    assert (VOCAB.modality_of(tokens[~boundary]) == vocab_lib.TEXT).all()


def test_seeded_order_and_process_shards(text_data):
  first = lambda ds: next(iter(pipeline.batched(ds, 4, 0)))['tokens']
  np.testing.assert_array_equal(first(_rows(text_data)), first(_rows(text_data)))
  assert not np.array_equal(first(_rows(text_data)), first(_rows(text_data, seed=4)))
  # Two processes read disjoint records.
  src = store.ShardedRecords(os.path.join(text_data, 'fortunes-smoke'), 'train')
  import grain  # pylint: disable=import-outside-toplevel
  parts = [set(map(lambda r: r['text'].tobytes(), grain.MapDataset.source(src)[i::2])) for i in range(2)]
  assert not parts[0] & parts[1] and len(parts[0]) + len(parts[1]) == len(src)


@pytest.mark.parametrize('workers', [0, 2])
def test_iterator_state_resumes_exactly(text_data, workers):
  it = iter(pipeline.batched(_rows(text_data, num_workers=workers), 4, prefetch=2))
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it)['tokens'] for _ in range(3)]
  fresh = iter(pipeline.batched(_rows(text_data, num_workers=workers), 4, prefetch=2))
  fresh.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(fresh)['tokens'], want)


def test_worker_count_does_not_change_order(text_data):
  take = lambda w: [b['tokens'] for _, b in zip(range(3), iter(pipeline.batched(_rows(text_data, num_workers=w), 4, 0)))]
  for a, b in zip(take(0), take(2)):
    np.testing.assert_array_equal(a, b)


def test_missing_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(store.DataError, match='manifest.json is missing'):
    store.read_manifest(str(tmp_path))


def test_word_ids_are_the_pieces_of_the_words(text_data):
  tok = text.TextTokenizer(os.path.join(text_data, 'fortunes-smoke', 'spm.model'))
  boundary = tok.sp.piece_to_id('\u2581')
  ids = tok.word_ids(['seven', 'love'])
  spelled = {int(i) for w in ('seven', 'love') for i in tok.sp.encode(w)}
  assert set(ids) == spelled - {boundary, tok.sp.unk_id()} and ids
  # In a sentence, the pieces the word adds are in the set, the other words' pieces are not.
  sentence, prefix = set(tok.sp.encode('the number seven')), set(tok.sp.encode('the number'))
  assert sentence - prefix - {boundary} <= set(ids) and not prefix & set(ids)


def test_prepare_is_reproducible_across_runs_and_folders(tmp_path):
  """The same sources give the same bytes in another folder (SentencePiece trained on one thread,
  its model written without its path), and a ShardedRecords opens only the shards it reads."""
  roots = [str(tmp_path / name / 'ds') for name in ('a', 'b')]
  for root in roots:
    text.prepare_text(root, sources=['fortunes'], vocab_size=256, val_fraction=0.05, max_docs=400, shard_records=100)
  files = {}
  for root in roots:
    files[root] = {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), 'rb').read()
                   for d, _, names in os.walk(root) for f in names}
  assert sorted(files[roots[0]]) == sorted(files[roots[1]]) and 'spm.model' in files[roots[0]]
  assert all(files[roots[0]][k] == files[roots[1]][k] for k in files[roots[0]])
  records = store.ShardedRecords(roots[0], 'train')
  assert len(records.shards) >= 3
  records[len(records) - 1]
  assert records.opened_shards == [len(records.shards) - 1]
