"""Learned audio tokenizer: log-mel frames -> 1-D conv encoder -> FSQ codes -> decoder -> log-mel;
waveforms come back through Griffin-Lim.

Every clip has the same length (`seconds`, default 4 s at 16 kHz; shorter inputs are padded with
silence), so every clip has the same number of tokens: 100 mel frames per second, halved by each
of `downsamples` stride-2 stages (two: 25 tokens per second, 100 per clip). The loss is the L1
distance of normalized log-mels; quality is reported as the mean |log-mel difference| (natural log
of mel magnitudes, floor mel.LOG_FLOOR).

Legend: N clips, S samples, F mel frames, M mel bands, T tokens per clip, D = len(levels), E conv features.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tmdm.tokenizers import base, fsq, learned, mel


@dataclasses.dataclass(frozen=True)
class AudioConfig:
  sample_rate: int = 16_000
  seconds: float = 4.0
  n_fft: int = 512
  hop: int = 160
  n_mels: int = 64
  levels: tuple = (8, 5, 5, 5)
  downsamples: int = 2
  width: int = 128
  griffin_lim_iters: int = 48
  mel_mean: float = 0.0  # Log-mel normalization, measured on the training clips by `train`.
  mel_std: float = 1.0

  def __post_init__(self):
    object.__setattr__(self, 'levels', tuple(int(x) for x in self.levels))
    if self.frames % 2**self.downsamples:
      raise ValueError(f'{self.frames} mel frames are not divisible by 2**{self.downsamples}')

  @property
  def samples(self) -> int:
    return int(round(self.seconds * self.sample_rate))

  @property
  def frames(self) -> int:
    return self.samples // self.hop

  @property
  def tokens(self) -> int:
    return self.frames // 2**self.downsamples

  def filterbank(self) -> np.ndarray:
    return mel.mel_filterbank(self.sample_rate, self.n_fft, self.n_mels)


class ResBlock(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x_NTE):
    y = nn.Conv(self.features, (3,))(nn.gelu(x_NTE))
    y = nn.Conv(self.features, (3,))(nn.gelu(y))
    return x_NTE + y


class Autoencoder(nn.Module):
  """Normalized log-mel [N, F, M] <-> latents [N, T, D]."""
  cfg: AudioConfig

  def setup(self):
    c = self.cfg
    self.fsq = fsq.FSQ(c.levels)
    self.enc_in = nn.Conv(c.width, (3,))
    self.enc_down = [nn.Conv(c.width, (4,), strides=(2,)) for _ in range(c.downsamples)]
    self.enc_res = [ResBlock(c.width), ResBlock(c.width)]
    self.enc_out = nn.Conv(len(c.levels), (1,))
    self.dec_in = nn.Conv(c.width, (3,))
    self.dec_res = [ResBlock(c.width), ResBlock(c.width)]
    self.dec_up = [nn.Conv(c.width, (3,)) for _ in range(c.downsamples)]
    self.dec_out = nn.Conv(c.n_mels, (3,))

  def encode(self, x_NFM):
    h = nn.gelu(self.enc_in(x_NFM))
    for conv in self.enc_down:
      h = nn.gelu(conv(h))
    for block in self.enc_res:
      h = block(h)
    return self.enc_out(h)  # z_NTD

  def decode(self, zhat_NTD):
    h = self.dec_in(zhat_NTD)
    for block in self.dec_res:
      h = block(h)
    for conv in self.dec_up:
      h = nn.gelu(conv(jnp.repeat(h, 2, axis=1)))
    return self.dec_out(h)  # x_NFM

  def __call__(self, x_NFM):
    zhat, _ = self.fsq(self.encode(x_NFM))
    return self.decode(zhat)


def fit_length(waves, samples: int) -> np.ndarray:
  """Pads clips with trailing silence to `samples`; longer clips are an error (they would lose speech)."""
  waves = [np.asarray(w, np.float32).reshape(-1) for w in waves]
  too_long = [len(w) for w in waves if len(w) > samples]
  if too_long:
    raise ValueError(f'clips of {max(too_long)} samples exceed the fixed {samples}')
  out = np.zeros((len(waves), samples), np.float32)
  for i, w in enumerate(waves):
    out[i, :len(w)] = w
  return out


def logmel_l1(a_NFM, b_NFM) -> np.ndarray:
  """Mean |log-mel difference| per clip (natural-log units; 1 unit is 8.7 dB)."""
  return np.mean(np.abs(np.asarray(a_NFM) - np.asarray(b_NFM)), axis=(1, 2))


@base.register('fsq-conv-audio')
class AudioTokenizer(base.Tokenizer):
  """encode(waveforms_NS float32, S <= samples) -> codes_NT; decode(codes_NT) -> waveforms_NS."""

  def __init__(self, cfg: AudioConfig, params, sha256: str, batch: int = 64):
    self.cfg, self.params, self._sha256, self.batch = cfg, params, sha256, batch
    self.model = Autoencoder(cfg)
    self._fsq = fsq.FSQ(cfg.levels)
    fbank = cfg.filterbank()

    def features(wave_NS):
      return mel.log_mel(wave_NS, fbank, cfg.n_fft, cfg.hop)

    # Weights are arguments, not closed-over constants, so XLA does not fold them into the program.
    @jax.jit
    def encode(params, wave_NS):
      x = (features(wave_NS) - cfg.mel_mean) / cfg.mel_std
      _, idx_NT = self._fsq(self.model.apply(params, x, method=Autoencoder.encode))
      return idx_NT

    @jax.jit
    def decode_mel(params, codes_NT):
      x = self.model.apply(params, self._fsq.indices_to_codes(codes_NT), method=Autoencoder.decode)
      return jnp.maximum(x * cfg.mel_std + cfg.mel_mean, np.log(mel.LOG_FLOOR))

    self._features = jax.jit(features)
    self._encode, self._decode_mel = encode, decode_mel
    self._fbank = fbank

  @property
  def name(self):
    c = self.cfg
    return f'fsq-audio-{c.sample_rate // 1000}khz-{c.seconds:g}s-{c.tokens}tok'

  @property
  def codebook_size(self):
    return self._fsq.codebook_size

  @property
  def tokens_per_item(self):
    return self.cfg.tokens

  @property
  def sha256(self):
    return self._sha256

  def log_mel(self, waves) -> np.ndarray:
    """[N, F, M] features of clips padded to the fixed length."""
    return learned.batched_apply(self._features, fit_length(waves, self.cfg.samples), self.batch)

  def encode(self, batch):
    waves = fit_length(batch, self.cfg.samples)
    out = learned.batched_apply(lambda w: self._encode(self.params, w), waves, self.batch)
    return np.zeros((0, self.tokens_per_item), np.int32) if out is None else out.astype(np.int32)

  def _check(self, codes):
    codes = np.asarray(codes, np.int32)
    if codes.ndim != 2 or codes.shape[1] != self.tokens_per_item:
      raise ValueError(f'expected codes [N, {self.tokens_per_item}], got {codes.shape}')
    if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
      raise ValueError(f'codes must lie in [0, {self.codebook_size})')
    return codes

  def decode_mel(self, codes) -> np.ndarray:
    """codes [N, T] -> log-mel [N, F, M]."""
    out = learned.batched_apply(lambda c: self._decode_mel(self.params, c), self._check(codes), self.batch)
    return np.zeros((0, self.cfg.frames, self.cfg.n_mels), np.float32) if out is None else out

  def mel_to_wave(self, logmel_NFM) -> np.ndarray:
    c = self.cfg
    mag = mel.mel_to_magnitude(jnp.asarray(logmel_NFM), self._fbank)
    return np.asarray(mel.griffin_lim(mag, n_fft=c.n_fft, hop=c.hop, length=c.samples, iters=c.griffin_lim_iters))

  def decode(self, codes):
    logmel = self.decode_mel(codes)
    if not len(logmel):
      return np.zeros((0, self.cfg.samples), np.float32)
    return np.concatenate([self.mel_to_wave(logmel[lo:lo + self.batch]) for lo in range(0, len(logmel), self.batch)])

  def config_dict(self):
    return {'kind': self.kind, **dataclasses.asdict(self.cfg)}

  def save(self, folder):
    learned.save(folder, self.config_dict(), self.params)

  @classmethod
  def load(cls, folder, batch: int = 64):
    meta = base.read_config(folder)
    cfg = AudioConfig(**{f.name: meta[f.name] for f in dataclasses.fields(AudioConfig)})
    abstract = jax.eval_shape(Autoencoder(cfg).init, jax.random.key(0), jnp.zeros((1, cfg.frames, cfg.n_mels)))
    params, digest = learned.restore(folder, abstract)
    return cls(cfg, params, digest, batch)


def train(waves_NS, cfg: AudioConfig, *, steps, batch_size, lr, seed=0, progress=None) -> AudioTokenizer:
  """Fits the autoencoder to clips (float32 waveforms at cfg.sample_rate, at most cfg.samples long)."""
  waves = fit_length(waves_NS, cfg.samples)
  fbank = cfg.filterbank()
  features = jax.jit(lambda w: mel.log_mel(w, fbank, cfg.n_fft, cfg.hop))
  logmel_NFM = learned.batched_apply(features, waves, 64)
  cfg = dataclasses.replace(cfg, mel_mean=float(logmel_NFM.mean()), mel_std=float(logmel_NFM.std() + 1e-6))
  x_NFM = (logmel_NFM - cfg.mel_mean) / cfg.mel_std
  model = Autoencoder(cfg)

  def loss_fn(params, x_BFM):
    return jnp.mean(jnp.abs(model.apply(params, x_BFM) - x_BFM))

  params, _ = learned.fit(model.init, loss_fn, x_NFM, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                          progress=progress, desc='training audio tokenizer')
  sha = base.params_sha256({'kind': AudioTokenizer.kind, **dataclasses.asdict(cfg)}, params)
  return AudioTokenizer(cfg, params, sha)
