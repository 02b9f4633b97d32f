"""One process of tests/test_multihost.py: joins a run of PROCESSES processes with 4 CPU devices
each, loads the model with a layout over all their devices and saves the logits of the golden
prompts. Usage: multihost_worker.py COORDINATOR PROCESSES PROCESS_ID LAYOUT OUT.npz"""

import os
import pathlib
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from meshserve.models import load_model  # noqa: E402
from meshserve.sharding import distributed  # noqa: E402

GOLDEN = pathlib.Path(__file__).parent / "data" / "smollm2_135m_instruct.npz"


def main(coordinator: str, processes: str, process_id: str, layout: str, out: str) -> None:
  assert distributed.initialize(coordinator, int(processes), int(process_id))
  assert jax.local_device_count() == 4 and jax.device_count() == 4 * int(processes)
  model = load_model(layout=layout)
  w_gate = model.state["w_gate"].get_value()
  assert not w_gate.is_fully_addressable  # the layout spans both processes
  golden = np.load(GOLDEN)
  logits = {str(i): model.logits(golden[f"{i}_ids"]) for i in range(int(golden["n"]))}
  np.savez(out, **logits, shard_shape=np.array(w_gate.addressable_shards[0].data.shape))


if __name__ == "__main__":
  main(*sys.argv[1:])
