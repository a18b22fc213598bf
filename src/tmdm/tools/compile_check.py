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

`--topology=v5e:16x16` (or an alias, v5e-256) compiles for real TPU chips from any host: libtpu (the
`tpu` extra) describes the slice's chips as compile-only devices, the mesh is laid over them and the
TPU compiler itself compiles the step (attention 'auto' is then splash). Its memory figures are the
TPU program's; when the step does not fit the compiler refuses with RESOURCE_EXHAUSTED, and the
report carries its numbers. The usable HBM per chip is the compiler's own (asked once per chip kind
with a deliberately oversized program), not the data sheet's. `--fit` searches the execution knobs
(remat policy, loss chunking, microbatches, the tensor split) for configurations that fit, ranked by
the FLOPs they recompute (`recompute_flops`).
"""

import dataclasses
import functools
import itertools
import logging
import math
import os
import re
import subprocess
import sys
import time

import jax

from tmdm import errors
from tmdm.config import loader as config_loader
from tmdm.data import pipeline, shards as shards_lib
from tmdm.model import layers, transformer
from tmdm.parallel import distributed, mesh as mesh_lib, sharding as sharding_lib
from tmdm.training import setup as setup_lib, state as train_state, step as train_step

GIB = 2.0**30


def parse_mesh(text: str) -> mesh_lib.MeshShape:
  try:
    d, f, t = (int(x) for x in text.split(','))
  except ValueError:
    raise errors.ConfigError(f'--mesh takes DATA,FSDP,TENSOR (three integers), got {text!r}') from None
  shape = mesh_lib.MeshShape(d, f, t)
  if min(shape.as_tuple()) < 1:
    raise errors.ConfigError(f'--mesh sizes must be positive, got {text!r}')
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
  attention: str = ''  # The attention implementation compiled ('auto' resolved for the target).
  compiler_peak: int = 0  # The TPU compiler's own peak (memory_analysis().peak_memory_in_bytes); 0 elsewhere.
  oom: str = ''  # The compiler's out-of-memory message (RESOURCE_EXHAUSTED): the step does not fit.
  oom_needed: float = 0.0  # With oom: bytes per device the compiler said the step needs,
  oom_available: float = 0.0  # and the bytes it has.

  @property
  def estimate(self) -> int:
    return self.argument + self.output - self.alias + self.temp

  @property
  def peak(self) -> int:
    """The compiler's out-of-memory figure, else its own peak (TPU), else the estimate."""
    if self.oom:
      return int(self.oom_needed)
    return self.compiler_peak or self.estimate


def setup_for(cfg, devices=None) -> setup_lib.Setup:
  """setup_lib.build(cfg), with the mesh laid over `devices` (a TPU topology's compile-only chips) when given."""
  if devices is None:
    return setup_lib.build(cfg)
  shape = mesh_lib.resolve_mesh(cfg.mesh, len(devices))
  host = cfg.copy_and_resolve_references()
  host.mesh.update(data=-1, fsdp=1, tensor=1)  # Everything but the mesh comes from the trainer's own setup.
  s = setup_lib.build(host)
  try:
    mesh = sharding_lib.make_mesh(shape.as_tuple(), devices)
  except NotImplementedError as e:  # jax lays mesh axes on whole torus axes; the trainer would fail alike.
    raise errors.ConfigError(f'mesh {shape.as_tuple()} does not map onto the chips\' torus: '
                                 f'{str(e).split(". ")[0]}') from None
  sharder = sharding_lib.Sharder(mesh, gather_on_use=cfg.mesh.gather_on_use)
  return dataclasses.replace(s, cfg=cfg, mesh_shape=shape, sharder=sharder,
                             model=transformer.Transformer(s.model_cfg, sharder))


_OOM = re.compile(r'\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)')
_UNITS = {'': 1, 'K': 2.0**10, 'M': 2.0**20, 'G': 2.0**30, 'T': 2.0**40}  # The TPU compiler's G is GiB.


def parse_oom(message: str):
  """(bytes needed, bytes available) from the TPU compiler's out-of-memory message, or None."""
  m = _OOM.search(message)
  if not m:
    return None
  return float(m.group(1)) * _UNITS[m.group(2)], float(m.group(3)) * _UNITS[m.group(4)]


def _is_oom(e: Exception) -> bool:
  return 'RESOURCE_EXHAUSTED' in str(e) or 'Ran out of memory' in str(e)


def check(cfg, devices=None) -> Report:
  """Compiles cfg's train step on the mesh its config names: over `devices` (compile-only TPU chips)
  when given, else over the visible devices (sizes must use every one of them)."""
  s = setup_for(cfg, devices)
  state = train_state.abstract_state(s.model, s.tx, s.sharder, s.seq_len)
  state_sh = train_state.state_shardings(s.model, s.tx, s.sharder, s.seq_len)
  step_fn, _ = train_step.jit_steps(s.model, s.tx, s.diffusion, s.vocab, s.sharder, state_sh,
                                    cfg.train.microbatches)
  rows = shards_lib.rows_per_step(cfg)
  batch = {k: jax.ShapeDtypeStruct((rows, s.seq_len), jax.numpy.int32, sharding=s.sharder.batch())
           for k in pipeline.ROW_KEYS}
  platform = devices[0].platform if devices is not None else jax.devices()[0].platform
  common = dict(mesh=s.mesh_shape.as_tuple(), devices=s.mesh_shape.size, platform=platform,
                params=_bytes_per_device(state.params), opt_state=_bytes_per_device(state.opt_state),
                batch=_bytes_per_device(batch),
                formula_flops=s.model_cfg.flops_per_token(s.seq_len) * cfg.train.batch_size * s.seq_len,
                num_params=s.model_cfg.num_params, attention=layers.attention_impl(s.model_cfg, s.sharder))
  t0 = time.perf_counter()
  try:
    compiled = step_fn.lower(state, batch).compile()
  except Exception as e:  # pylint: disable=broad-except  (jax raises JaxRuntimeError; only HBM OOM is a result)
    if not _is_oom(e):
      raise
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    parsed = parse_oom(str(e))
    if parsed is None:  # Out of something else, e.g. a kernel's VMEM (splash blocks of 2048 on v5e).
      first = lines[0] if len(lines[0]) <= 200 else lines[0][:200] + ' ...'
      raise errors.ConfigError(f'the compiler refused the step: {first}') from None
    message = next((line for line in lines if 'exceeds available HBM' in line), lines[0])
    needed, available = parsed
    return Report(argument=0, output=0, alias=0, temp=0, generated_code=0, xla_flops=float('nan'),
                  compile_s=time.perf_counter() - t0, oom=message, oom_needed=needed, oom_available=available,
                  **common)
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # A list of one dict on older jax.
  # The TPU compiler's peak comes from its own buffer assignment, and it is what the compiler holds
  # against HBM (3b on v5e:16x16, mesh 1,128,2, 4 microbatches: estimate 16.88 GiB, compiler's peak
  # 15.32, compiled). The CPU's field is no peak (it comes out below the temporaries): CPU keeps the estimate.
  compiler_peak = int(getattr(mem, 'peak_memory_in_bytes', 0) or 0) if platform == 'tpu' else 0
  return Report(
      argument=mem.argument_size_in_bytes, output=mem.output_size_in_bytes, compiler_peak=compiler_peak,
      alias=mem.alias_size_in_bytes, temp=mem.temp_size_in_bytes,
      generated_code=mem.generated_code_size_in_bytes, xla_flops=float((cost or {}).get('flops', float('nan'))),
      compile_s=compile_s, **common)


def fits(r: Report, hbm_gib: float = 0.0) -> bool:
  """Compiled (no out-of-memory refusal) and, when hbm_gib is given, a peak within it."""
  return not r.oom and (not hbm_gib or r.peak <= hbm_gib * GIB)


def format_report(r: Report, hbm_gib: float = 0.0) -> str:
  d, f, t = r.mesh
  head = (f'mesh data={d} fsdp={f} tensor={t} ({r.devices} {r.platform} devices) | '
          f'{r.num_params / 1e6:,.1f}M parameters | {r.attention} attention | compiled in {r.compile_s:.1f}s')
  if r.oom:
    lines = [head.replace('compiled in', 'refused after'),
             f'  DOES NOT FIT: the compiler needs {r.oom_needed / GIB:.2f} GiB per device, has '
             f'{r.oom_available / GIB:.2f} GiB', f'  compiler: {r.oom}',
             f'  (parameters {r.params / GIB:.3f} GiB, optimizer state {r.opt_state / GIB:.3f} GiB per device)']
    return '\n'.join(lines)
  rows = [('parameters', r.params), ('optimizer state', r.opt_state), ('batch', r.batch),
          ('activations + temporaries', r.temp), ('outputs not aliased to inputs', r.output - r.alias),
          ('peak estimate', r.estimate)]
  if r.compiler_peak:
    rows.append(('peak (TPU compiler)', r.compiler_peak))
  unit, scale = ('GiB', GIB) if r.peak >= GIB else ('MiB', 2.0**20)
  lines = [head, f'  {"per device":<32}{unit:>10}']
  lines += [f'  {name:<32}{value / scale:>10.3f}' for name, value in rows]
  if hbm_gib:
    verdict = 'fits' if r.peak <= hbm_gib * GIB else 'DOES NOT FIT'
    lines.append(f'  {verdict} in {hbm_gib:g} GiB per device ({100 * r.peak / (hbm_gib * GIB):.0f}% used)')
  lines.append(f'  FLOPs/step: tmdm formula {r.formula_flops:.4g} ({r.formula_flops / r.devices:.4g} per device); '
               f'XLA cost analysis {r.xla_flops:.4g} per device (counts each loop body once: layers, microbatches)')
  return '\n'.join(lines)


# --- TPU topologies (compile-only chips from libtpu) ------------------------------------------------

INSTALL_HINT = "libtpu is not installed: pip install -e '.[tpu]' (jax[tpu] matched to the installed jax)"
_FAMILIES_2D = {'v5e': 'v5e', 'v5litepod': 'v5e', 'v6e': 'v6e'}  # alias names count chips
_FAMILIES_3D = {'v4': 'v4', 'v5p': 'v5p'}  # alias names count TensorCores (2 per chip), as Cloud TPU does
_TOPOLOGY = re.compile(r'^[a-zA-Z0-9_ ]+[=_:][0-9x]+(_twisted|_untwisted)?$')


def _split(chips: int, dims: int):
  """A power-of-two chip count as the usual slice shape: 256 -> 16x16, 128 -> 4x4x8."""
  if chips < 1 or chips & (chips - 1):
    raise errors.ConfigError(f'a TPU slice alias needs a power-of-two chip count, got {chips}')
  sides = [1] * dims
  for i in range(chips.bit_length() - 1):
    sides[i % dims] *= 2
  return 'x'.join(str(x) for x in sorted(sides, key=lambda x: (x == 1, x)))  # v5p-8: 2x2x1


def resolve_topology(name: str) -> str:
  """jax's topology name (v5e:16x16, v5p:4x4x8, ...) for itself or an alias: v5e-256 / v6e-256 (chips)
  -> v5e:16x16; v5p-256 / v4-128 (TensorCores, 2 per chip) -> v5p:4x4x8 / v4:4x4x4."""
  name = name.strip()
  if _TOPOLOGY.match(name):
    return name
  family, _, count = name.partition('-')
  if count.isdigit():
    if family in _FAMILIES_2D:
      return f'{_FAMILIES_2D[family]}:{_split(int(count), 2)}'
    if family in _FAMILIES_3D:
      return f'{_FAMILIES_3D[family]}:{_split(max(int(count) // 2, 1), 3)}'
  raise errors.ConfigError(f'unknown TPU topology {name!r} (e.g. v5e:16x16, v5p:4x4x8, v6e:8x8, or v5e-256, '
                               'v5p-256)')


def libtpu_available() -> bool:
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  return xla_bridge.get_tpu_library_path() is not None


def topology_devices(name: str):
  """The compile-only chips of a TPU topology (libtpu, any host)."""
  if not libtpu_available():
    raise errors.ConfigError(INSTALL_HINT)
  # libtpu takes a lock file per host unless told otherwise; compile-only use needs no exclusive chip,
  # and without this a second process (a test beside a running check) fails to load it.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  resolved = resolve_topology(name)
  try:
    return topologies.get_topology_desc(platform='tpu', topology_name=resolved).devices
  except Exception as e:  # pylint: disable=broad-except  (libtpu raises JaxRuntimeError with a long message)
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise errors.ConfigError(f'TPU topology {resolved!r}: {first}') from None


@functools.lru_cache(maxsize=None)
def _probe_hbm(device_kind: str, device) -> float:
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  sharding = NamedSharding(Mesh([device], ('x',)), P())
  big = jax.ShapeDtypeStruct((2**40 // 4,), jax.numpy.float32, sharding=sharding)  # 1 TiB: more than any chip
  try:
    jax.jit(lambda x: x * 2, out_shardings=sharding).lower(big).compile()
  except Exception as e:  # pylint: disable=broad-except
    parsed = parse_oom(str(e))
    if parsed:
      return parsed[1] / GIB
  raise errors.ConfigError(f'could not learn the HBM of a {device_kind}; pass --hbm_gib')


def usable_hbm_gib(devices) -> float:
  """GiB per chip the TPU compiler lets a program use (v5e 15.75, v5p 95.74, v6e 31.25, measured)."""
  return _probe_hbm(devices[0].device_kind, devices[0])


def _mesh_overrides(shape: mesh_lib.MeshShape):
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


def run(spec, overrides, meshes, hbm_gib=0.0, log=print, topology='') -> int:
  """Checks each mesh; returns 0 when every mesh compiled (and fits, when hbm_gib is given, or on
  a TPU topology, where the compiler's usable HBM is the bound)."""
  if topology:
    return _run_topology(spec, overrides, meshes, topology, hbm_gib, log)
  status = 0
  for shape in meshes:
    if shape.size != jax.device_count():
      if jax.devices()[0].platform != 'cpu':
        raise errors.ConfigError(
            f'mesh {shape.as_tuple()} needs {shape.size} devices but {jax.device_count()} are visible '
            f'(on an accelerator, run the check as a job on the target slice; on CPU use --host_devices)')
      status = max(status, _in_subprocess(spec, overrides, shape, hbm_gib))
      continue
    cfg = config_loader.load(spec, list(overrides) + _mesh_overrides(shape), num_devices=jax.device_count(),
                          process_count=jax.process_count())
    report = check(cfg)
    if jax.process_index() == 0:
      log(format_report(report, hbm_gib))
    if not fits(report, hbm_gib):
      status = 1
  return status


def _run_topology(spec, overrides, meshes, topology, hbm_gib, log) -> int:
  devices = topology_devices(topology)
  hbm = hbm_gib or usable_hbm_gib(devices)
  log(f'TPU topology {resolve_topology(topology)}: {len(devices)} x {devices[0].device_kind}, '
      f'{hbm:.2f} GiB usable HBM per chip')
  status = 0
  for shape in meshes or [None]:
    extra = _mesh_overrides(shape) if shape is not None else []
    cfg = config_loader.load(spec, list(overrides) + extra, num_devices=len(devices))
    report = check(cfg, devices)
    log(format_report(report, hbm))
    if not fits(report, hbm):
      status = 1
  return status


# --- The fit search -------------------------------------------------------------------------------

REMAT_ORDER = ('none', 'dots', 'dots_no_batch', 'full')  # Saves least memory first.


@dataclasses.dataclass(frozen=True)
class Knobs:
  remat: str
  loss_chunk: int
  microbatches: int
  mesh: tuple  # (data, fsdp, tensor)

  def overrides(self):
    d, f, t = self.mesh
    return [f'--config.model.remat={self.remat}', f'--config.model.loss_chunk={self.loss_chunk}',
            f'--config.train.microbatches={self.microbatches}', f'--config.mesh.data={d}',
            f'--config.mesh.fsdp={f}', f'--config.mesh.tensor={t}']

  def describe(self):
    return (f'remat={self.remat} loss_chunk={self.loss_chunk} microbatches={self.microbatches} '
            f'mesh={",".join(map(str, self.mesh))}')

  def no_leaner_than(self, other: 'Knobs') -> bool:
    """Every knob saves at most as much memory as other's, on the same mesh: when other does not
    fit, neither does this."""
    return (self.mesh == other.mesh and REMAT_ORDER.index(self.remat) <= REMAT_ORDER.index(other.remat) and
            (self.loss_chunk == 0 or 0 < other.loss_chunk <= self.loss_chunk) and
            self.microbatches <= other.microbatches)


def recompute_flops(mcfg, seq_len: int, tokens: int, knobs: Knobs, attention: str) -> float:
  """FLOPs the backward pass spends recomputing forward work, from tmdm's formula
  (ModelConfig.flops_per_token: forward = 2 x matmul params + 4 x layers x L x H x K per token):
  'full' recomputes each block's forward; 'dots_no_batch' its attention (QK^T, AV); 'dots' nothing
  with dense attention (it saves the scores) but the attention kernel with splash (a Pallas call is
  no dot); model.loss_chunk > 0 recomputes the unembedding."""
  attn = 4.0 * mcfg.n_layers * seq_len * mcfg.n_heads * mcfg.d_head
  blocks = 2.0 * mcfg.n_layers * mcfg.block_matmul_params + attn
  per_token = {'none': 0.0, 'dots': attn if attention == 'splash' else 0.0, 'dots_no_batch': attn,
               'full': blocks}[knobs.remat]
  if knobs.loss_chunk:
    per_token += 2.0 * mcfg.d_model * mcfg.vocab_size
  return per_token * tokens


def candidates(cfg, num_devices: int, chunk: int = 512):
  """Knob settings to try: every remat policy, loss chunking off / `chunk`, 1-8 microbatches that
  keep every batch shard busy, and tensor splits 1, 2, 4 (data 1, fsdp the rest)."""
  m = cfg.model
  out = []
  for tensor in (1, 2, 4):
    if num_devices % tensor or m.n_heads % tensor or m.d_ff % tensor or cfg.vocab.multiple % tensor:
      continue
    mesh = (1, num_devices // tensor, tensor)
    for micro in (1, 2, 4, 8):
      if cfg.train.batch_size % micro or (cfg.train.batch_size // micro) % mesh[1]:
        continue
      for remat, loss_chunk in itertools.product(REMAT_ORDER, (0, chunk)):
        out.append(Knobs(remat, loss_chunk, micro, mesh))
  return out


def fit_search(spec, overrides, topology, hbm_gib=0.0, limit=3, log=print) -> int:
  """Compiles candidate knob settings until `limit` fit: fewest microbatches first (each one more
  gathers every FSDP weight again and shrinks the rows per chip that the matmuls see), then the
  fewest recomputed FLOPs, then less tensor parallelism; a candidate no leaner than one that did not
  fit is skipped. Prints the fitting ones ranked by recomputed FLOPs; returns 0 when any fit."""
  devices = topology_devices(topology)
  hbm = hbm_gib or usable_hbm_gib(devices)
  base = config_loader.load(spec, overrides, num_devices=len(devices))
  s = setup_for(base, devices)
  attention = layers.attention_impl(s.model_cfg, s.sharder)
  tokens = base.train.batch_size * s.seq_len
  total = s.model_cfg.flops_per_token(s.seq_len) * tokens
  extra = lambda k: recompute_flops(s.model_cfg, s.seq_len, tokens, k, attention)
  cands = candidates(base, len(devices))
  if attention == 'splash':  # No batch-dim dot outside the kernel: 'dots_no_batch' would repeat 'dots'.
    cands = [k for k in cands if k.remat != 'dots_no_batch']
  order = sorted(cands, key=lambda k: (k.microbatches, extra(k), k.mesh[2], k.loss_chunk))
  log(f'TPU topology {resolve_topology(topology)}: {len(devices)} x {devices[0].device_kind}, {hbm:.2f} GiB usable '
      f'HBM per chip; {len(order)} candidate settings, fewest microbatches and recomputed FLOPs first')
  logger = logging.getLogger('tmdm')
  level = logger.level
  logger.setLevel(logging.WARNING)  # train.setup's optimizer-plan line, once per candidate
  failed, found = [], []
  try:
    for knobs in order:
      if len(found) >= limit:
        break
      if any(knobs.no_leaner_than(f) for f in failed):
        continue
      try:
        cfg = config_loader.load(spec, list(overrides) + knobs.overrides(), num_devices=len(devices))
        report = check(cfg, devices)
      except errors.ConfigError as e:
        log(f'  skip  {knobs.describe():<58} {e}')
        continue
      ok = fits(report, hbm)
      rows = base.train.batch_size // knobs.microbatches // knobs.mesh[1]  # per batch shard, per microbatch
      log(f'  {"fits" if ok else "no  "}  {knobs.describe():<58} {rows:3d} rows/shard, '
          f'peak {report.peak / GIB:6.2f} GiB '
          f'({100 * report.peak / (hbm * GIB):.0f}%), recompute {100 * extra(knobs) / total:4.1f}% of step FLOPs, '
          f'compiled in {report.compile_s:.0f}s')
      if ok:
        found.append((knobs, report))
      else:
        failed.append(knobs)
  finally:
    logger.setLevel(level)
  if not found:
    log('no candidate fits')
    return 1
  log(f'fitting settings, fewest recomputed FLOPs first (step: {total:.4g} FLOPs by the formula):')
  for i, (knobs, report) in enumerate(sorted(found, key=lambda f: (extra(f[0]), f[0].microbatches)), start=1):
    log(f'  {i}. {knobs.describe():<58} peak {report.peak / GIB:6.2f} / {hbm:.2f} GiB per chip, '
        f'recompute {extra(knobs):.3g} FLOPs ({100 * extra(knobs) / total:.1f}%)')
  return 0


def command(args, overrides) -> int:
  """`tmdm compile-check`: exit status 0 when every program fits, 1 otherwise."""
  meshes = [parse_mesh(m) for m in args.mesh]
  if args.fit and not args.topology:
    raise errors.ConfigError('--fit searches a TPU topology: give --topology=NAME (e.g. v5e:16x16)')
  if args.topology:  # Compile-only TPU chips on this host: no distributed start-up, no visible devices needed.
    if args.fit:
      return fit_search(args.config, overrides, args.topology, hbm_gib=args.hbm_gib, limit=args.fit_limit)
    return run(args.config, overrides, meshes, hbm_gib=args.hbm_gib, topology=args.topology)
  distributed.initialize()  # As a job on a TPU slice or under SLURM: the target's own devices and compiler.
  if not meshes:  # The config's own mesh on the visible devices.
    meshes = [mesh_lib.resolve_mesh(config_loader.load(args.config, overrides).mesh, jax.device_count())]
  return run(args.config, overrides, meshes, hbm_gib=args.hbm_gib)
