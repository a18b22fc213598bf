"""How much a checkpoint fingerprint moves when the same array is summed on another mesh.

The restore check (training/checkpoint._fingerprint_matches) compares two float32 sums per leaf,
bitwise on the mesh that saved them and within a tolerance on another mesh (the partitioned sums add
in another order). This measures that difference on the largest leaf of the 3B preset (the stacked
SwiGLU up-projection, 24 x 3072 x 8192 = 604M floats, initialized like the model's) on the 8-device
CPU meshes, and prints it against the tolerance.

  python launch/fingerprint_tolerance.py [--shape=24,3072,8192]
  python launch/fingerprint_tolerance.py --topology=v5e:16x16 [--config=experiments/sizes.py:3b]

With --topology (libtpu: the `tpu` extra) it compiles the fingerprint of the config's whole train
state for that TPU slice instead and prints the TPU compiler's memory per chip.
"""

import argparse
import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from tmdm.parallel import sharding  # pylint: disable=wrong-import-position
from tmdm.training import checkpoint  # pylint: disable=wrong-import-position

MESHES = ((1, 8, 1), (8, 1, 1), (2, 2, 2), (2, 1, 4))  # The first is the saving mesh.


def main(argv):
  p = argparse.ArgumentParser()
  p.add_argument('--shape', default='24,3072,8192', help='the leaf (default: 3B stacked w_up)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--topology', default='', help='compile for these TPU chips instead (e.g. v5e:16x16)')
  p.add_argument('--config', default='experiments/sizes.py:3b', help='with --topology: the run whose state')
  p.add_argument('--mesh', default='1,256,1', help='with --topology: data,fsdp,tensor')
  args = p.parse_args(argv)
  if args.topology:
    return _on_tpu(args)
  shape = tuple(int(x) for x in args.shape.split(','))
  host = (np.random.default_rng(args.seed).standard_normal(shape, dtype=np.float32) * 0.02 / np.sqrt(shape[1] / 256))
  scale = float(np.abs(host, dtype=np.float64).sum() if host.size < 2**28 else
                sum(np.abs(host[i], dtype=np.float64).sum() for i in range(shape[0])))
  sums = {}
  for mesh_shape in MESHES:
    sharder = sharding.Sharder(sharding.make_mesh(mesh_shape))
    x = jax.device_put(host, sharder.named((None, 'embed', 'mlp')))  # w_up's logical axes.
    sums[mesh_shape] = np.asarray(checkpoint.fingerprint({'w': x}), np.float64)[0]
    del x
  base = sums[MESHES[0]]
  print(f'leaf {shape} ({host.size / 1e6:.0f}M floats), sum|x| = {scale:.6g}')
  print(f'{"mesh":>10} {"sum":>16} {"weighted sum":>16} {"|d sum|":>10} {"|d wsum|":>10} {"rel d":>9} '
        f'{"|d|/sum|x|":>11} {"passes":>7}')
  for mesh_shape, s in sums.items():
    d = np.abs(s - base)
    rel = d / np.maximum(np.abs(base), 1e-30)
    ok = checkpoint._fingerprint_matches(base[None], s[None], same_mesh=False)  # pylint: disable=protected-access
    print(f'{"x".join(map(str, mesh_shape)):>10} {s[0]:16.8g} {s[1]:16.8g} {d[0]:10.3g} {d[1]:10.3g} '
          f'{rel.max():9.2g} {d.max() / scale:11.3g} {str(ok):>7}')


def _on_tpu(args):
  from tmdm.config import loader  # pylint: disable=import-outside-toplevel
  from tmdm.tools import compile_check  # pylint: disable=import-outside-toplevel
  from tmdm.training import state as train_state  # pylint: disable=import-outside-toplevel
  data, fsdp, tensor = (int(x) for x in args.mesh.split(','))
  cfg = loader.load(args.config, [f'--config.mesh.data={data}', f'--config.mesh.fsdp={fsdp}',
                                  f'--config.mesh.tensor={tensor}'])
  s = compile_check.setup_for(cfg, compile_check.topology_devices(args.topology))
  abstract = train_state.abstract_state(s.model, s.tx, s.sharder, s.seq_len)
  m = jax.jit(checkpoint.fingerprint).lower(abstract).compile().memory_analysis()
  gib = lambda n: n / 2**30
  print(f'fingerprint of {args.config} on {args.topology} mesh {args.mesh}: arguments '
        f'{gib(m.argument_size_in_bytes):.3f} GiB, temporaries {gib(m.temp_size_in_bytes) * 1024:.1f} MiB, '
        f'output {m.output_size_in_bytes} B per chip')


if __name__ == '__main__':
  main(sys.argv[1:])
