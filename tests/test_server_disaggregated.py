"""Disaggregated serving over gRPC, in both topologies a user can start:

- "one process": `serve --mode disaggregated --cpu-devices 8 --prefill-layout tp=2
  --decode-layout tp=4`, the KV crossing by jax.device_put;
- "router": `serve --role router` in front of a `--role prefill` worker (one device) and a
  `--role decode` worker (tp=2), the KV crossing between processes by
  jax.experimental.transfer.

Each topology gives the offline engine's tokens, reports its stages, and returns every page
after 50 random cancels and deadlines. The router's faults (hung, killed and paused workers,
bad hand-offs): test_server_disaggregated_faults.py.
"""

import asyncio
import functools
import random
import urllib.request

import grpc
import pytest
from conftest import assert_greedy_equal
from constraints import BAD, KINDS, PROMPT, grpcurl
from serving import Server, collect, model_info, self_signed_cert
from topologies import (
  Topology,
  assert_sigterm_stops_every_process_cleanly,
  start,
  wait_every_stage_idle,
)

from meshserve.engine import SamplingParams
from meshserve.server.proto.meshserve.v1 import inference_pb2 as pb
from meshserve.server.proto.meshserve.v1 import inference_pb2_grpc, stages_pb2_grpc
from meshserve.server.proto.meshserve.v1 import stages_pb2 as spb

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["one process", "router"])
def topology(request, tmp_path_factory, compilation_cache):
  """ "router" is the session's router topology (tests/conftest.py), which
  test_server_disaggregated_faults.py goes on to use, then stops."""
  if request.param == "router":
    yield request.getfixturevalue("router_topology")
    return
  logs = tmp_path_factory.mktemp("disaggregated")
  t = Topology(
    Server(
      "--mode", "disaggregated", "--cpu-devices", "8", "--prefill-layout", "tp=2",
      "--decode-layout", "tp=4", log=logs / "server.log", cache=compilation_cache,
    ),
    {},
  )  # fmt: skip
  t.name, t.logs, t.cache = request.param, logs, compilation_cache
  try:
    yield start(t)
  finally:
    t.stop()


def test_golden_prompts_equal_offline_outputs_greedy_and_seeded(stub, offline, golden, model):
  seeded = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=1234)
  for i in range(golden.n):
    case = golden.case(i)
    prompt = case["ids"].tolist()
    n = len(case["greedy"])
    want = offline.generate(prompt, SamplingParams(max_tokens=n))[0]
    request = pb.GenerateRequest(token_ids=prompt, sampling=pb.SamplingParams(max_tokens=n))
    ids, text, last = collect(stub, request)
    assert_greedy_equal(model, prompt, want.token_ids, ids)
    assert_greedy_equal(model, prompt, case["greedy"].tolist(), ids)
    if ids == want.token_ids:
      assert text == want.text
    assert last.usage.prompt_tokens == len(prompt) and last.usage.completion_tokens == len(ids)
    t = last.timing
    assert t.transfer_s > 0 and t.decode_s > 0
    parts = t.time_to_first_token_s + t.transfer_s + t.decode_s
    assert (
      abs(t.total_s - parts) < 1e-3
      and abs(t.queue_s + t.prefill_s - t.time_to_first_token_s) < 1e-3
    )

    want = offline.generate(prompt, seeded)[0]
    sampling = pb.SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=1234)
    ids, text, _ = collect(stub, pb.GenerateRequest(token_ids=prompt, sampling=sampling))
    assert (ids, text) == (want.token_ids, want.text)


def test_chat_and_stop_strings_cross_the_hand_off(stub, offline, golden):
  i = golden.chat_cases()[0]
  messages = golden.messages(i)
  params = SamplingParams(max_tokens=24, stop=(" the",))
  want = offline.chat([messages], params)[0]
  chat = [pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages]
  sampling = pb.SamplingParams(max_tokens=24, stop=[" the"])
  ids, text, last = collect(stub, pb.GenerateRequest(messages=chat, sampling=sampling))
  assert (ids, text) == (want.token_ids, want.text)
  assert list(stub.Tokenize(pb.TokenizeRequest(messages=chat), timeout=10).token_ids) == (
    golden.case(i)["ids"].tolist()
  )


def test_bad_input_gets_invalid_argument_naming_the_field(stub):
  for request, field in [
    (pb.GenerateRequest(), "input"),
    (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(top_p=2.0)), "sampling.top_p"),
    (pb.GenerateRequest(token_ids=[1, 10**6]), "token_ids"),
  ]:
    with pytest.raises(grpc.RpcError) as e:
      collect(stub, request)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(field), e.value.details()


def test_model_info_and_metrics_show_each_stage(topology, stub):
  info = model_info(stub)
  assert [s.role for s in info.stages] == ["prefill", "decode"]
  prefill, decode = info.stages
  assert decode.stats.kv_transfers > 0 and decode.stats.kv_transfer_bytes > 0
  assert decode.stats.kv_transfer_seconds > 0
  if topology.name == "router":
    assert (prefill.address, decode.address) == (
      topology.workers["prefill"].address,
      topology.workers["decode"].address,
    )
    assert prefill.healthy and decode.healthy
    assert info.layout == "prefill single device, decode tp=2" and info.num_devices == 3
  else:
    assert info.layout == "prefill tp=2, decode tp=4" and info.num_devices == 6
  url = f"http://127.0.0.1:{topology.endpoint.metrics_port}/metrics"
  text = urllib.request.urlopen(url, timeout=10).read().decode()
  assert "meshserve_kv_transfers_total{stage=" in text
  assert "meshserve_kv_transfer_seconds_count" in text


def test_every_constraint_kind_through_grpcurl_crosses_the_hand_off(topology, stub):
  """Each kind of the `constraint` oneof, in a JSON request through grpcurl: the prefill stage
  picks the first token under the constraint and the decode stage rebuilds its matcher from
  the tokens, so the whole output is valid and ends with STOP. One that does not compile gets
  InvalidArgument naming its field. Nothing compiles in either stage."""
  compilations = [s.stats.compilations for s in model_info(stub).stages]
  generate = functools.partial(
    grpcurl, topology.endpoint.address, "meshserve.v1.Inference/Generate"
  )
  for oneof, _, valid in KINDS:
    responses, stderr, status = generate({"text": PROMPT, "sampling": {"max_tokens": 160, **oneof}})
    assert status == 0, stderr
    text = "".join(r.get("text", "") for r in responses)
    last = responses[-1]
    assert last.get("finish_reason") == "FINISH_REASON_STOP", responses
    assert last["usage"]["completion_tokens"] > 1 and valid(text), (oneof, text)
  for oneof, message in BAD:
    _, stderr, status = generate({"text": PROMPT, "sampling": oneof})
    assert status != 0 and "Code: InvalidArgument" in stderr, stderr
    assert f"Message: {message}" in stderr, stderr
  assert [s.stats.compilations for s in model_info(stub).stages] == compilations


def test_50_cancels_and_deadlines_at_random_points_return_every_page(stub, topology, offline):
  rng = random.Random(1)

  async def one(stub_aio, i: int) -> str:
    request = pb.GenerateRequest(
      text=f"Story number {i}: once upon a time" + " there" * rng.randrange(0, 60),
      sampling=pb.SamplingParams(max_tokens=rng.randrange(2, 60)),
    )
    if i % 2:  # a deadline that passes somewhere between queueing and decoding
      try:
        async for _ in stub_aio.Generate(request, timeout=rng.uniform(0.02, 3.0)):
          pass
      except grpc.aio.AioRpcError as e:
        assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e
        return "deadline"
      return "done"
    call = stub_aio.Generate(request, timeout=120)
    cut = rng.randrange(0, 4)  # 0: right after the first token, as the KV leaves
    k = 0
    async for _ in call:
      if k >= cut:
        call.cancel()
        return "cancelled"
      k += 1
    return "done"

  async def main():
    async with grpc.aio.insecure_channel(topology.endpoint.address) as channel:
      stub_aio = inference_pb2_grpc.InferenceStub(channel)
      return await asyncio.gather(*(one(stub_aio, i) for i in range(50)))

  outcomes = asyncio.run(main())
  # How many deadlines pass before their request is done depends on the machine's speed: not
  # asserted. Each cancel is made by the client after a set number of responses.
  assert outcomes.count("cancelled") > 10, outcomes
  wait_every_stage_idle(stub)
  ids, _, _ = collect(stub, pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(max_tokens=8)))
  assert ids == offline.generate("Hi", SamplingParams(max_tokens=8))[0].token_ids


@pytest.mark.parametrize("topology", ["one process"], indirect=True)
def test_sigterm_stops_every_process_cleanly(topology):
  assert_sigterm_stops_every_process_cleanly(topology)  # the router's: the faults file's last


def test_a_router_calls_its_workers_over_tls_with_the_internal_token(
  tmp_path, compilation_cache, offline
):
  """Every process with TLS and both tokens: a client with the public token is served
  through the router (which reaches its workers over TLS with the internal token), and the
  public token cannot call a worker's StageWorker API."""
  self_signed_cert(tmp_path)
  (tmp_path / "public").write_text("public-token")
  (tmp_path / "internal").write_text("internal-token")
  secure = [
    "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem"),
    "--auth-token-file", str(tmp_path / "public"),
    "--internal-token-file", str(tmp_path / "internal"),
  ]  # fmt: skip
  credentials = grpc.ssl_channel_credentials((tmp_path / "cert.pem").read_bytes())
  workers = {
    role: Server("--role", role, *secure, log=tmp_path / f"{role}.log", cache=compilation_cache)
    for role in ("prefill", "decode")
  }
  router = Server(
    "--role", "router", "--prefill", workers["prefill"].address,
    "--decode", workers["decode"].address, "--tls-ca", str(tmp_path / "cert.pem"), *secure,
    log=tmp_path / "router.log", cache=compilation_cache,
  )  # fmt: skip
  public = (("authorization", "Bearer public-token"),)
  try:
    for s in (*workers.values(), router):
      s.wait_serving(credentials=credentials)
    with router.channel(credentials) as channel:
      request = pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(max_tokens=8))
      ids, _, _ = collect(router.stub(channel), request, metadata=public)
    assert ids == offline.generate("Hi", SamplingParams(max_tokens=8))[0].token_ids
    with workers["decode"].channel(credentials) as channel, pytest.raises(grpc.RpcError) as e:
      stages_pb2_grpc.StageWorkerStub(channel).Describe(
        spb.DescribeRequest(), metadata=public, timeout=10
      )
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
  finally:
    for s in (router, *workers.values()):
      s.stop()
