"""The bidirectional masked-diffusion Transformer over the joint vocabulary.

Legend: B rows, L positions, D d_model, V joint vocabulary (padded), M modalities.
Input: corrupted ids, segment ids (0 = padding) and per-document positions; output: float32 logits
[B, L, V] sharded over the vocabulary. No time input unless `time_conditioning` (docs/design.md 2.1).
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from tmdm.model import layers
from tmdm.model.config import ModelConfig
from tmdm.parallel import sharding as sharding_lib

REMAT_POLICIES = {
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # Not QK^T, AV: no [B,H,L,L].
    'full': jax.checkpoint_policies.nothing_saveable,
}
REMAT_CHOICES = ('none', *REMAT_POLICIES)


class _ScannedBlock(nn.Module):
  cfg: ModelConfig
  sharder: sharding_lib.Sharder
  with_kv: bool = False  # stack each layer's keys and values as the scan's output (a sampler's cache)

  @nn.compact
  def __call__(self, x_BLD, segment_ids_BL, positions_BL, layer_kv, where):
    cache = None if layer_kv is None else layers.LayerCache(*layer_kv, *where)
    x_BLD, kv = _block_cls(self.cfg)(self.cfg, self.sharder, name='block')(x_BLD, segment_ids_BL, positions_BL, cache)
    return x_BLD, kv if self.with_kv else None


def _block_cls(cfg: ModelConfig):
  if cfg.remat == 'none':
    return layers.Block
  return nn.remat(layers.Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


class KVCache(NamedTuple):
  """Keys and values of every layer over the whole canvas ([layers, B, L, H, K], after rope), the
  canvas's segment ids, and the canvas positions [B, W] of a cached step's rows (L: padding)."""
  k_NBLHK: jax.Array
  v_NBLHK: jax.Array
  segment_ids_BL: jax.Array
  slots_BW: jax.Array


class Transformer(nn.Module):
  cfg: ModelConfig
  sharder: sharding_lib.Sharder

  @nn.compact
  def __call__(self, tokens_BL, segment_ids_BL, positions_BL, t_B=None, return_hidden=False, return_kv=False,
               cache: KVCache | None = None):
    """Logits [B, L, V] float32; with return_hidden, (final hidden states [B, L, D], unembedding
    [D, V] gathered, both in the compute dtype) for `chunked_nll`; with return_kv, (logits, (keys,
    values) [layers, B, L, H, K]) for a sampler's cache. With `cache`, the inputs are the W active
    positions of a cached step ([B, W], gathered by the caller) and the logits are theirs: every
    layer runs on W positions only, attending to the cached keys and values of the others."""
    c, s = self.cfg, self.sharder
    act = ('batch', 'length', 'act_embed')
    table_VD = layers.weight(self, 'embed', (c.vocab_size, c.d_model), ('vocab', 'embed'), c.init_std, s)
    x_BLD = s.constrain(vocab_parallel_lookup(table_VD, tokens_BL, s), act)
    if c.time_conditioning:
      x_BLD = x_BLD + self._time_embedding(t_B)[:, None, :]
    where = None if cache is None else (cache.segment_ids_BL, cache.slots_BW)
    if c.scan_layers:
      stack = nn.scan(_ScannedBlock, variable_axes={'params': 0}, split_rngs={'params': True},
                      in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=c.n_layers,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      layer_kv = None if cache is None else (cache.k_NBLHK, cache.v_NBLHK)
      x_BLD, kv = stack(c, s, return_kv, name='blocks')(x_BLD, segment_ids_BL, positions_BL, layer_kv, where)
      k_NBLHK, v_NBLHK = kv if return_kv else (None, None)
    else:
      ks, vs = [], []
      for i in range(c.n_layers):
        layer = None if cache is None else layers.LayerCache(cache.k_NBLHK[i], cache.v_NBLHK[i], *where)
        x_BLD, (k, v) = _block_cls(c)(c, s, name=f'block_{i}')(x_BLD, segment_ids_BL, positions_BL, layer)
        ks.append(k)
        vs.append(v)
      k_NBLHK, v_NBLHK = (jnp.stack(ks), jnp.stack(vs)) if return_kv else (None, None)
    x_BLD = layers.RMSNorm(c, s, name='final_norm')(x_BLD)
    w_DV = layers.weight(self, 'unembed', (c.d_model, c.vocab_size), ('embed', 'vocab'), c.init_std, s)
    if return_hidden:
      return x_BLD, w_DV
    logits_BLV = unembed(c, s, x_BLD, w_DV)
    if return_kv:
      kv_axes = ('layers', 'batch', 'length', 'heads', 'kv')
      return logits_BLV, (s.constrain(k_NBLHK, kv_axes), s.constrain(v_NBLHK, kv_axes))
    return logits_BLV

  def _time_embedding(self, t_B):
    c = self.cfg
    freqs = jnp.exp(jnp.linspace(0.0, jnp.log(1000.0), 32))
    feats_BF = jnp.concatenate([jnp.sin(t_B[:, None] * freqs), jnp.cos(t_B[:, None] * freqs)], axis=-1)
    w = layers.weight(self, 'time_proj', (feats_BF.shape[-1], c.d_model), (None, 'embed'), c.hidden_std,
                      self.sharder)
    return feats_BF.astype(c.dtype) @ w


def unembed(c: ModelConfig, s: sharding_lib.Sharder, x_BLD, w_DV):
  """Float32 logits. They leave the matmul in the compute dtype and are upcast for the softmax:
  asking the matmul for float32 output ran 15% slower per step on CPU (BUILD_NOTES, "Performance on CPU")."""
  logits_BLV = jnp.einsum('bld,dv->blv', x_BLD, w_DV).astype(jnp.float32)
  if c.output_mult != 1.0:
    logits_BLV = logits_BLV * c.output_mult
  return s.constrain(logits_BLV, ('batch', 'length', 'vocab'))


def vocab_parallel_lookup(table_VD, tokens_BL, sharder: sharding_lib.Sharder):
  """Embedding rows of a table sharded over 'tensor' by vocabulary: each shard looks up the ids in
  its range and the shards are summed (XLA's own gather on a sharded table replicates it)."""
  if sharder.mesh is None:
    return jnp.take(table_VD, tokens_BL, axis=0)

  def local(table, tokens):
    v_local = table.shape[0]
    local_ids = tokens - jax.lax.axis_index('tensor') * v_local
    inside = (local_ids >= 0) & (local_ids < v_local)
    rows = jnp.take(table, jnp.clip(local_ids, 0, v_local - 1), axis=0)
    return jax.lax.psum(jnp.where(inside[..., None], rows, 0), 'tensor')

  batch = sharding_lib.BATCH_AXES
  return jax.shard_map(local, mesh=sharder.mesh, in_specs=(P('tensor', None), P(batch, None)),
                       out_specs=P(batch, None, None))(table_VD, tokens_BL)


