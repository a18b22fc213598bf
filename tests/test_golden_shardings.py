"""Golden sharding dumps: the train state's PartitionSpecs on each test mesh, compared with
tests/golden/shardings.json. A change to the sharding rules or to a weight's logical axes shows up as
a reviewable diff of that file; regenerate it with

  TMDM_UPDATE_GOLDEN=1 python -m pytest tests/test_golden_shardings.py
"""

import json
import os

import jax
from tmdm.parallel import mesh as mesh_lib, sharding
from tmdm.training import setup as setup_lib, state as train_state
from helpers import REPO, tiny_config

GOLDEN = os.path.join(REPO, 'tests', 'golden', 'shardings.json')
MESHES = ((1, 8, 1), (2, 2, 2), (2, 1, 4), (8, 1, 1))


def _specs(mesh_shape, rules=sharding.RULES) -> dict:
  cfg = tiny_config()
  cfg.optim.ema = 0.99  # The weight EMA's slots are sharded like the parameters.
  sharder = sharding.Sharder(sharding.make_mesh(mesh_shape), rules=rules)
  s = setup_lib.from_parts(cfg, mesh_lib.MeshShape(*mesh_shape), sharder)
  tx = setup_lib.optimizer(cfg, s.model_cfg, setup_lib.sde_plan(cfg))
  shardings = train_state.state_shardings(s.model, tx, sharder, s.seq_len)
  flat = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]
  return {jax.tree_util.keystr(path): str(tuple(sh.spec)) for path, sh in flat
          if isinstance(sh, jax.sharding.NamedSharding)}


def _dump() -> dict:
  return {'x'.join(map(str, m)): _specs(m) for m in MESHES}


def test_state_shardings_match_the_golden_file():
  now = _dump()
  if os.environ.get('TMDM_UPDATE_GOLDEN'):
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with open(GOLDEN, 'w', encoding='utf-8') as f:
      json.dump(now, f, indent=1, sort_keys=True)
      f.write('\n')
  with open(GOLDEN, encoding='utf-8') as f:
    golden = json.load(f)
  for mesh, specs in golden.items():
    assert mesh in now, f'mesh {mesh} is no longer dumped'
    changed = {k: (v, now[mesh].get(k)) for k, v in specs.items() if now[mesh].get(k) != v}
    added = sorted(set(now[mesh]) - set(specs))
    assert not changed and not added, (f'mesh {mesh}: shardings changed {changed} added {added}; if intended, '
                                       'regenerate with TMDM_UPDATE_GOLDEN=1 and review the diff')


def test_the_dump_sees_a_changed_rule():
  """Another rule table changes the dump (so the golden comparison can fail)."""
  replicated = tuple((name, None) for name, _ in sharding.RULES)
  assert _specs((2, 2, 2), rules=replicated) != _specs((2, 2, 2))
