"""Learned image tokenizer: a small convolutional autoencoder with an FSQ bottleneck.

32x32 RGB -> (two stride-2 stages) -> 8x8 latents of len(levels) channels -> FSQ -> 64 codes per
image, row-major (raster order). Trained from scratch by `train` (called from `tmdm prepare`) with
a mean-squared error, so its quality is reported as PSNR.

Legend: N images, H W image side, C = 3 colour channels, h w latent side, D = len(levels) FSQ
channels, T = h * w tokens per image, F conv features.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tmdm.tokenizers import base, fsq, learned


@dataclasses.dataclass(frozen=True)
class ImageConfig:
  size: int = 32  # Image side in pixels.
  levels: tuple = (8, 5, 5, 5)  # FSQ levels per latent channel; codebook = product.
  downsamples: int = 2  # Stride-2 stages: latent side = size / 2**downsamples.
  width: int = 64  # Conv features at the latent resolution (half of it at full resolution).

  def __post_init__(self):
    object.__setattr__(self, 'levels', tuple(int(x) for x in self.levels))
    if self.size % 2**self.downsamples:
      raise ValueError(f'image size {self.size} is not divisible by 2**{self.downsamples}')

  @property
  def latent(self) -> int:
    return self.size // 2**self.downsamples


class ResBlock(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x_NhwF):
    y = nn.Conv(self.features, (3, 3))(nn.gelu(x_NhwF))
    y = nn.Conv(self.features, (3, 3))(nn.gelu(y))
    return x_NhwF + y


class Autoencoder(nn.Module):
  cfg: ImageConfig

  def setup(self):
    c = self.cfg
    self.fsq = fsq.FSQ(c.levels)
    self.enc_in = nn.Conv(c.width // 2, (3, 3))
    self.enc_down = [nn.Conv(c.width, (4, 4), strides=(2, 2)) for _ in range(c.downsamples)]
    self.enc_res = ResBlock(c.width)
    self.enc_out = nn.Conv(len(c.levels), (1, 1))
    self.dec_in = nn.Conv(c.width, (3, 3))
    self.dec_res = ResBlock(c.width)
    feats = [c.width] * (c.downsamples - 1) + [c.width // 2]
    self.dec_up = [nn.Conv(f, (3, 3)) for f in feats]
    self.dec_out = nn.Conv(3, (3, 3))

  def encode(self, x_NHWC):
    h = nn.gelu(self.enc_in(x_NHWC * 2 - 1))  # Centre pixels: white backgrounds sit at +1.
    for conv in self.enc_down:
      h = nn.gelu(conv(h))
    return self.enc_out(self.enc_res(h))  # z_NhwD

  def decode(self, zhat_NhwD):
    h = self.dec_res(self.dec_in(zhat_NhwD))
    for conv in self.dec_up:
      n, hh, ww, f = h.shape
      h = nn.gelu(conv(jax.image.resize(h, (n, 2 * hh, 2 * ww, f), 'nearest')))
    return (self.dec_out(h) + 1) / 2  # x_NHWC, not clipped during training

  def __call__(self, x_NHWC):
    zhat, _ = self.fsq(self.encode(x_NHWC))
    return self.decode(zhat)


def psnr(a_NHWC, b_NHWC) -> np.ndarray:
  """Peak signal-to-noise ratio per image (peak 1), in dB."""
  mse = np.mean((np.asarray(a_NHWC, np.float64) - np.asarray(b_NHWC, np.float64))**2, axis=(1, 2, 3))
  return 10 * np.log10(1.0 / np.maximum(mse, 1e-10))


@base.register('fsq-conv-image')
class ImageTokenizer(base.Tokenizer):
  """encode(images_NHWC float32 in [0, 1]) -> codes_NT; decode(codes_NT) -> images_NHWC."""

  def __init__(self, cfg: ImageConfig, params, sha256: str, batch: int = 256):
    self.cfg, self.params, self._sha256, self.batch = cfg, params, sha256, batch
    self.model = Autoencoder(cfg)
    self._fsq = fsq.FSQ(cfg.levels)

    # Weights are arguments, not closed-over constants, so XLA does not fold them into the program.
    @jax.jit
    def encode(params, x_NHWC):
      z = self.model.apply(params, x_NHWC, method=Autoencoder.encode)
      _, idx_Nhw = self._fsq(z)
      return idx_Nhw.reshape(len(x_NHWC), -1)

    @jax.jit
    def decode(params, codes_NT):
      n = codes_NT.shape[0]
      zhat = self._fsq.indices_to_codes(codes_NT).reshape(n, cfg.latent, cfg.latent, -1)
      return jnp.clip(self.model.apply(params, zhat, method=Autoencoder.decode), 0, 1)

    self._encode, self._decode = encode, decode

  @property
  def name(self):
    c = self.cfg
    return f'fsq-image-{c.size}px-{c.latent}x{c.latent}'

  @property
  def codebook_size(self):
    return self._fsq.codebook_size

  @property
  def tokens_per_item(self):
    return self.cfg.latent**2

  @property
  def sha256(self):
    return self._sha256

  def encode(self, batch):
    images = np.asarray(batch, np.float32)
    size = self.cfg.size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
      raise ValueError(f'expected images [N, {size}, {size}, 3], got {images.shape}')
    out = learned.batched_apply(lambda x: self._encode(self.params, x), images, self.batch)
    return np.zeros((0, self.tokens_per_item), np.int32) if out is None else out.astype(np.int32)

  def decode(self, codes):
    codes = np.asarray(codes, np.int32)
    if codes.ndim != 2 or codes.shape[1] != self.tokens_per_item:
      raise ValueError(f'expected codes [N, {self.tokens_per_item}], got {codes.shape}')
    if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
      raise ValueError(f'codes must lie in [0, {self.codebook_size})')
    out = learned.batched_apply(lambda c: self._decode(self.params, c), codes, self.batch)
    return np.zeros((0, self.cfg.size, self.cfg.size, 3), np.float32) if out is None else out

  def config_dict(self):
    return {'kind': self.kind, **dataclasses.asdict(self.cfg)}

  def save(self, folder):
    learned.save(folder, self.config_dict(), self.params)

  @classmethod
  def load(cls, folder, batch: int = 256):
    meta = base.read_config(folder)
    cfg = ImageConfig(**{f.name: meta[f.name] for f in dataclasses.fields(ImageConfig)})
    abstract = jax.eval_shape(Autoencoder(cfg).init, jax.random.key(0), jnp.zeros((1, cfg.size, cfg.size, 3)))
    params, digest = learned.restore(folder, abstract)
    return cls(cfg, params, digest, batch)


def train(images_NHWC, cfg: ImageConfig, *, steps, batch_size, lr, seed=0, progress=None) -> ImageTokenizer:
  """Fits the autoencoder to float32 images in [0, 1] (mean-squared error)."""
  model = Autoencoder(cfg)

  def loss_fn(params, x_BHWC):
    return jnp.mean((model.apply(params, x_BHWC) - x_BHWC)**2)

  params, _ = learned.fit(model.init, loss_fn, np.asarray(images_NHWC, np.float32), steps=steps,
                          batch_size=batch_size, lr=lr, seed=seed, progress=progress,
                          desc='training image tokenizer')
  sha = base.params_sha256({'kind': ImageTokenizer.kind, **dataclasses.asdict(cfg)}, params)
  return ImageTokenizer(cfg, params, sha)
