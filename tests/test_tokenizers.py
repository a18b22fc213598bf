"""FSQ, the mel / Griffin-Lim helpers, and the learned image and audio tokenizers (tiny, quickly trained
ones from the session fixtures in pairs_fixtures.py: trained once, shared with test_pairs_data.py)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pairs_fixtures import audio_data, image_data  # pylint: disable=unused-import
from tmdm.tokenizers import audio as audio_tok, base, fsq, image as image_tok, mel, registry

# Quality floors of the tiny tokenizers of pairs_fixtures.py (150 steps, seconds on 2 CPU cores; they
# measured 24-27 dB and 0.65-0.8 log units). Each test also beats a trivial baseline by a wide margin:
# the mean held-out image (about 12 dB) and silence (3.5-4 log units from a spoken clip).
IMAGE_PSNR_FLOOR_DB = 18.0
AUDIO_LOGMEL_CEILING = 1.0


@pytest.mark.parametrize('levels', [(8, 5, 5, 5), (3, 7), (2, 2, 2)])
def test_fsq_round_trip_exact(levels):
  q = fsq.FSQ(levels)
  assert q.codebook_size == int(np.prod(levels))

  @jax.jit  # One compile instead of one per small op.
  def run(z):
    codes = q.indices_to_codes(jnp.arange(q.codebook_size))
    zhat, index = q(z)
    return codes, q.codes_to_indices(codes), zhat, index, q.indices_to_codes(index)

  z = np.random.default_rng(0).normal(size=(257, len(levels))).astype(np.float32) * 3
  codes, back, zhat, index, zhat_again = map(np.asarray, run(z))
  assert np.abs(codes).max() <= 1.0
  np.testing.assert_array_equal(back, np.arange(q.codebook_size))
  assert len({tuple(c) for c in codes.tolist()}) == q.codebook_size  # All codes distinct.
  # Quantizing any input lands on a grid point whose index maps back to the same point.
  np.testing.assert_array_equal(zhat_again, zhat)
  assert index.dtype == np.int32 and 0 <= index.min() and index.max() < q.codebook_size


def test_fsq_straight_through_gradient():
  q = fsq.FSQ((8, 5, 5, 5))
  z = jax.random.normal(jax.random.key(1), (13, 4))
  g = jax.jit(jax.grad(lambda z: jnp.sum(q.quantize(z) * jnp.arange(1.0, 5.0))))(z)
  # Rounding passes the gradient through: what is left is d(tanh bound)/dz, positive everywhere.
  assert np.all(np.asarray(g) > 0)


def test_stft_inverts_and_griffin_lim_converges():
  rate, n_fft, hop = 16_000, 512, 160
  t = np.arange(rate) / rate
  x = (0.5 * np.sin(2 * np.pi * 440 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)[None]
  spec = mel.stft(jnp.asarray(x), n_fft, hop)
  assert spec.shape == (1, rate // hop, n_fft // 2 + 1)
  back = np.asarray(mel.istft(spec, n_fft, hop, rate))
  np.testing.assert_allclose(back[0, :-n_fft], x[0, :-n_fft], atol=1e-5)
  mag = jnp.abs(spec)
  rebuilt = mel.griffin_lim(mag, n_fft=n_fft, hop=hop, length=rate, iters=32)
  err = float(jnp.linalg.norm(jnp.abs(mel.stft(rebuilt, n_fft, hop)) - mag) / jnp.linalg.norm(mag))
  assert err < 0.1, err  # Spectral convergence of the phase reconstruction.
  fbank = mel.mel_filterbank(rate, n_fft, 64)
  assert fbank.shape == (64, n_fft // 2 + 1) and (fbank.sum(axis=1) > 0).all()  # No empty band.


def test_image_tokenizer_quality_and_round_trip(image_data, tmp_path):
  root, _ = image_data
  tok = registry.load(os.path.join(root, 'tokenizer'))
  assert isinstance(tok, image_tok.ImageTokenizer)
  assert (tok.codebook_size, tok.tokens_per_item) == (1000, 64)
  from sklearn import datasets  # pylint: disable=import-outside-toplevel
  from tmdm.datasets import image  # pylint: disable=import-outside-toplevel
  labels = np.load(os.path.join(root, 'labels', 'val.npy'))
  assert (labels >= 0).sum() >= 30
  # Held-out digits: the ones the split rule sent to val (never seen by the tokenizer).
  from tmdm.datasets import pairs  # pylint: disable=import-outside-toplevel
  digits = datasets.load_digits().images
  held = [i for i in range(len(digits)) if pairs.is_val(f'digit-{i}', 0.1)][:64]
  x = np.stack([image.digit_to_rgb(digits[i]) for i in held]).astype(np.float32) / 255
  codes = tok.encode(x)
  assert codes.shape == (len(held), 64) and codes.dtype == np.int32
  recon = tok.decode(codes)
  assert recon.shape == x.shape and recon.dtype == np.float32 and 0 <= recon.min() and recon.max() <= 1
  db = image_tok.psnr(x, recon).mean()
  assert db > IMAGE_PSNR_FLOOR_DB, db
  assert db > image_tok.psnr(x, np.broadcast_to(x.mean(0), x.shape)).mean() + 8
  # Save -> load keeps weights, hash and codes; the hash changes when a weight does.
  tok.save(str(tmp_path / 'copy'))
  again = registry.load(str(tmp_path / 'copy'))
  assert again.sha256 == tok.sha256
  np.testing.assert_array_equal(again.encode(x), codes)
  changed = jax.tree.map(lambda w: w + 1e-3, tok.params)
  assert base.params_sha256(tok.config_dict(), changed) != tok.sha256
  with pytest.raises(ValueError, match='expected codes'):
    tok.decode(codes[:, :10])


def test_audio_tokenizer_quality_and_decode(audio_data):
  root, _ = audio_data
  tok = registry.load(os.path.join(root, 'tokenizer'))
  assert isinstance(tok, audio_tok.AudioTokenizer)
  assert tok.tokens_per_item == int(tok.cfg.seconds * 25) and tok.codebook_size == 1000
  from tmdm.datasets import audio  # pylint: disable=import-outside-toplevel
  clips = [audio.read_wav(os.path.join(root, 'listen', f'{i:02d}_original.wav'))[0] for i in range(2)]
  codes = tok.encode(np.stack(clips))
  assert codes.shape == (2, tok.tokens_per_item)
  logmel = tok.log_mel(clips)
  dist = audio_tok.logmel_l1(logmel, tok.decode_mel(codes))
  assert dist.mean() < AUDIO_LOGMEL_CEILING, dist
  silence = audio_tok.logmel_l1(logmel, np.full_like(logmel, np.log(mel.LOG_FLOOR)))
  assert (dist < 0.4 * silence).all(), (dist, silence)
  waves = tok.decode(codes)
  assert waves.shape == (2, tok.cfg.samples) and np.isfinite(waves).all() and np.abs(waves).max() > 1e-3
  with pytest.raises(ValueError, match='exceed'):
    tok.encode(np.zeros((1, tok.cfg.samples + 1), np.float32))
