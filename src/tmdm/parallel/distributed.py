"""Multi-process start-up on JAX's own distributed runtime.

`initialize` runs before anything touches devices:
  - explicit: coordinator address, process count and id (flags or TMDM_COORDINATOR,
    TMDM_NUM_PROCESSES, TMDM_PROCESS_ID), e.g. several processes on one machine or a custom cluster;
  - detected: TPU pods and SLURM jobs (JAX's cluster detection fills everything in), or
    JAX_COORDINATOR_ADDRESS set by another launcher;
  - otherwise a single process (nothing to do).
On CPU, cross-process collectives go through gloo.
"""

import logging
import os

import jax

log = logging.getLogger('tmdm')


def _detected() -> bool:
  slurm = int(os.environ.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_JOB_ID' in os.environ
  tpu_pod = bool(os.environ.get('TPU_WORKER_HOSTNAMES', '').count(',')) or 'MEGASCALE_COORDINATOR_ADDRESS' in os.environ
  return slurm or tpu_pod or 'JAX_COORDINATOR_ADDRESS' in os.environ


def initialize(coordinator: str = '', num_processes: int = 0, process_id: int = -1) -> bool:
  """Returns True when a multi-process runtime was started."""
  coordinator = coordinator or os.environ.get('TMDM_COORDINATOR', '')
  num_processes = num_processes or int(os.environ.get('TMDM_NUM_PROCESSES', '0'))
  process_id = process_id if process_id >= 0 else int(os.environ.get('TMDM_PROCESS_ID', '-1'))
  if not coordinator and not _detected():
    return False
  if os.environ.get('JAX_PLATFORMS', '') == 'cpu' or not coordinator and jax.config.jax_platforms == 'cpu':
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if coordinator:
    if num_processes < 1 or process_id < 0:
      raise ValueError('--coordinator needs --num_processes and --process_id')
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
  else:
    jax.distributed.initialize()
  log.info('process %d of %d, %d local / %d global devices', jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())
  return True
