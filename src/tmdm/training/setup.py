"""What a run is made of, built once from its config: the mesh, the vocabulary, the model, the
corruption process and (for training) the optimizer with its SDE plan.

`build(cfg)` is what `tmdm train` uses; `build(cfg, with_optimizer=False)` what sampling and evaluation
use (no optimizer, no plan logged: they restore parameters only). Tests and tools that want other
parts (a different sharder, an optimizer of their own) build a `Setup` from parts with `from_parts`.
"""

import dataclasses
import logging

import jax
import ml_collections
import optax

from tmdm import optim, vocab as vocab_lib
from tmdm.diffusion import corruption
from tmdm.errors import ConfigError
from tmdm.model import config as model_config, transformer
from tmdm.parallel import mesh as mesh_lib, sharding as sharding_lib

log = logging.getLogger('tmdm')


@dataclasses.dataclass(frozen=True)
class Setup:
  """The parts every stage needs. tx and plan are None when built for sampling or evaluation."""
  cfg: ml_collections.ConfigDict
  mesh_shape: mesh_lib.MeshShape
  sharder: sharding_lib.Sharder
  vocab: vocab_lib.VocabSpec
  model_cfg: model_config.ModelConfig
  model: transformer.Transformer
  diffusion: corruption.DiffusionConfig
  tx: optax.GradientTransformation | None = None
  plan: optim.Plan | None = None

  @property
  def seq_len(self) -> int:
    return self.cfg.data.seq_len

  @property
  def trains(self) -> bool:
    return self.tx is not None


def make_sharder(cfg, num_devices: int | None = None) -> tuple[mesh_lib.MeshShape, sharding_lib.Sharder]:
  """The config's mesh over the visible devices (num_devices: the first that many)."""
  mesh_shape = mesh_lib.resolve_mesh(cfg.mesh, num_devices or jax.device_count())
  mesh = sharding_lib.make_mesh(mesh_shape.as_tuple())
  try:
    sharding_lib.check_tensor_within_process(mesh.devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return mesh_shape, sharding_lib.Sharder(mesh, gather_on_use=cfg.mesh.gather_on_use)


def sde_plan(cfg) -> optim.Plan:
  t = cfg.train
  return optim.plan(cfg.optim, num_steps=t.num_steps, batch_size=t.batch_size, seq_len=cfg.data.seq_len)


def optimizer(cfg, model_cfg: model_config.ModelConfig, plan: optim.Plan) -> optax.GradientTransformation:
  return optim.build(cfg.optim, cfg.train.num_steps, model_cfg.group_multipliers(), run_plan=plan)


def from_parts(cfg, mesh_shape, sharder, *, tx=None, plan=None) -> Setup:
  """A Setup around a given mesh and sharder; the model, vocabulary and corruption from cfg."""
  vocab = vocab_lib.VocabSpec.from_config(cfg.vocab)
  model_cfg = model_config.ModelConfig.from_config(cfg.model, vocab.size)
  return Setup(cfg, mesh_shape, sharder, vocab, model_cfg, transformer.Transformer(model_cfg, sharder),
               corruption.DiffusionConfig.from_config(cfg.diffusion), tx, plan)


def build(cfg, *, with_optimizer: bool = True) -> Setup:
  """The run's Setup. With the optimizer, the SDE plan is computed (once), checked against the
  critical batch (optim.on_exceeding_crit) and logged."""
  mesh_shape, sharder = make_sharder(cfg)
  s = from_parts(cfg, mesh_shape, sharder)
  if not with_optimizer:
    return s
  p = sde_plan(cfg)
  optim.check_critical_batch(p, cfg.optim.on_exceeding_crit)
  log.info(p.describe())
  return dataclasses.replace(s, tx=optimizer(cfg, s.model_cfg, p), plan=p)
