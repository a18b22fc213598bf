"""Reproducible runs (issue 24): two fresh `tmdm prepare` of one config give the same bytes, and two
trainings on them the same losses bit for bit.

The two preparations run in processes configured differently on purpose: one as the test session
(8 simulated CPU devices), one on a single core with one device. XLA's CPU convolutions split their
sums by its thread pool's size, max(usable cores or NPROC, devices), so before `tmdm prepare` pinned
its backend (cli._pin_prepare_backend) these two trained image and audio tokenizers that differed in
their last bits, and the demo's tokens and losses differed from the first step (BUILD_NOTES, "Reproducible runs from a fresh prepare").
The data is a tiny version of the demo's: text, digits with captions, sentences spoken by espeak-ng.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import REPO
from tmdm.config import loader as config_loader

SMOKE = os.path.join(REPO, 'experiments', 'smoke.py')
TINY = {  # The demo's three datasets, a few seconds each: 600 documents, 120 digits, 24 spoken sentences.
    'data.text_max_docs': 600, 'vocab.text_size': 256, 'data.seq_len': 128,
    'data.mix_text': 0.3, 'data.mix_image': 0.4, 'data.mix_audio': 0.3,
    'image.name': 'digits', 'image.sources': 'digits', 'image.max_items': 120, 'image.train_steps': 6,
    'image.batch_size': 16, 'image.width': 16, 'image.encode_batch': 64,
    'audio.name': 'speech', 'audio.sources': 'espeak:fortunes', 'audio.max_items': 24, 'audio.train_steps': 6,
    'audio.width': 16, 'audio.encode_batch': 32, 'audio.listen': 1, 'audio.griffin_lim_iters': 2,
}
ORBAX_PARAMS = os.path.join('tokenizer', 'params')  # Orbax's own layout (below): not compared byte for byte.


def _overrides(kv):
  return [f'--config.{k}={v}' for k, v in kv.items()]


def _prepare(root, one_core: bool):
  env = dict(os.environ)  # The session's: 8 simulated devices (conftest), the persistent compile cache.
  cmd = [sys.executable, '-m', 'tmdm.cli', 'prepare', f'--config={SMOKE}', f'--config.data.root={root}',
         *_overrides(TINY)]
  if one_core:
    env['XLA_FLAGS'] = ' '.join(f for f in env.get('XLA_FLAGS', '').split()
                                if not f.startswith('--xla_force_host_platform_device_count'))
    # Pinned to one core by a small launcher that then becomes the command (no preexec_fn: forking
    # this multithreaded process and running Python in the child could deadlock).
    first = min(os.sched_getaffinity(0))
    cmd = [sys.executable, '-c', f'import os, sys; os.sched_setaffinity(0, {{{first}}}); os.execv(sys.argv[1], sys.argv[1:])',
           *cmd]
  out = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       check=False, timeout=300)
  assert out.returncode == 0, out.stdout[-3000:]


def _files(root) -> dict:
  """{relative path: sha256} of every file, less the Orbax folders of the learned tokenizers: Orbax names
  its files at random and stamps the time and the absolute path; the weights' own hash is in
  tokenizer.json (base.params_sha256), which is compared."""
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      rel = os.path.relpath(os.path.join(folder, name), root)
      if ORBAX_PARAMS + os.sep not in rel:
        with open(os.path.join(folder, name), 'rb') as f:
          out[rel] = hashlib.sha256(f.read()).hexdigest()
  return out


def _losses(workdir) -> list:
  """Per logged step, every loss, perplexity and the gradient norm (timings and goodput left out)."""
  rows = []
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      r = json.loads(line)
      if 'loss' in r:
        rows.append({k: v for k, v in r.items() if k == 'step' or k.startswith(('loss', 'ppl/', 'grad_norm'))})
  return rows


@pytest.mark.slow
@pytest.mark.skipif(shutil.which('espeak-ng') is None, reason='espeak-ng is not installed (launch/setup.sh)')
def test_two_fresh_prepares_and_trainings_are_bitwise_equal(tmp_path):
  from tmdm.training import loop  # pylint: disable=import-outside-toplevel
  roots = [str(tmp_path / 'data8'), str(tmp_path / 'data1')]
  _prepare(roots[0], one_core=False)  # One after the other: the second reuses the first's compiles.
  _prepare(roots[1], one_core=True)
  files = [_files(r) for r in roots]
  assert {'speech/tokenizer/tokenizer.json', 'digits/tokenizer/tokenizer.json', 'digits/manifest.json',
          'fortunes-smoke/spm.model'} <= set(files[0])
  differ = sorted(k for k in set(files[0]) | set(files[1]) if files[0].get(k) != files[1].get(k))
  assert not differ, f'{len(differ)} files differ, e.g. {differ[:6]}'

  losses = []
  for i, root in enumerate(roots):
    cfg = config_loader.load(SMOKE, _overrides({**TINY, 'train.num_steps': 3, 'train.log_every_steps': 1,
                                                'train.eval_batches': 0, 'train.progress': False}), num_devices=8)
    cfg.data.root = root
    loop.run(cfg, str(tmp_path / f'run{i}'))
    losses.append(_losses(str(tmp_path / f'run{i}')))
  assert [r['step'] for r in losses[0]] == [1, 2, 3] and {'loss/image', 'loss/audio'} <= set(losses[0][0])
  assert losses[0] == losses[1]  # Floats from JSON: equal means equal bits.
