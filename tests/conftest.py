"""Forces 8 simulated CPU devices for the whole test session (before jax is imported), and builds
one small real text dataset shared by the data and training tests."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # pylint: disable=wrong-import-position


@pytest.fixture(scope='session')
def text_data(tmp_path_factory):
  """Fortunes (Debian `fortunes`): 2000 documents, a 512-piece SentencePiece model. Returns data.root."""
  from tmdm.modalities import text  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('data')
  text.prepare_text(str(root / 'fortunes-smoke'), sources=['fortunes'], vocab_size=512, val_fraction=0.05,
                    max_docs=2000, shard_records=700)
  return str(root)
