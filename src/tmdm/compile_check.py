"""Ahead-of-time fit check: lower and compile the real train step for a mesh without allocating it.

The trainer's own pieces build the program (train.setup, train_state.abstract_state and
state_shardings, train_step.jit_steps); the state and the batch are ShapeDtypeStructs carrying their
shardings, so `jit(...).lower(state, batch).compile()` sees exactly the trainer's program while no
parameter is ever materialized. Per device it reports:

  parameters, optimizer state   sum over leaves of bytes(sharding.shard_shape(leaf.shape))
  batch                         the step's int32 input rows on one device
  temporaries                   compiled.memory_analysis().temp_size_in_bytes: activations saved
                                for the backward pass, gradients, collectives' buffers, scratch
  peak estimate                 arguments + outputs - aliased (the donated state) + temporaries

FLOPs per step come from XLA's cost analysis (per device, times the device count) and from tmdm's
formula ModelConfig.flops_per_token(seq_len) x batch x seq_len (BUILD_NOTES). XLA counts a loop's body
once, so with model.scan_layers (and again with train.microbatches > 1) it undercounts by about the
number of layers (times the microbatches); the formula is the one MFU uses.

Numbers come from the backend that compiles: on CPU they describe the CPU program (its fusion and
buffer assignment differ from TPU / GPU), so treat them as a close guide there and compile on the
target platform for the real figure.
"""

import dataclasses
import math
import os
import subprocess
import sys
import time

import jax

from tmdm import config_lib, train, train_state, train_step

GIB = 2.0**30


def parse_mesh(text: str) -> config_lib.MeshShape:
  try:
    d, f, t = (int(x) for x in text.split(','))
  except ValueError:
    raise config_lib.ConfigError(f'--mesh takes DATA,FSDP,TENSOR (three integers), got {text!r}') from None
  shape = config_lib.MeshShape(d, f, t)
  if min(shape.as_tuple()) < 1:
    raise config_lib.ConfigError(f'--mesh sizes must be positive, got {text!r}')
  return shape


def _bytes_per_device(tree) -> int:
  def leaf_bytes(x):
    shape = x.sharding.shard_shape(x.shape)
    return math.prod(shape) * x.dtype.itemsize
  return sum(leaf_bytes(x) for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class Report:
  mesh: tuple
  devices: int
  platform: str
  params: int  # bytes per device
  opt_state: int
  batch: int
  argument: int  # XLA's view of the same inputs (state + batch + rng)
  output: int
  alias: int
  temp: int
  generated_code: int
  xla_flops: float  # per device
  formula_flops: float  # whole step, all devices
  num_params: int
  compile_s: float

  @property
  def peak(self) -> int:
    return self.argument + self.output - self.alias + self.temp


def check(cfg) -> Report:
  """Compiles cfg's train step on the mesh its config names (sizes must use every visible device)."""
  s = train.setup(cfg)
  state = train_state.abstract_state(s.model, s.tx, s.sharder, s.seq_len)
  state_sh = train_state.state_shardings(s.model, s.tx, s.sharder, s.seq_len)
  step_fn, _ = train_step.jit_steps(s.model, s.tx, s.diffusion, s.vocab, s.sharder, state_sh,
                                    cfg.train.microbatches)
  rows = config_lib.rows_per_step(cfg)
  batch = {k: jax.ShapeDtypeStruct((rows, s.seq_len), jax.numpy.int32, sharding=s.sharder.batch())
           for k in train_step.BATCH_KEYS}
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # A list of one dict on older jax.
  return Report(
      mesh=s.mesh_shape.as_tuple(), devices=s.mesh_shape.size, platform=jax.devices()[0].platform,
      params=_bytes_per_device(state.params), opt_state=_bytes_per_device(state.opt_state),
      batch=_bytes_per_device(batch), argument=mem.argument_size_in_bytes, output=mem.output_size_in_bytes,
      alias=mem.alias_size_in_bytes, temp=mem.temp_size_in_bytes,
      generated_code=mem.generated_code_size_in_bytes, xla_flops=float((cost or {}).get('flops', float('nan'))),
      formula_flops=s.model_cfg.flops_per_token(s.seq_len) * cfg.train.batch_size * s.seq_len,
      num_params=s.model_cfg.num_params, compile_s=compile_s)


def format_report(r: Report, hbm_gib: float = 0.0) -> str:
  rows = [('parameters', r.params), ('optimizer state', r.opt_state), ('batch', r.batch),
          ('activations + temporaries', r.temp), ('outputs not aliased to inputs', r.output - r.alias),
          ('peak estimate', r.peak)]
  unit, scale = ('GiB', GIB) if r.peak >= GIB else ('MiB', 2.0**20)
  d, f, t = r.mesh
  lines = [f'mesh data={d} fsdp={f} tensor={t} ({r.devices} {r.platform} devices) | '
           f'{r.num_params / 1e6:,.1f}M parameters | compiled in {r.compile_s:.1f}s',
           f'  {"per device":<32}{unit:>10}']
  lines += [f'  {name:<32}{value / scale:>10.3f}' for name, value in rows]
  if hbm_gib:
    verdict = 'fits' if r.peak <= hbm_gib * GIB else 'DOES NOT FIT'
    lines.append(f'  {verdict} in {hbm_gib:g} GiB per device ({100 * r.peak / (hbm_gib * GIB):.0f}% used)')
  lines.append(f'  FLOPs/step: tmdm formula {r.formula_flops:.4g} ({r.formula_flops / r.devices:.4g} per device); '
               f'XLA cost analysis {r.xla_flops:.4g} per device (counts each loop body once: layers, microbatches)')
  return '\n'.join(lines)


def _mesh_overrides(shape: config_lib.MeshShape):
  return [f'--config.mesh.data={shape.data}', f'--config.mesh.fsdp={shape.fsdp}',
          f'--config.mesh.tensor={shape.tensor}']


def _in_subprocess(spec, overrides, shape, hbm_gib):
  """A CPU can simulate any device count, but only once per process: other sizes run in a child."""
  cmd = [sys.executable, '-m', 'tmdm.cli', 'compile-check', f'--host_devices={shape.size}', f'--config={spec}',
         f'--mesh={shape.data},{shape.fsdp},{shape.tensor}', f'--hbm_gib={hbm_gib}', *overrides]
  env = dict(os.environ)
  env['XLA_FLAGS'] = ' '.join(f for f in env.get('XLA_FLAGS', '').split()
                              if not f.startswith('--xla_force_host_platform_device_count'))
  return subprocess.call(cmd, env=env)


def run(spec, overrides, meshes, hbm_gib=0.0, log=print) -> int:
  """Checks each mesh; returns 0 when every mesh compiled (and fits, when hbm_gib is given)."""
  status = 0
  for shape in meshes:
    if shape.size != jax.device_count():
      if jax.devices()[0].platform != 'cpu':
        raise config_lib.ConfigError(
            f'mesh {shape.as_tuple()} needs {shape.size} devices but {jax.device_count()} are visible '
            f'(on an accelerator, run the check as a job on the target slice; on CPU use --host_devices)')
      status = max(status, _in_subprocess(spec, overrides, shape, hbm_gib))
      continue
    cfg = config_lib.load(spec, list(overrides) + _mesh_overrides(shape), num_devices=jax.device_count(),
                          process_count=jax.process_count())
    report = check(cfg)
    if jax.process_index() == 0:
      log(format_report(report, hbm_gib))
    if hbm_gib and report.peak > hbm_gib * GIB:
      status = 1
  return status
