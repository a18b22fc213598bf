"""The checkpoint fingerprint of a large leaf on the simulated CPU meshes: its value on each mesh
(equal bit for bit, or the restore check is wrong) and its compiled memory per device against the
shard (no leaf may be gathered), beside the float fingerprint of checkpoints written before it.

  python -m tmdm.tools.fingerprint_check [--shape=24,3072,2048]
  python -m tmdm.tools.fingerprint_check --topology=v5e:16x16 [--config=experiments/sizes.py:3b]

With --topology (libtpu: the `tpu` extra) it compiles the fingerprint of the config's whole train
state for that TPU slice instead and prints the TPU compiler's memory per chip.
"""

import argparse
import os
import sys

if __name__ == '__main__':  # Before jax is imported: the 8 simulated devices.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from jax.sharding import NamedSharding  # pylint: disable=wrong-import-position

from tmdm.parallel import sharding  # pylint: disable=wrong-import-position
from tmdm.training import checkpoint  # pylint: disable=wrong-import-position

MESHES = ((1, 8, 1), (8, 1, 1), (2, 2, 2), (2, 1, 4))
MiB = 2**20


def _memory(program, leaves):
  compiled = program.lower(*leaves).compile()
  return compiled.memory_analysis().temp_size_in_bytes, 'all-gather' in compiled.as_text()


def main(argv):
  p = argparse.ArgumentParser()
  p.add_argument('--shape', default='24,3072,2048', help='the leaf (default: a 3B-preset stacked weight)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--topology', default='', help='compile for these TPU chips instead (e.g. v5e:16x16)')
  p.add_argument('--config', default='experiments/sizes.py:3b', help='with --topology: the run whose state')
  p.add_argument('--mesh', default='1,256,1', help='with --topology: data,fsdp,tensor')
  args = p.parse_args(argv)
  if args.topology:
    return _on_tpu(args)
  shape = tuple(int(x) for x in args.shape.split(','))
  host = np.random.default_rng(args.seed).standard_normal(shape, dtype=np.float32) * 0.02
  shard_mib = host.nbytes / 8 / MiB
  print(f'leaf {shape} float32 ({host.nbytes / MiB:.0f} MiB, {shard_mib:.0f} MiB a shard on 8 devices), '
        'logical axes (None, embed, mlp)')
  print(f'{"mesh":>6} {"exact fingerprint":>24} {"temp MiB":>9} {"gather":>6} | {"float sum":>15} '
        f'{"temp MiB":>9} {"gather":>6}')
  for mesh_shape in MESHES:
    x = jax.device_put(host, sharding.Sharder(sharding.make_mesh(mesh_shape)).named((None, 'embed', 'mlp')))
    exact = np.asarray(checkpoint.fingerprint([x]))[0]
    temp, gathers = _memory(*checkpoint.fingerprint_program([x]))
    legacy = np.asarray(checkpoint.legacy_float_fingerprint([x]))[0]
    spec = jax.ShapeDtypeStruct(shape, np.float32, sharding=x.sharding)
    legacy_temp, legacy_gathers = _memory(checkpoint.legacy_float_fingerprint, [[spec]])
    print(f'{"x".join(map(str, mesh_shape)):>6} {exact[0]:>11d} {exact[1]:>11d}  {temp / MiB:9.1f} {str(gathers):>6} | '
          f'{legacy[0]:15.9g} {legacy_temp / MiB:9.1f} {str(legacy_gathers):>6}')
    del x


def _on_tpu(args):
  from tmdm.config import loader  # pylint: disable=import-outside-toplevel
  from tmdm.tools import compile_check  # pylint: disable=import-outside-toplevel
  from tmdm.training import state as train_state  # pylint: disable=import-outside-toplevel
  data, fsdp, tensor = (int(x) for x in args.mesh.split(','))
  cfg = loader.load(args.config, [f'--config.mesh.data={data}', f'--config.mesh.fsdp={fsdp}',
                                  f'--config.mesh.tensor={tensor}'])
  s = compile_check.setup_for(cfg, compile_check.topology_devices(args.topology))
  abstract = train_state.abstract_state(s.model, s.tx, s.sharder, s.seq_len)
  compiled = checkpoint.fingerprint_program(abstract)[0].lower(*jax.tree.leaves(abstract)).compile()
  m = compiled.memory_analysis()
  print(f'fingerprint of {args.config} on {args.topology} mesh {args.mesh}: arguments '
        f'{m.argument_size_in_bytes / 2**30:.3f} GiB, temporaries {m.temp_size_in_bytes / MiB:.1f} MiB per chip, '
        f'all-gather in the program: {"all-gather" in compiled.as_text()}')


if __name__ == '__main__':
  main(sys.argv[1:])
