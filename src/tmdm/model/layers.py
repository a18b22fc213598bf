"""Transformer pieces: RMSNorm, rotary embeddings, segment-aware attention, SwiGLU, one block.

Legend: B rows, L positions, D d_model, H heads, K d_head, F d_ff.
Parameters are float32 and named with logical axes (sharding.RULES); each weight is gathered over
'fsdp' on use and cast to the compute dtype there (bf16 compute, f32 master weights).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from tmdm import sharding as sharding_lib
from tmdm.model.config import ModelConfig


def weight(module: nn.Module, name, shape, axes, std, sharder: sharding_lib.Sharder, init=None):
  """Creates a logically partitioned f32 parameter; returns it gathered and cast for compute."""
  init = init or nn.initializers.normal(std)
  w = module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
  return sharder.gather(w.astype(module.cfg.dtype), axes)  # Cast first: gathers move half the bytes.


class RMSNorm(nn.Module):
  cfg: ModelConfig
  sharder: sharding_lib.Sharder

  @nn.compact
  def __call__(self, x_BLD):
    scale = weight(self, 'scale', (x_BLD.shape[-1],), ('norm',), 0.0, self.sharder,
                   init=nn.initializers.ones)
    x = x_BLD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.cfg.norm_eps)
    return x.astype(self.cfg.dtype) * scale


def rope(x_BLHK, positions_BL, theta: float):
  """Rotary embedding (rotate-half form) at per-document positions."""
  half = x_BLHK.shape[-1] // 2
  freq = theta**(-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BLK = positions_BL[..., None].astype(jnp.float32) * freq
  sin, cos = jnp.sin(angle_BLK)[:, :, None, :], jnp.cos(angle_BLK)[:, :, None, :]
  x1, x2 = jnp.split(x_BLHK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLHK.dtype)


def attention_impl(cfg: ModelConfig):
  if cfg.attention_impl != 'auto':
    return cfg.attention_impl
  return 'cudnn' if jax.default_backend() == 'gpu' and cfg.dtype != jnp.float32 else 'xla'


class Attention(nn.Module):
  cfg: ModelConfig
  sharder: sharding_lib.Sharder

  @nn.compact
  def __call__(self, x_BLD, segment_ids_BL, positions_BL):
    c, s = self.cfg, self.sharder
    shape, axes = (c.d_model, c.n_heads, c.d_head), ('embed', 'heads', 'kv')
    q = jnp.einsum('bld,dhk->blhk', x_BLD, weight(self, 'wq', shape, axes, c.hidden_std, s))
    k = jnp.einsum('bld,dhk->blhk', x_BLD, weight(self, 'wk', shape, axes, c.hidden_std, s))
    v = jnp.einsum('bld,dhk->blhk', x_BLD, weight(self, 'wv', shape, axes, c.hidden_std, s))
    act_axes = ('batch', 'length', 'heads', 'kv')
    q = s.constrain(rope(q, positions_BL, c.rope_theta), act_axes)
    k = s.constrain(rope(k, positions_BL, c.rope_theta), act_axes)
    v = s.constrain(v, act_axes)
    # Bidirectional; packed documents see only themselves (segment 0, the padding, sees only padding).
    mask_B1LL = segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :]
    out_BLHK = jax.nn.dot_product_attention(q, k, v, mask=mask_B1LL, scale=c.attn_scale,
                                            implementation=attention_impl(c))
    wo = weight(self, 'wo', (c.n_heads, c.d_head, c.d_model), ('heads', 'kv', 'embed'), c.out_proj_std, s)
    return jnp.einsum('blhk,hkd->bld', out_BLHK, wo)


class MLP(nn.Module):
  cfg: ModelConfig
  sharder: sharding_lib.Sharder

  @nn.compact
  def __call__(self, x_BLD):
    c, s = self.cfg, self.sharder
    gate = jnp.einsum('bld,df->blf', x_BLD, weight(self, 'w_gate', (c.d_model, c.d_ff), ('embed', 'mlp'),
                                                   c.hidden_std, s))
    up = jnp.einsum('bld,df->blf', x_BLD, weight(self, 'w_up', (c.d_model, c.d_ff), ('embed', 'mlp'),
                                                 c.hidden_std, s))
    h_BLF = s.constrain(nn.silu(gate) * up, ('batch', 'length', 'mlp'))
    w_down = weight(self, 'w_down', (c.d_ff, c.d_model), ('mlp', 'embed'), c.out_proj_std, s)
    return jnp.einsum('blf,fd->bld', h_BLF, w_down)


class Block(nn.Module):
  """Pre-norm block; residual branches scaled by CompleteP's m_L^-alpha."""
  cfg: ModelConfig
  sharder: sharding_lib.Sharder

  @nn.compact
  def __call__(self, x_BLD, segment_ids_BL, positions_BL):
    c, s = self.cfg, self.sharder
    r = jnp.asarray(c.residual_mult, c.dtype)
    h = Attention(c, s, name='attn')(RMSNorm(c, s, name='attn_norm')(x_BLD), segment_ids_BL, positions_BL)
    x_BLD = s.constrain(x_BLD + r * h, ('batch', 'length', 'act_embed'))
    h = MLP(c, s, name='mlp')(RMSNorm(c, s, name='mlp_norm')(x_BLD))
    return s.constrain(x_BLD + r * h, ('batch', 'length', 'act_embed'))
