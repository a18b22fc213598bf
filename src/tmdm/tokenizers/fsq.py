"""Finite scalar quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

Each of the d = len(levels) latent channels is bounded and rounded to one of L_i values; the
codebook is the grid of all combinations (prod(levels) codes, e.g. (8, 5, 5, 5) -> 1000). There is
no codebook to learn, so none collapses; rounding passes gradients straight through.

Legend: ... any leading axes, D = len(levels).
  z_D      unbounded encoder output
  zhat_D   quantized, normalized to [-1, 1] per channel (what the decoder sees)
  index    int32 code in [0, prod(levels)), mixed radix with the first channel least significant
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class FSQ:
  levels: tuple[int, ...]
  eps: float = 1e-3  # Widens the tanh range a little so rounding reaches both end values.

  def __post_init__(self):
    if not self.levels or min(self.levels) < 2:
      raise ValueError(f'FSQ levels must be integers >= 2, got {self.levels}')

  @property
  def dim(self) -> int:
    return len(self.levels)

  @property
  def codebook_size(self) -> int:
    return math.prod(self.levels)

  def _consts(self):
    levels = np.asarray(self.levels, np.float32)
    half_l = (levels - 1) * (1 + self.eps) / 2
    # Even L has no centre value: shift by 1/2 so rounding yields L integers {-L/2, ..., L/2 - 1}.
    offset = np.where(self.levels_even, 0.5, 0.0).astype(np.float32)
    shift = np.arctanh(offset / half_l).astype(np.float32)
    half_width = (np.asarray(self.levels) // 2).astype(np.float32)
    basis = np.cumprod([1] + list(self.levels[:-1])).astype(np.int32)
    return half_l, offset, shift, half_width, basis

  @property
  def levels_even(self):
    return np.asarray(self.levels) % 2 == 0

  def bound(self, z_D):
    half_l, offset, shift, _, _ = self._consts()
    return jnp.tanh(z_D + shift) * half_l - offset

  def quantize(self, z_D):
    """Bound, round with a straight-through gradient, normalize to [-1, 1]."""
    bounded = self.bound(z_D.astype(jnp.float32))
    rounded = bounded + jax.lax.stop_gradient(jnp.round(bounded) - bounded)
    return rounded / self._consts()[3]

  def codes_to_indices(self, zhat_D):
    _, _, _, half_width, basis = self._consts()
    digits = jnp.round(zhat_D * half_width + half_width).astype(jnp.int32)
    return jnp.sum(digits * basis, axis=-1).astype(jnp.int32)

  def indices_to_codes(self, index):
    _, _, _, half_width, basis = self._consts()
    digits = (jnp.asarray(index, jnp.int32)[..., None] // basis) % jnp.asarray(self.levels, jnp.int32)
    return (digits.astype(jnp.float32) - half_width) / half_width

  def __call__(self, z_D):
    """Returns (zhat_D, index) for a float encoder output."""
    zhat = self.quantize(z_D)
    return zhat, self.codes_to_indices(zhat)
