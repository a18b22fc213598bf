"""Transformer pieces: RMSNorm, rotary embeddings, segment-aware attention (dense, splash or GPU flash), SwiGLU, one block.

Legend: B rows, L positions, W active positions of a cached step, D d_model, H heads, K d_head, F d_ff.
Parameters are float32 and named with logical axes (sharding.RULES); each weight is gathered over
'fsdp' on use and cast to the compute dtype there (bf16 compute, f32 master weights).
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tmdm.model.config import ModelConfig
from tmdm.parallel import sharding as sharding_lib


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


def target_platform(sharder: sharding_lib.Sharder) -> str:
  """The platform the program is compiled for: its mesh's devices' (TPU chips of a compile-only
  topology on a CPU host: compile_check.py), else the default backend's."""
  if sharder.mesh is not None:
    return sharder.mesh.devices.flat[0].platform
  return jax.default_backend()


def attention_impl(cfg: ModelConfig, sharder: sharding_lib.Sharder | None = None):
  """'auto': splash on TPU, cuDNN on GPU in 16-bit compute, XLA's dense attention elsewhere."""
  if cfg.attention_impl != 'auto':
    return cfg.attention_impl
  platform = target_platform(sharder) if sharder is not None else jax.default_backend()
  if platform == 'tpu':
    return 'splash'
  return 'cudnn' if platform == 'gpu' and cfg.dtype != jnp.float32 else 'xla'


SPLASH_LANES = 128  # Splash blocks are multiples of the TPU's 128 lanes.


def _splash_block(requested: int, length: int) -> int:
  """The largest multiple of 128 that divides `length` (itself a multiple of 128) and is at most
  `requested`: short or odd lengths get smaller blocks instead of more padding."""
  best = SPLASH_LANES
  for b in range(SPLASH_LANES, min(requested, length) + 1, SPLASH_LANES):
    if length % b == 0:
      best = b
  return best


def _splash():
  """Pallas' splash-attention modules (kernel, masks), imported on first use."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=import-outside-toplevel
      splash_attention_kernel, splash_attention_mask)
  return splash_attention_kernel, splash_attention_mask


def splash_block_sizes(cfg: ModelConfig, length: int):
  """The kernel's BlockSizes for rows of `length` positions (a multiple of 128)."""
  splash, _ = _splash()
  q, kv = _splash_block(cfg.splash_block_q, length), _splash_block(cfg.splash_block_kv, length)
  q_bwd, kv_bwd = _splash_block(cfg.splash_block_q_bwd, length), _splash_block(cfg.splash_block_kv_bwd, length)
  dq = {} if cfg.splash_fused_bwd else dict(block_q_dq=q_bwd, block_kv_dq=kv_bwd)
  return splash.BlockSizes(block_q=q, block_kv=kv, block_kv_compute=kv, block_q_dkv=q_bwd, block_kv_dkv=kv_bwd,
                           block_kv_dkv_compute=kv_bwd, use_fused_bwd_kernel=cfg.splash_fused_bwd, **dq)


def _splash_kernel(heads: int, length: int, block_sizes, interpret: bool):
  splash, masks = _splash()
  mask = masks.MultiHeadMask([masks.FullMask((length, length))] * heads)  # Bidirectional: segments do the rest.
  return splash.make_splash_mha(mask, block_sizes=block_sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _pad_rows(q, k, v, seg, padded):
  """Rows padded to `padded` positions; the padding gets segment -1, which sees only itself."""
  pad = padded - q.shape[1]
  if not pad:
    return q, k, v, seg
  q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
  return q, k, v, jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-1)


def _per_batch_shard(local, sharder, q_BLHK, k_BLHK, v_BLHK, segment_ids_BL):
  """local(q, k, v, seg) on each batch shard (heads over 'tensor') under shard_map, or whole without a mesh."""
  if sharder.mesh is None:
    return local(q_BLHK, k_BLHK, v_BLHK, segment_ids_BL)
  qkv_spec = sharder.spec(('batch', 'length', 'heads', 'kv'))
  seg_spec = sharder.spec(('batch', 'length'))
  return jax.shard_map(local, mesh=sharder.mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec),
                       out_specs=qkv_spec, check_vma=False)(q_BLHK, k_BLHK, v_BLHK, segment_ids_BL)


def splash_attention(q_BLHK, k_BLHK, v_BLHK, segment_ids_BL, cfg: ModelConfig, sharder: sharding_lib.Sharder):
  """Pallas' splash (flash) attention kernel for TPU, no [B, H, L, L] tensor in HBM: positions
  attend within their segment (packed documents; padding, segment 0, sees only padding), exactly
  the dense path's mask. Rows are padded to a multiple of 128 with segment -1 (which sees only
  itself) and cut back. Runs per batch shard under shard_map, heads split over 'tensor'; off TPU
  (CPU tests) the kernel runs in Pallas' interpret mode."""
  splash, _ = _splash()
  length = q_BLHK.shape[1]
  padded = -(-length // SPLASH_LANES) * SPLASH_LANES
  block_sizes = splash_block_sizes(cfg, padded)
  interpret = target_platform(sharder) != 'tpu'

  def local(q, k, v, seg):
    q, k, v, seg = _pad_rows(q, k, v, seg, padded)
    q = q * jnp.asarray(cfg.attn_scale, q.dtype)  # The kernel does not scale; 1 / d_head is exact in bf16.
    kernel = _splash_kernel(q.shape[2], padded, block_sizes, interpret)
    to_heads = lambda x: jnp.swapaxes(x, 1, 2)  # [b, L, h, K] -> [b, h, L, K]
    seg = seg.astype(jnp.int32)
    out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, splash.SegmentIds(q=s1, kv=s1)))(
        to_heads(q), to_heads(k), to_heads(v), seg)
    return to_heads(out)[:, :length]

  return _per_batch_shard(local, sharder, q_BLHK, k_BLHK, v_BLHK, segment_ids_BL)


def _pallas_gpu_attention():
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention  # pylint: disable=import-outside-toplevel
  return gpu_attention


def flash_block_sizes(cfg: ModelConfig, length: int):
  """(BlockSizes, padded length) of the GPU flash kernel for rows of `length`: each block the
  configured power of 2 or, for short rows, the smallest power of 2 (>= 16) that holds the row; the
  row padded to a multiple of the largest block."""
  fit = max(16, 1 << max(0, (length - 1).bit_length()))
  q, k, bwd = (min(b, fit) for b in (cfg.flash_block_q, cfg.flash_block_k, cfg.flash_block_bwd))
  padded = -(-length // max(q, k, bwd)) * max(q, k, bwd)
  sizes = _pallas_gpu_attention().BlockSizes(block_q=q, block_k=k, block_q_dkv=bwd, block_kv_dkv=bwd,
                                              block_q_dq=bwd, block_kv_dq=bwd)
  return sizes, padded


def flash_attention(q_BLHK, k_BLHK, v_BLHK, segment_ids_BL, cfg: ModelConfig, sharder: sharding_lib.Sharder):
  """Pallas' flash-attention kernel for GPU (Triton), forward and backward, with segment ids: no
  [B, H, L, L] mask is built. The same mask as the dense path (positions attend within their segment;
  padding, segment 0, sees only padding); rows are padded to the kernel's blocks with segment -1 and cut
  back. Per batch shard under shard_map, heads over 'tensor', as splash; off GPU (CPU tests) the kernel
  runs in Pallas' interpret mode."""
  kernel = _pallas_gpu_attention()
  length = q_BLHK.shape[1]
  block_sizes, padded = flash_block_sizes(cfg, length)
  interpret = target_platform(sharder) != 'gpu'

  def local(q, k, v, seg):
    q, k, v, seg = _pad_rows(q, k, v, seg, padded)
    out = kernel.mha(q, k, v, seg.astype(jnp.int32), sm_scale=cfg.attn_scale, block_sizes=block_sizes,
                     interpret=interpret)
    return out[:, :length]

  return _per_batch_shard(local, sharder, q_BLHK, k_BLHK, v_BLHK, segment_ids_BL)


class LayerCache(NamedTuple):
  """What a cached step (diffusion/sampling.py) gives one layer: the keys and values of the whole
  canvas from the last full pass, the canvas's segment ids, and the canvas position of each of the
  step's W rows (L: a padding slot, whose keys and values are dropped)."""
  k_BLHK: jax.Array
  v_BLHK: jax.Array
  segment_ids_BL: jax.Array
  slots_BW: jax.Array


def put_rows(full_BL, slots_BW, new_BW):
  """full ([B, L, ...]) with position slots[b, w] of batch row b replaced by new[b, w] (slot L:
  dropped): a cached step's keys and values, and the sampler's predictions scattered back."""
  return jax.vmap(lambda f, i, n: f.at[i].set(n, mode='drop'))(full_BL, slots_BW, new_BW)


class Attention(nn.Module):
  cfg: ModelConfig
  sharder: sharding_lib.Sharder

  @nn.compact
  def __call__(self, x_BLD, segment_ids_BL, positions_BL, cache: LayerCache | None = None):
    """(output [B, L, D], (keys, values) [B, L, H, K] after rope). With `cache`, x holds only the W
    active positions of a cached step: their queries attend to the cached keys and values of every
    other position and to their own fresh ones (XLA's dense attention: a [B, H, W, L] score, small
    when W is a block; whichever kernel the full pass uses)."""
    c, s = self.cfg, self.sharder
    shape, axes = (c.d_model, c.n_heads, c.d_head), ('embed', 'heads', 'kv')
    q = jnp.einsum('bld,dhk->blhk', x_BLD, weight(self, 'wq', shape, axes, c.hidden_std, s))
    k = jnp.einsum('bld,dhk->blhk', x_BLD, weight(self, 'wk', shape, axes, c.hidden_std, s))
    v = jnp.einsum('bld,dhk->blhk', x_BLD, weight(self, 'wv', shape, axes, c.hidden_std, s))
    act_axes = ('batch', 'length', 'heads', 'kv')
    q = s.constrain(rope(q, positions_BL, c.rope_theta), act_axes)
    k = s.constrain(rope(k, positions_BL, c.rope_theta), act_axes)
    v = s.constrain(v, act_axes)
    impl = attention_impl(c, s)
    if cache is not None:
      keys = s.constrain(put_rows(cache.k_BLHK, cache.slots_BW, k), act_axes)
      values = s.constrain(put_rows(cache.v_BLHK, cache.slots_BW, v), act_axes)
      mask_B1WL = segment_ids_BL[:, None, :, None] == cache.segment_ids_BL[:, None, None, :]
      out_BLHK = jax.nn.dot_product_attention(q, keys, values, mask=mask_B1WL, scale=c.attn_scale,
                                              implementation='xla')
    elif impl in ('splash', 'flash'):
      fused = splash_attention if impl == 'splash' else flash_attention
      out_BLHK = s.constrain(fused(q, k, v, segment_ids_BL, c, s), act_axes)
    else:
      # Bidirectional; packed documents see only themselves (segment 0, the padding, sees only padding).
      mask_B1LL = segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :]
      out_BLHK = jax.nn.dot_product_attention(q, k, v, mask=mask_B1LL, scale=c.attn_scale, implementation=impl)
    wo = weight(self, 'wo', (c.n_heads, c.d_head, c.d_model), ('heads', 'kv', 'embed'), c.out_proj_std, s)
    return jnp.einsum('blhk,hkd->bld', out_BLHK, wo), (k, v)


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
  """Pre-norm block; residual branches scaled by CompleteP's m_L^-alpha. Returns (x, the attention's
  (keys, values)); `cache` as Attention's."""
  cfg: ModelConfig
  sharder: sharding_lib.Sharder

  @nn.compact
  def __call__(self, x_BLD, segment_ids_BL, positions_BL, cache: LayerCache | None = None):
    c, s = self.cfg, self.sharder
    r = jnp.asarray(c.residual_mult, c.dtype)
    h, kv = Attention(c, s, name='attn')(RMSNorm(c, s, name='attn_norm')(x_BLD), segment_ids_BL, positions_BL,
                                         cache)
    x_BLD = s.constrain(x_BLD + r * h, ('batch', 'length', 'act_embed'))
    h = MLP(c, s, name='mlp')(RMSNorm(c, s, name='mlp_norm')(x_BLD))
    return s.constrain(x_BLD + r * h, ('batch', 'length', 'act_embed')), kv
