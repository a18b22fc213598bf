"""The fused attention kernels against the dense attention they replace, in Pallas' interpret mode on
CPU: splash (the TPU kernel) and flash (the GPU Triton kernel, `model.attention_impl='flash'`).

Rows hold several packed documents and trailing padding (segment 0), lengths that are not multiples
of the kernel's 128-row blocks (so the padding to 128 is exercised), and odd head counts. float32:
1e-5 relative to the largest entry (measured: 4e-7 at most); bfloat16: 1e-2 (measured: 4.1e-3 at most;
bf16 keeps 8 mantissa bits, ~4e-3 per rounding, and the two paths round at different places).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmdm import errors, vocab as vocab_lib
from tmdm.config import base as base_config, checks as config_checks
from tmdm.model import config as model_config, layers
from tmdm.parallel import sharding
from helpers import random_batch, tiny_config, trainer

F32_RTOL = 1e-5
BF16_RTOL = 1e-2


def _segments(rows, length, seed):
  """1-4 documents per row, then 0-40% padding (segment 0)."""
  rng = np.random.default_rng(seed)
  seg = np.zeros((rows, length), np.int32)
  for r in range(rows):
    used = length - int(rng.integers(0, int(0.4 * length) + 1))
    cuts = np.sort(rng.choice(np.arange(1, used), size=int(rng.integers(0, 4)), replace=False))
    for i, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, used]), start=1):
      seg[r, lo:hi] = i
  seg[0, -3:] = 0  # at least one row ends in padding
  return jnp.asarray(seg)


def _inputs(rows, length, heads, d_head, dtype, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  q, k, v = (jax.random.normal(key, (rows, length, heads, d_head), jnp.float32).astype(dtype) for key in keys)
  return q, k, v, _segments(rows, length, seed)


def _cfg(heads, d_head, dtype='float32', **kw):
  return model_config.ModelConfig(vocab_size=128, n_heads=heads, d_head=d_head, compute_dtype=dtype, **kw)


def _dense(q, k, v, seg, c):
  mask = seg[:, None, :, None] == seg[:, None, None, :]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=c.attn_scale, implementation='xla')


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _fwd_and_grads(fn, q, k, v, seg, weights):
  """Output, and the gradients of sum(output * weights) (a random cotangent) w.r.t. q, k, v."""
  loss = lambda q, k, v: jnp.sum(fn(q, k, v, seg).astype(jnp.float32) * weights)
  out = jax.jit(fn)(q, k, v, seg)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  return (out, *grads)


KERNELS = {'splash': layers.splash_attention, 'flash': layers.flash_attention}


def _assert_matches_dense(impl, c, sharder, inputs, rtol, seed):
  """The kernel's output and q, k, v gradients (under a random cotangent) equal the dense path's."""
  q, k, v, seg = inputs
  weights = jax.random.normal(jax.random.PRNGKey(seed), q.shape, jnp.float32)
  kernel = lambda q, k, v, seg: KERNELS[impl](q, k, v, seg, c, sharder)
  dense = lambda q, k, v, seg: _dense(q, k, v, seg, c)
  with jax.default_matmul_precision('highest'):
    got = _fwd_and_grads(kernel, q, k, v, seg, weights)
    want = _fwd_and_grads(dense, q, k, v, seg, weights)
  for name, a, b in zip(('out', 'dq', 'dk', 'dv'), got, want):
    assert a.dtype == b.dtype == c.dtype
    assert _rel(a, b) < rtol, (name, _rel(a, b))


@pytest.mark.parametrize('impl,dtype,rtol', [('splash', 'float32', F32_RTOL), ('splash', 'bfloat16', BF16_RTOL),
                                             ('flash', 'float32', F32_RTOL), ('flash', 'bfloat16', BF16_RTOL)])
def test_fused_matches_dense_forward_and_gradients(impl, dtype, rtol):
  # 3 heads; 200 positions pad to 256 (splash: two 128-blocks; flash: two 128-blocks forward, 8 x 32 backward)
  c = _cfg(heads=3, d_head=16, dtype=dtype, flash_block_bwd=32)
  q, k, v, seg = _inputs(3, 200, 3, 16, c.dtype)
  assert len(set(np.asarray(seg[1]).tolist())) >= 2 and (np.asarray(seg) == 0).any()
  _assert_matches_dense(impl, c, sharding.Sharder(None), (q, k, v, seg), rtol, seed=9)


@pytest.mark.parametrize('impl', ['splash', 'flash'])
def test_fused_under_shard_map_matches_dense(impl):
  """8 CPU devices as data 2 x fsdp 2 x tensor 2: rows over the batch axes, 6 heads over 'tensor'
  (3 per shard), inside jit with the activations' shardings, as the model runs it."""
  c = _cfg(heads=6, d_head=8)
  sharder = sharding.Sharder(sharding.make_mesh((2, 2, 2)))
  q, k, v, seg = _inputs(4, 130, 6, 8, jnp.float32, seed=1)
  qkv_sh = sharder.named(('batch', 'length', 'heads', 'kv'))
  q, k, v = (jax.device_put(x, qkv_sh) for x in (q, k, v))
  seg = jax.device_put(seg, sharder.batch())
  _assert_matches_dense(impl, c, sharder, (q, k, v, seg), F32_RTOL, seed=2)


def test_block_sizes_fit_the_row():
  c = _cfg(heads=2, d_head=8, splash_block_q=512, splash_block_kv=256, splash_block_q_bwd=384,
           splash_block_kv_bwd=1024, splash_fused_bwd=False)
  b = layers.splash_block_sizes(c, 2048)
  assert (b.block_q, b.block_kv, b.block_q_dkv, b.block_kv_dkv, b.block_q_dq, b.block_kv_dq) == (
      512, 256, 256, 1024, 256, 1024)  # 384 does not divide 2048: the next smaller multiple of 128
  b = layers.splash_block_sizes(c, 128)  # a short row: one block
  assert (b.block_q, b.block_kv, b.block_kv_dkv) == (128, 128, 128)
  assert layers.splash_block_sizes(c, 640).block_q == 128  # 640 = 5 x 128
  fused = layers.splash_block_sizes(dataclasses.replace(c, splash_fused_bwd=True), 1024)
  assert fused.use_fused_bwd_kernel and fused.block_q_dq is None


def test_flash_block_sizes_fit_short_rows():
  c = _cfg(heads=2, d_head=8)  # defaults 128 / 128 / 32
  b, padded = layers.flash_block_sizes(c, 2048)
  assert (b.block_q, b.block_k, b.block_q_dkv, b.block_kv_dq, padded) == (128, 128, 32, 32, 2048)
  b, padded = layers.flash_block_sizes(c, 13)  # a short row: one 16-block, not 128
  assert (b.block_q, b.block_k, b.block_q_dkv, padded) == (16, 16, 16, 16)
  assert layers.flash_block_sizes(c, 200)[1] == 256 and layers.flash_block_sizes(c, 100)[1] == 128
  cfg = base_config.get_config()
  cfg.model.update(attention_impl='flash', flash_block_bwd=48)
  with pytest.raises(errors.ConfigError, match='flash_block_bwd must be a power of 2'):
    config_checks.validate(cfg)


def test_auto_picks_splash_only_for_tpu():
  c = _cfg(heads=2, d_head=8)
  assert layers.attention_impl(c, sharding.Sharder(None)) == 'xla'  # CPU
  assert layers.attention_impl(dataclasses.replace(c, attention_impl='splash')) == 'splash'


def test_config_rejects_block_sizes_off_the_lanes():
  cfg = base_config.get_config()
  cfg.model.update(attention_impl='splash', remat='dots_no_batch')
  config_checks.validate(cfg)
  cfg.model.splash_block_kv_bwd = 100
  with pytest.raises(errors.ConfigError, match='splash_block_kv_bwd must be a positive multiple of 128'):
    config_checks.validate(cfg)


def _losses(impl, steps=3, mesh=(2, 2, 2)):
  cfg = tiny_config()
  cfg.model.attention_impl = impl
  t = trainer(cfg, mesh)
  vocab, sharder, state, step_fn = t.vocab, t.sharder, t.state, t.step
  out = []
  with jax.default_matmul_precision('highest'):
    for i in range(steps):
      batch = random_batch(vocab, 8, cfg.data.seq_len, seed=11 + i, modalities=(vocab_lib.TEXT, vocab_lib.IMAGE, vocab_lib.AUDIO))
      batch['segment_ids'][0, -2:] = 0  # padding in one row
      state, metrics = step_fn(state, {k: jax.device_put(v, sharder.batch()) for k, v in batch.items()})
      m = jax.device_get(metrics)
      out.append((float(m['elbo_sum']), float(m['grad_norm'])))
  return np.array(out)


@pytest.fixture(scope='module')
def xla_losses():
  return _losses('xla')


@pytest.mark.parametrize('impl', ['splash', 'flash'])
def test_fused_training_matches_xla_losses(impl, xla_losses):
  """Three optimizer steps of the tiny model (4 heads over tensor 2, rows of 13 positions) on the
  same batches: the kernel in interpret mode gives xla's losses and gradient norms in float32."""
  got, want = _losses(impl), xla_losses
  assert np.all(np.isfinite(want)) and len(set(want[:, 0].tolist())) == 3  # the steps changed something
  np.testing.assert_allclose(got, want, rtol=1e-5)
