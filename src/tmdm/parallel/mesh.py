"""The device mesh's shape: three named axes (data, fsdp, tensor), one of them may be -1 (the rest).

Pure: no devices are touched here (sharding.make_mesh builds the jax Mesh from a MeshShape).
"""

import dataclasses
import math

from tmdm.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class MeshShape:
  data: int
  fsdp: int
  tensor: int

  @property
  def batch_shards(self):
    return self.data * self.fsdp

  @property
  def size(self):
    return self.data * self.fsdp * self.tensor

  def as_tuple(self):
    return (self.data, self.fsdp, self.tensor)


def _hint(needed: int) -> str:
  """How to get `needed` devices on a CPU host (the usual cause: a mesh meant for simulated devices)."""
  return f' (on a CPU host, --host_devices={needed} simulates them)'


def resolve_mesh(mesh_cfg, num_devices: int) -> MeshShape:
  sizes = {'data': mesh_cfg.data, 'fsdp': mesh_cfg.fsdp, 'tensor': mesh_cfg.tensor}
  fill = [k for k, v in sizes.items() if v == -1]
  if len(fill) > 1:
    raise ConfigError(f'only one mesh axis may be -1, got {", ".join(fill)}')
  for k, v in sizes.items():
    if v == 0 or v < -1:
      raise ConfigError(f'mesh.{k} must be a positive size or -1, got {v}')
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if fill:
    if num_devices % fixed:
      raise ConfigError(f'mesh axes {sizes} leave no whole size for mesh.{fill[0]} on {num_devices} devices'
                      f'{_hint(fixed)}')
    sizes[fill[0]] = num_devices // fixed
  shape = MeshShape(**sizes)
  if shape.size != num_devices:
    word = 'larger' if shape.size > num_devices else 'smaller'
    raise ConfigError(f'mesh {shape.data}x{shape.fsdp}x{shape.tensor} (data x fsdp x tensor) = {shape.size} '
                      f'devices is {word} than the {num_devices} visible devices'
                      f'{_hint(shape.size) if shape.size > num_devices else ""}')
  return shape
