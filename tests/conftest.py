"""Forces 8 simulated CPU devices for the whole test session (before jax is imported), and builds
one small real text dataset shared by the data and training tests."""

import os
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Many tests compile the same small programs (in-process and in `tmdm train` subprocesses): a
# persistent compilation cache, fresh per session, pays each compile once.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='tmdm-jax-cache-'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import pytest  # pylint: disable=wrong-import-position


@pytest.fixture(scope='session')
def text_data(tmp_path_factory):
  """Fortunes (Debian `fortunes`): 2000 documents, a 512-piece SentencePiece model. Returns data.root."""
  from tmdm.datasets import text  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('data')
  text.prepare_text(str(root / 'fortunes-smoke'), sources=['fortunes'], vocab_size=512, val_fraction=0.05,
                    max_docs=2000, shard_records=700)
  return str(root)
