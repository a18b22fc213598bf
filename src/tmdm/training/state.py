"""The training state pytree, created sharded: shapes by eval_shape, shardings from the logical
axes of the parameters, then one jitted init with out_shardings (never materialized whole)."""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from tmdm.parallel import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32[2]: base key; each step folds in its step number


def _dummy_inputs(seq_len: int):
  zeros = jnp.zeros((1, seq_len), jnp.int32)
  return zeros, zeros, zeros, jnp.zeros((1,), jnp.float32)


def _unsharded(model):
  """The same module without sharding constraints: init uses a 1-row dummy batch."""
  return model.clone(sharder=sharding_lib.Sharder(None))


def param_shardings(model: nn.Module, sharder: sharding_lib.Sharder, seq_len: int):
  boxed = jax.eval_shape(lambda r: _unsharded(model).init(r, *_dummy_inputs(seq_len))['params'], jax.random.PRNGKey(0))
  return sharding_lib.tree_shardings(sharder, nn.get_partition_spec(boxed))


def _init_fn(model, tx, seq_len):
  def init(rng):
    rng_params, rng_train = jax.random.split(rng)
    params = nn.meta.unbox(_unsharded(model).init(rng_params, *_dummy_inputs(seq_len))['params'])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng_train)
  return init


def state_shardings(model, tx: optax.GradientTransformation, sharder, seq_len: int) -> TrainState:
  p_sh = param_shardings(model, sharder, seq_len)
  abstract = jax.eval_shape(_init_fn(model, tx, seq_len), jax.random.PRNGKey(0))
  masked = lambda x: isinstance(x, optax.MaskedNode)  # Other groups' slots in multi_transform.
  opt_sh = optax.tree_map_params(tx, lambda v, sh: v if masked(v) else sh, abstract.opt_state, p_sh,
                                 transform_non_params=lambda _: sharder.replicated, is_leaf=masked)
  rep = sharder.replicated
  return TrainState(step=rep, params=p_sh, opt_state=opt_sh, rng=rep)


def abstract_params(model, sharder, seq_len: int):
  """ShapeDtypeStructs of the parameters with their target shardings (no optimizer needed)."""
  boxed = jax.eval_shape(lambda r: _unsharded(model).init(r, *_dummy_inputs(seq_len))['params'], jax.random.PRNGKey(0))
  shardings = sharding_lib.tree_shardings(sharder, nn.get_partition_spec(boxed))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.meta.unbox(boxed), shardings)


def abstract_state(model, tx, sharder, seq_len: int) -> TrainState:
  """ShapeDtypeStructs carrying the target shardings: the restore target for Orbax."""
  abstract = jax.eval_shape(_init_fn(model, tx, seq_len), jax.random.PRNGKey(0))
  shardings = state_shardings(model, tx, sharder, seq_len)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def create(model, tx, sharder, seq_len: int, seed: int) -> TrainState:
  shardings = state_shardings(model, tx, sharder, seq_len)
  return jax.jit(_init_fn(model, tx, seq_len), out_shardings=shardings)(jax.random.PRNGKey(seed))
