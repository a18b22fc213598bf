"""What the learned tokenizers (a small autoencoder with an FSQ bottleneck) share: the training loop
and storage (Orbax for the weights, a JSON file for the settings).

Legend: N items in the training set, B batch, ... the item shape (H W C for images, F M for mels).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from tmdm import storage
from tmdm.tokenizers import base

PARAMS_DIR = 'params'


def fit(init_fn, loss_fn, data_N, *, steps, batch_size, lr, seed, progress=None, desc='training tokenizer'):
  """Adam with warmup and cosine decay on random minibatches of `data_N` (a host numpy array).

  init_fn(rng, batch) -> params; loss_fn(params, batch) -> scalar. Returns (params, losses per step).
  The same seed gives the same bits only under the same XLA CPU thread pool (its convolutions split
  their sums by the pool's size, max(cores or NPROC, CPU devices)): `tmdm prepare` fixes it
  (cli._pin_prepare_backend); a caller in its own process sets NPROC and the device count itself.
  """
  progress = progress or (lambda it, **_: it)
  rng = np.random.default_rng(seed)
  batch_size = min(batch_size, len(data_N))
  # Jitted: run eagerly, init and tx.init compile every small op separately (a hundred compiles). The
  # 'rbg' key: XLA:CPU took 22 s to compile the threefry initializers of this small net, rbg 3 s.
  key = jax.random.key(seed, impl='rbg')
  params = jax.jit(init_fn)(key, jnp.asarray(data_N[:batch_size]))
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), max(steps, 2), lr * 0.05)
  # Clipping keeps the first steps of a randomly initialized conv net from blowing up.
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))
  opt_state = jax.jit(tx.init)(params)

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  bar = progress(range(steps), desc=desc, unit='step')
  for i in bar:
    idx = rng.choice(len(data_N), batch_size, replace=False)
    params, opt_state, loss = step(params, opt_state, jnp.asarray(data_N[idx]))
    losses.append(loss)
    if hasattr(bar, 'set_postfix') and i % 20 == 0:
      bar.set_postfix(loss=f'{float(loss):.4f}')
  return params, [float(x) for x in losses]


def batched_apply(fn, items, batch, pad_value=0):
  """Applies a jitted fn to fixed-size chunks (the last one padded) so that it compiles once."""
  items = np.asarray(items)
  if len(items) == 0:
    return None
  outs = []
  for lo in range(0, len(items), batch):
    chunk = items[lo:lo + batch]
    n = len(chunk)
    if n < batch:
      pad = np.full((batch - n,) + chunk.shape[1:], pad_value, chunk.dtype)
      chunk = np.concatenate([chunk, pad])
    outs.append(np.asarray(fn(jnp.asarray(chunk)))[:n])
  return np.concatenate(outs)


def save(folder, config: dict, params):
  """Writes `tokenizer.json` (config plus the identity hash) and the weights under `params/`."""
  os.makedirs(folder, exist_ok=True)
  params = jax.device_get(params)
  path = os.path.abspath(os.path.join(folder, PARAMS_DIR))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, params, force=True)
    ckptr.wait_until_finished()
  meta = dict(config, sha256=base.params_sha256(config, params))
  tmp = os.path.join(folder, base.CONFIG_FILE + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(meta, f, indent=2)
  os.replace(tmp, os.path.join(folder, base.CONFIG_FILE))  # Written last: the folder is complete.
  return meta['sha256']


def restore(folder, abstract_params):
  """Restores weights onto the first local device and checks them against the recorded hash."""
  meta = base.read_config(folder)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_params)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(storage.absolute(storage.join(folder, PARAMS_DIR)), target)  # Local or a URL.
  config = {k: v for k, v in meta.items() if k != 'sha256'}
  digest = base.params_sha256(config, params)
  if digest != meta['sha256']:
    raise ValueError(f'{folder}: weights do not match the hash in {base.CONFIG_FILE} (corrupt or edited)')
  return params, digest
