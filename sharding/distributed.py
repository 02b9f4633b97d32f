"""Multi-process (multi-host) start-up: every process runs the same program on its own devices.

After `initialize`, `jax.devices()` lists the devices of all processes, so `Layout.make_mesh`
builds one global mesh, and `sharding.put` makes each process supply only its own shards.
On CPU, jax's default cross-process collectives (gloo) carry the all-reduces.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

ENV_COORDINATOR = "MESHSERVE_COORDINATOR_ADDRESS"  # host:port of process 0
ENV_NUM_PROCESSES = "MESHSERVE_NUM_PROCESSES"
ENV_PROCESS_ID = "MESHSERVE_PROCESS_ID"


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None:
    return None
  if not value.isdigit():
    raise ValueError(f"{name}: expected a non-negative integer, got {value!r}")
  return int(value)


HEARTBEAT_TIMEOUT_S = 30
SHUTDOWN_TIMEOUT_S = 20


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  auto: bool = False,
) -> bool:
  """Joins this process to a multi-process run; True when it did.

  Arguments left None come from MESHSERVE_COORDINATOR_ADDRESS, MESHSERVE_NUM_PROCESSES and
  MESHSERVE_PROCESS_ID. With none of them set (or one process) this is a no-op, unless `auto`:
  then jax detects the cluster itself (Cloud TPU VM pod slices, Slurm, Open MPI). Call it
  before anything touches a jax device.
  """
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
  num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
  if not auto and (num_processes or 1) == 1:
    return False
  if not auto and (coordinator_address is None or process_id is None):
    raise ValueError(
      f"multi-process run of {num_processes}: give the coordinator address and this process's id"
      f" (--coordinator-address/--process-id or {ENV_COORDINATOR}/{ENV_PROCESS_ID})"
    )
  # A process whose peers are gone waits this long, not jax's 5 minutes, at its exit's barrier;
  # one whose coordinator is gone is stopped after the heartbeat timeout, not 100 s.
  jax.distributed.initialize(
    coordinator_address, num_processes, process_id, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
    shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S,
  )  # fmt: skip
  log.info(
    "process %d of %d: %d local, %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return True
