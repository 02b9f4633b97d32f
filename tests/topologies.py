"""The serving topologies the server tests start: a router in front of a prefill worker (one
device) and a decode worker (tp=2), the KV crossing between processes by
jax.experimental.transfer; and helpers to wait on them."""

import time

import pytest
from serving import Server, model_info

from meshserve.engine import LLM, EngineConfig
from meshserve.server.proto.meshserve.v1 import inference_pb2 as pb

ENGINE = EngineConfig(max_model_len=256, max_batch=8, num_pages=128, max_num_batched_tokens=32)
HANDOFF_TIMEOUT = 15  # seconds the prefill worker holds a hand-off's pages (8 prefills fit)


class Topology:
  def __init__(self, endpoint: Server, workers: dict[str, Server]):
    self.endpoint, self.workers = endpoint, workers

  def stop(self):
    for s in (self.endpoint, *self.workers.values()):
      s.stop()


def start_router_topology(logs, cache, prefill_port=None) -> Topology:
  workers = {
    "prefill": Server(
      "--role",
      "prefill",
      "--handoff-timeout",
      str(HANDOFF_TIMEOUT),
      log=logs / "prefill.log",
      cache=cache,
      port=prefill_port,
    ),  # fmt: skip
    "decode": Server(
      "--role",
      "decode",
      "--cpu-devices",
      "2",
      "--layout",
      "tp=2",
      log=logs / "decode.log",
      cache=cache,
    ),  # fmt: skip
  }
  router = Server(
    "--role", "router", "--prefill", workers["prefill"].address,
    "--decode", workers["decode"].address, log=logs / "router.log", cache=cache,
  )  # fmt: skip
  return Topology(router, workers)


def start(topology: Topology) -> Topology:
  """Waits (bounded) until every process of `topology` is SERVING."""
  for w in topology.workers.values():
    w.wait_serving()
  topology.endpoint.wait_serving(timeout=120)
  return topology


def wait_every_stage_idle(stub, timeout: float = 30.0) -> list[pb.Stage]:
  """Polls (bounded) until every stage has all its pages free and nothing in flight."""
  deadline = time.monotonic() + timeout
  while True:
    stages = model_info(stub).stages
    if all(
      s.stats.free_kv_pages == s.stats.total_kv_pages
      and s.stats.running == s.stats.waiting == s.stats.pinned == s.stats.importing == 0
      for s in stages
    ):
      return stages
    if time.monotonic() > deadline:
      pytest.fail(f"pages not returned after {timeout}s: {stages}")
    time.sleep(0.2)


def health(server: Server) -> str:
  with server.channel() as channel:
    return server.health(channel)


def wait_for(predicate, timeout: float, what: str):
  deadline = time.monotonic() + timeout
  while not predicate():
    if time.monotonic() > deadline:
      pytest.fail(f"not {what} after {timeout}s")
    time.sleep(0.1)


def assert_sigterm_stops_every_process_cleanly(topology: Topology) -> None:
  for server in (topology.endpoint, *topology.workers.values()):
    assert server.terminate() == 0, server.output()


# Fixtures of the files that test a topology (each defines `topology`); they import these.
@pytest.fixture(scope="module")
def stub(topology):
  with topology.endpoint.channel() as channel:
    yield topology.endpoint.stub(channel)


@pytest.fixture(scope="module")
def offline(model):
  """The offline engine on the servers' engine shape: the reference outputs."""
  return LLM(model, ENGINE)
