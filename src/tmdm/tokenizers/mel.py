"""Log-mel features and Griffin-Lim phase reconstruction, in numpy (filterbank) and jax (transforms).

The STFT is centred (the signal is reflect-padded by n_fft / 2 on both sides) with a periodic Hann
window of n_fft samples; a clip of S samples keeps exactly F = S / hop frames (the last, half-empty
frame of the centred transform is dropped), so 4 s at 16 kHz with hop 160 gives 400 frames.

Legend: N clips, S samples, F frames, K = n_fft / 2 + 1 frequency bins, M mel bands.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

LOG_FLOOR = 1e-4  # Mel magnitudes below this are silence; log(1e-4) = -9.2 is the feature floor.


def hz_to_mel(f):
  return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)  # HTK mel scale.


def mel_to_hz(m):
  return 700.0 * (10**(np.asarray(m, np.float64) / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float = 0.0) -> np.ndarray:
  """Triangular filters [M, K] with unit peaks, evenly spaced on the mel scale."""
  fmax = fmax or sample_rate / 2
  bins_hz = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
  edges_hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
  lo, mid, hi = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
  rising = (bins_hz - lo) / np.maximum(mid - lo, 1e-9)
  falling = (hi - bins_hz) / np.maximum(hi - mid, 1e-9)
  return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def _window(n_fft):
  return jnp.asarray(0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft), jnp.float32)


def stft(wave_NS, n_fft: int, hop: int):
  """Complex spectrogram [N, F, K], F = S // hop."""
  frames = wave_NS.shape[-1] // hop
  padded = jnp.pad(wave_NS, ((0, 0), (n_fft // 2, n_fft // 2)), mode='reflect')
  idx_FT = np.arange(frames)[:, None] * hop + np.arange(n_fft)[None, :]
  return jnp.fft.rfft(padded[:, idx_FT] * _window(n_fft), axis=-1)


def istft(spec_NFK, n_fft: int, hop: int, length: int):
  """Inverse of `stft` by windowed overlap-add, normalized by the summed squared window."""
  n, frames, _ = spec_NFK.shape
  win = _window(n_fft)
  chunks_NFT = jnp.fft.irfft(spec_NFK, n=n_fft, axis=-1) * win
  total = (frames - 1) * hop + n_fft
  idx = (np.arange(frames)[:, None] * hop + np.arange(n_fft)[None, :]).reshape(-1)
  out = jnp.zeros((n, total), jnp.float32).at[:, idx].add(chunks_NFT.reshape(n, -1))
  norm = jnp.zeros((total,), jnp.float32).at[idx].add(jnp.tile(win**2, frames))
  out = out / jnp.maximum(norm, 1e-6)
  out = out[:, n_fft // 2:n_fft // 2 + length]
  return jnp.pad(out, ((0, 0), (0, length - out.shape[1])))


def log_mel(wave_NS, fbank_MK, n_fft: int, hop: int):
  """log(max(mel magnitude, LOG_FLOOR)) [N, F, M] (natural log of the magnitude, not the power)."""
  mag_NFK = jnp.abs(stft(wave_NS.astype(jnp.float32), n_fft, hop))
  return jnp.log(jnp.maximum(mag_NFK @ jnp.asarray(fbank_MK).T, LOG_FLOOR))


def mel_to_magnitude(logmel_NFM, fbank_MK):
  """Linear magnitude [N, F, K] from log-mel through the filterbank's pseudo-inverse (clipped at 0)."""
  inverse_KM = jnp.asarray(np.linalg.pinv(fbank_MK.astype(np.float64)).astype(np.float32)).T
  mel = jnp.where(logmel_NFM <= np.log(LOG_FLOOR) + 1e-3, 0.0, jnp.exp(logmel_NFM))  # Floor means silence.
  return jnp.maximum(mel @ inverse_KM, 0.0)


@functools.partial(jax.jit, static_argnames=('n_fft', 'hop', 'length', 'iters'))
def griffin_lim(mag_NFK, *, n_fft: int, hop: int, length: int, iters: int, momentum: float = 0.99):
  """Waveform [N, S] whose STFT magnitude approaches mag_NFK: fast Griffin-Lim (Perraudin et al. 2013),
  alternating projections with momentum, starting from zero phase (deterministic)."""
  def project(spec):
    return stft(istft(spec, n_fft, hop, length), n_fft, hop)

  def body(_, carry):
    spec, prev = carry
    rebuilt = project(spec)
    accel = rebuilt + momentum * (rebuilt - prev)
    return mag_NFK * jnp.exp(1j * jnp.angle(accel)), rebuilt

  spec0 = mag_NFK.astype(jnp.complex64)
  spec, _ = jax.lax.fori_loop(0, iters, body, (spec0, jnp.zeros_like(spec0)))
  return istft(spec, n_fft, hop, length)
