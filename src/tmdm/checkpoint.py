"""Orbax checkpoints of the train state, the data-iterator state and the resolved config.

Each step folder holds three items: `state` (the sharded TrainState, restorable onto any mesh
through a target with new shardings), `data` (one JSON file per process: that process's Grain
iterator state) and `config` (the resolved config, JSON). Saves are asynchronous by default; Orbax
writes into a temporary folder and renames it when complete, so a partial save is never listed.
"""

import dataclasses
import json
from typing import Any

import jax
import orbax.checkpoint as ocp


class DataStateHandler(ocp.CheckpointHandler):
  """Writes each process's data-iterator state (a JSON-able value) to its own file."""

  @staticmethod
  def _file(directory):
    return directory / f'process_{jax.process_index()}-of-{jax.process_count()}.json'

  def save(self, directory, args: 'DataStateSave'):
    self._file(directory).write_text(json.dumps(args.state))

  def restore(self, directory, args: 'DataStateRestore' = None):
    del args
    path = self._file(directory)
    if not path.exists():
      found = sorted(p.name for p in directory.iterdir())
      raise FileNotFoundError(f'no data-iterator state {path.name} in {directory} (found {found}); '
                              'was the checkpoint written by a different number of processes?')
    return json.loads(path.read_text())


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


class Checkpointer:
  """The loop's view of Orbax: save(step, ...), latest_step(), restore(step, target)."""

  def __init__(self, directory, *, keep: int, async_save: bool):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(directory, item_names=('state', 'data', 'config'), options=options)

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, data_state, config: dict) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=DataStateSave(data_state),
                              config=ocp.args.JsonSave(config))
    return self.manager.save(step, args=args, force=True)

  def restore(self, step: int, abstract_state):
    """abstract_state: ShapeDtypeStructs with the target shardings (any mesh)."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=DataStateRestore(),
                              config=ocp.args.JsonRestore())
    out = self.manager.restore(step, args=args)
    return out['state'], out['data'], out['config']

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
