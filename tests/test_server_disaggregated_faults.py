"""The router over its workers when things go wrong: a hung, a paused and a killed worker, hand-offs
that would hurt a decode worker (malformed, fuzzed, never released), and a clean SIGTERM. On the
session's router topology (tests/conftest.py), after test_server_disaggregated.py."""

import asyncio
import os
import pathlib
import random
import re
import signal
import time

import grpc
import pytest
from serving import Server, collect, model_info, read_all
from topologies import (
  ENGINE,
  HANDOFF_TIMEOUT,
  assert_sigterm_stops_every_process_cleanly,
  health,
  wait_every_stage_idle,
  wait_for,
)

from meshserve.engine import SamplingParams
from meshserve.engine.config import bucket
from meshserve.server.proto.meshserve.v1 import inference_pb2 as pb
from meshserve.server.proto.meshserve.v1 import inference_pb2_grpc, stages_pb2_grpc
from meshserve.server.proto.meshserve.v1 import stages_pb2 as spb

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def topology(router_topology):
  return router_topology


def test_the_router_process_loads_no_jax(topology, stub):
  """The router holds no model: serving, its process has mapped no jaxlib (nor libtpu) library,
  which any `import jax` would load."""
  stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)  # it has routed a call
  maps = pathlib.Path(f"/proc/{topology.endpoint.proc.pid}/maps").read_text()
  assert "libpython" in maps or "python" in maps  # the file is readable and says something
  assert not [line for line in maps.splitlines() if "jaxlib" in line or "libtpu" in line]


def test_a_hung_worker_is_found_in_seconds_and_routing_resumes(topology, stub, offline):
  decode = topology.workers["decode"]

  async def stream_then_hang():
    async with grpc.aio.insecure_channel(topology.endpoint.address) as channel:
      stub_aio = inference_pb2_grpc.InferenceStub(channel)
      request = pb.GenerateRequest(
        text="Count:", sampling=pb.SamplingParams(max_tokens=200, ignore_eos=True)
      )
      call = stub_aio.Generate(request, timeout=60)
      await call.read()
      await call.read()  # decoding on the decode worker now
      decode.proc.send_signal(signal.SIGSTOP)
      hung_at = time.monotonic()
      with pytest.raises(grpc.aio.AioRpcError) as e:
        async for _ in read_all(call):
          pass
      return e.value, time.monotonic() - hung_at

  try:
    error, seconds = asyncio.run(stream_then_hang())
    assert error.code() == grpc.StatusCode.UNAVAILABLE and decode.address in error.details()
    assert seconds < 6
    wait_for(lambda: health(topology.endpoint) == "NOT_SERVING", 5, "NOT_SERVING")
    with pytest.raises(grpc.RpcError) as e:
      collect(stub, pb.GenerateRequest(text="Hi"))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no healthy decode worker" in e.value.details()
  finally:
    decode.proc.send_signal(signal.SIGCONT)
  wait_for(lambda: health(topology.endpoint) == "SERVING", 10, "SERVING again")
  ids, _, _ = collect(stub, pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(max_tokens=8)))
  assert ids == offline.generate("Hi", SamplingParams(max_tokens=8))[0].token_ids
  wait_every_stage_idle(stub)  # the hung worker freed the request's pages once it woke


def test_a_worker_that_pauses_for_a_missed_health_check_keeps_its_streams(topology, offline):
  """SIGSTOP for 1.5 s, then SIGCONT: the router's checks go unanswered once or twice, which
  is not enough to call the worker down, and the stream completes with the offline tokens."""
  decode = topology.workers["decode"]
  params = SamplingParams(max_tokens=40, ignore_eos=True)

  async def pause_mid_stream():
    async with grpc.aio.insecure_channel(topology.endpoint.address) as channel:
      request = pb.GenerateRequest(
        text="Count:", sampling=pb.SamplingParams(max_tokens=40, ignore_eos=True)
      )
      call = inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=60)
      ids = list((await call.read()).token_ids) + list((await call.read()).token_ids)
      decode.proc.send_signal(signal.SIGSTOP)
      try:
        await asyncio.sleep(1.5)
      finally:
        decode.proc.send_signal(signal.SIGCONT)
      async for response in read_all(call):
        ids += response.token_ids
      return ids

  ids = asyncio.run(pause_mid_stream())
  assert ids == offline.generate("Count:", params)[0].token_ids
  assert health(topology.endpoint) == "SERVING"


def test_a_killed_worker_fails_its_requests_and_a_restarted_one_is_used(topology, stub, offline):
  prefill = topology.workers["prefill"]
  prefill.proc.kill()
  prefill.proc.wait(30)
  wait_for(lambda: health(topology.endpoint) == "NOT_SERVING", 5, "NOT_SERVING")
  with pytest.raises(grpc.RpcError) as e:
    collect(stub, pb.GenerateRequest(text="Hi"))
  assert e.value.code() == grpc.StatusCode.UNAVAILABLE
  prefill.stop()
  topology.workers["prefill"] = again = Server(
    "--role", "prefill", "--handoff-timeout", str(HANDOFF_TIMEOUT),
    log=topology.logs / "prefill-again.log", cache=topology.cache, port=prefill.port,
  )  # fmt: skip
  again.wait_serving()
  wait_for(lambda: health(topology.endpoint) == "SERVING", 10, "SERVING again")
  ids, _, _ = collect(stub, pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(max_tokens=8)))
  assert ids == offline.generate("Hi", SamplingParams(max_tokens=8))[0].token_ids


def test_a_killed_decode_worker_ends_its_streams_in_seconds(topology, stub, offline):
  """SIGKILL mid-stream: the stream ends UNAVAILABLE within 5 s; a worker restarted on the
  same port is used again."""
  decode = topology.workers["decode"]

  async def stream_then_kill():
    async with grpc.aio.insecure_channel(topology.endpoint.address) as channel:
      request = pb.GenerateRequest(
        text="Count:", sampling=pb.SamplingParams(max_tokens=200, ignore_eos=True)
      )
      call = inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=60)
      await call.read()
      await call.read()  # decoding on the decode worker now
      decode.proc.kill()
      killed_at = time.monotonic()
      with pytest.raises(grpc.aio.AioRpcError) as e:
        async for _ in read_all(call):
          pass
      return e.value, time.monotonic() - killed_at

  error, seconds = asyncio.run(stream_then_kill())
  assert error.code() == grpc.StatusCode.UNAVAILABLE, error
  assert seconds < 5
  decode.stop()
  topology.workers["decode"] = again = Server(
    "--role", "decode", "--cpu-devices", "2", "--layout", "tp=2",
    log=topology.logs / "decode-again.log", cache=topology.cache, port=decode.port,
  )  # fmt: skip
  again.wait_serving()
  wait_for(lambda: health(topology.endpoint) == "SERVING", 10, "SERVING again")
  ids, _, _ = collect(stub, pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(max_tokens=8)))
  assert ids == offline.generate("Hi", SamplingParams(max_tokens=8))[0].token_ids


def valid_handoff(model, kv_shards: int) -> spb.Handoff:
  """A hand-off that the decode worker would accept (then dial its transfer address): what
  the attacks below mutate."""
  cfg = model.config
  pages = bucket(1, ENGINE.page_buckets)  # a 5-token prompt's page bucket
  return spb.Handoff(
    transfer_address="127.0.0.1:9", transfer_id=1, dtype="float32", num_pieces=kv_shards,
    piece_shape=[2, cfg.num_layers, pages, ENGINE.page_size, cfg.num_kv_heads // kv_shards,
                 cfg.head_dim],
    prompt_token_ids=[1, 2, 3, 4, 5], output_token_ids=[6],
    sampling=pb.SamplingParams(max_tokens=8), seed=1,
  )  # fmt: skip


def decode_call(worker: Server, handoff: spb.Handoff) -> grpc.RpcError:
  with worker.channel() as channel:
    stage = stages_pb2_grpc.StageWorkerStub(channel)
    with pytest.raises(grpc.RpcError) as e:
      list(stage.Decode(spb.DecodeRequest(handoff=handoff), timeout=30))
  return e.value


def kv_shards(worker: Server) -> int:
  with worker.channel() as channel:
    return stages_pb2_grpc.StageWorkerStub(channel).Describe(spb.DescribeRequest()).kv_shards


def test_a_hand_off_that_would_kill_the_decode_worker_is_refused(topology, stub, offline, model):
  """A seed past uint32 once killed the decode engine for good, and an empty output left a
  request nobody could schedule: each is INVALID_ARGUMENT naming the field, and the worker
  serves the next request."""
  worker = topology.workers["decode"]
  base = valid_handoff(model, kv_shards(worker))
  for field, value in [("seed", 2**40), ("output_token_ids", [])]:
    handoff = spb.Handoff()
    handoff.CopyFrom(base)
    if isinstance(value, list):
      handoff.ClearField(field)
    else:
      setattr(handoff, field, value)
    error = decode_call(worker, handoff)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.details().startswith(f"handoff.{field}:"), error.details()
  ids, _, _ = collect(stub, pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(max_tokens=8)))
  assert ids == offline.generate("Hi", SamplingParams(max_tokens=8))[0].token_ids
  assert health(worker) == "SERVING"


def _mutations(rng: random.Random, vocab: int):
  """(field as the error names it, a function that breaks it in a Handoff)."""

  def setter(name, values):
    return name, lambda h: setattr(h, name, rng.choice(values))

  def ids(name, values):
    def apply(h):
      h.ClearField(name)
      getattr(h, name).extend(rng.choice(values))

    return name, apply

  return [
    setter("seed", [2**32, 2**32 + rng.randrange(2**40), 2**64 - 1]),
    ids("output_token_ids", [[], [vocab], [-1], [vocab + 10**6], [6] * 8]),
    ids("prompt_token_ids", [[], [vocab], [-7], [1] * 300]),
    setter("dtype", ["", "float64", "int8", "bogus", "bfloat16", "x" * 1000]),
    setter("num_pieces", [0, -1, 2, 7, 2**31 - 1]),
    ids("piece_shape", [[], [1], [2, 30, 1, 16, 3, 65], [-1] * 6, [2**40] * 6]),
    setter("transfer_address", ["", "nohost", "h:0", "h:99999", "a b:1", "x" * 300, "[::1]"]),
    setter("num_cached_tokens", [-1, 6, 2**31 - 1]),
    ("sampling.top_p", lambda h: setattr(h.sampling, "top_p", rng.choice([0.0, 1.5, -1.0]))),
    ("sampling.max_tokens", lambda h: setattr(h.sampling, "max_tokens", rng.choice([0, -4]))),
    ("sampling.stop", lambda h: h.sampling.stop.extend(["x"] * 17)),
  ]


def test_fuzzed_hand_offs_never_hurt_the_decode_worker(topology, stub, offline, model):
  """Thousands of hand-offs, each with one to three fields broken at random: every one gets
  INVALID_ARGUMENT naming a broken field, the worker stays up, and every page is free."""
  worker, rng = topology.workers["decode"], random.Random(23)
  base = valid_handoff(model, kv_shards(worker))
  mutations = _mutations(rng, model.config.vocab_size)
  with worker.channel() as channel:
    stage = stages_pb2_grpc.StageWorkerStub(channel)
    for _ in range(2000):
      handoff = spb.Handoff()
      handoff.CopyFrom(base)
      broken = rng.sample(mutations, rng.randint(1, 3))
      for _, apply in broken:
        apply(handoff)
      with pytest.raises(grpc.RpcError) as e:
        list(stage.Decode(spb.DecodeRequest(handoff=handoff), timeout=30))
      assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.value, handoff)
      named = re.match(r"handoff\.([\w.]+)", e.value.details())[1]
      assert named in {field for field, _ in broken}, (e.value.details(), broken)
  assert health(worker) == "SERVING"
  wait_every_stage_idle(stub)
  ids, _, _ = collect(stub, pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(max_tokens=8)))
  assert ids == offline.generate("Hi", SamplingParams(max_tokens=8))[0].token_ids


def cpu_seconds(pid: int) -> float:
  """The process's CPU time so far (user + system), from /proc."""
  fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _responses(call) -> list:
  return [response async for response in call]


def test_hand_offs_nobody_releases_time_out_and_their_pages_come_back(topology, stub, offline):
  """Eight Prefill streams that take their hand-off and never release it hold almost the whole
  prefill pool. A ninth request waits, and the worker sleeps meanwhile (under 10% of a core,
  read from its CPU time); at --handoff-timeout the eight end DEADLINE_EXCEEDED, the ninth is
  served, and every page is back."""
  worker = topology.workers["prefill"]

  def prompt(i: int) -> list[int]:  # 15 pages of 16 each, shared with no other prompt
    return list(range(1000 + 300 * i, 1000 + 300 * i + 230))

  async def hold(stage, i: int, handed: asyncio.Event) -> str:
    call = stage.Prefill(timeout=60)
    request = pb.GenerateRequest(token_ids=prompt(i), sampling=pb.SamplingParams(max_tokens=8))
    await call.write(spb.PrefillMessage(request=spb.PrefillRequest(request=request, kv_shards=1)))
    try:
      while (event := await call.read()) != grpc.aio.EOF:
        if event.HasField("handoff"):
          handed.set()
      return "ended"
    except grpc.aio.AioRpcError as e:
      assert "--handoff-timeout" in e.details(), e
      return e.code().name

  async def main():
    async with (
      grpc.aio.insecure_channel(worker.address) as w,
      grpc.aio.insecure_channel(topology.endpoint.address) as r,
    ):
      stage = stages_pb2_grpc.StageWorkerStub(w)
      handed = [asyncio.Event() for _ in range(8)]
      held = [asyncio.create_task(hold(stage, i, handed[i])) for i in range(8)]
      for event in handed:
        await asyncio.wait_for(event.wait(), 60)
      start = time.monotonic()
      call = inference_pb2_grpc.InferenceStub(r).Generate(
        pb.GenerateRequest(token_ids=prompt(8), sampling=pb.SamplingParams(max_tokens=4)),
        timeout=60,
      )
      ninth = asyncio.create_task(_responses(call))
      await asyncio.sleep(0.5)
      assert not ninth.done()  # no room in the prefill pool
      with worker.channel() as channel:
        stats = model_info(worker.stub(channel)).stages[0].stats
      # The quietest of up to five 1-second windows: work the eight left behind (slow on a
      # loaded machine) may still end in the first; a worker that spins is busy in all five.
      cpu = float("inf")
      for _ in range(5):
        before = cpu_seconds(worker.proc.pid)
        await asyncio.sleep(1.0)
        cpu = min(cpu, cpu_seconds(worker.proc.pid) - before)
        if cpu < 0.1:
          break
      outcomes = await asyncio.gather(*held)
      responses = await ninth
      return stats, cpu, outcomes, responses, time.monotonic() - start

  stats, cpu, outcomes, responses, waited = asyncio.run(main())
  assert (stats.pinned, stats.running, stats.waiting) == (8, 0, 1), stats
  assert cpu < 0.1, f"the waiting worker used {cpu:.2f} s of CPU in each of five seconds"
  assert outcomes == ["DEADLINE_EXCEEDED"] * 8
  assert responses[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
  assert waited < HANDOFF_TIMEOUT + 30
  wait_every_stage_idle(stub)


def test_a_worker_refuses_public_generate(topology):
  worker = topology.workers["decode"]
  with worker.channel() as channel, pytest.raises(grpc.RpcError) as e:
    collect(worker.stub(channel), pb.GenerateRequest(text="Hi"))
  assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
  assert "router" in e.value.details()


def test_sigterm_stops_every_process_cleanly(topology):
  assert_sigterm_stops_every_process_cleanly(topology)
