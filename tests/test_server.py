"""`meshserve serve` as its users meet it: a subprocess on a loopback port, called over gRPC.

One server runs the whole module; the last test drains it with SIGTERM. Offline references run
in this process on an `LLM` with the server's engine shape, one request at a time as sent.
"""

import asyncio
import concurrent.futures
import functools
import importlib.util
import json
import pathlib
import random
import re
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import pytest
from conftest import assert_greedy_equal
from constraints import BAD, KINDS, PROMPT, grpcurl
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
  ProtoReflectionDescriptorDatabase,
)
from serving import Server, collect, model_info, read_all

from meshserve.engine import LLM, Constraint, EngineConfig, SamplingParams
from meshserve.server.proto.meshserve.v1 import inference_pb2 as pb
from meshserve.server.proto.meshserve.v1 import inference_pb2_grpc

ENGINE = EngineConfig(max_model_len=256, max_batch=8, num_pages=128, max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def offline(model):
  """The offline engine on the server's engine shape, for reference outputs. Its steps compile
  before the server starts, which then loads every one from the compilation cache."""
  llm = LLM(model, ENGINE)
  llm.runner.warmup()
  return llm


@pytest.fixture(scope="module")
def server(tmp_path_factory, compilation_cache, offline):
  s = Server(log=tmp_path_factory.mktemp("server") / "server.log", cache=compilation_cache)
  try:
    s.seen = s.wait_serving()
    yield s
  finally:
    s.stop()


@pytest.fixture(scope="module")
def stub(server):
  with server.channel() as channel:
    yield server.stub(channel)


def wait_all_pages_free(stub, timeout: float = 30.0) -> pb.StageStats:
  deadline = time.monotonic() + timeout
  while True:
    stats = model_info(stub).stages[0].stats
    if stats.free_kv_pages == stats.total_kv_pages and stats.running == stats.waiting == 0:
      return stats
    if time.monotonic() > deadline:
      pytest.fail(f"pages not returned after {timeout}s: {stats}")
    time.sleep(0.1)


def test_health_turns_serving_only_after_warmup(server, stub):
  log = server.output()
  compiled = re.search(r"compiled (\d+) step shapes", log)
  assert compiled and log.index(compiled.group(0)) < log.index("SERVING meshserve.v1.Inference")
  assert "NOT_SERVING" in server.seen and server.seen[-1] == "SERVING"
  assert set(server.seen[:-1]) <= {"NO_ANSWER", "NOT_SERVING"}
  assert int(compiled.group(1)) == len(ENGINE.step_shapes)
  assert model_info(stub).stages[0].stats.compilations == len(ENGINE.step_shapes)


def test_a_client_built_from_reflection_alone(server):
  """No stubs and no .proto: the service is found, its messages built and Generate called."""
  with server.channel() as channel:
    db = ProtoReflectionDescriptorDatabase(channel)
    assert "meshserve.v1.Inference" in db.get_services()
    pool = descriptor_pool.DescriptorPool(db)
    method = pool.FindServiceByName("meshserve.v1.Inference").FindMethodByName("Generate")
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_stream(
      "/meshserve.v1.Inference/Generate",
      request_serializer=request_class.SerializeToString,
      response_deserializer=response_class.FromString,
    )
    request = request_class(text="The capital of France is", sampling={"max_tokens": 8})
    text = "".join(r.text for r in call(request, timeout=60))
  assert "Paris" in text


def test_golden_prompts_equal_offline_outputs_greedy_and_seeded(stub, offline, golden, model):
  """Each golden prompt, greedy and seeded, one request at a time; the offline references run
  on a thread of this process while the server answers."""
  cases = [golden.case(i) for i in range(golden.n)]
  seeded = dict(max_tokens=24, temperature=0.8, top_p=0.9, seed=1234)
  sampling = [(dict(max_tokens=len(case["greedy"])), seeded) for case in cases]

  def references():
    return [
      [offline.generate(case["ids"].tolist(), SamplingParams(**kw))[0] for kw in ways]
      for case, ways in zip(cases, sampling, strict=True)
    ]

  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    wanted = pool.submit(references)
    served = [
      [
        collect(
          stub, pb.GenerateRequest(token_ids=case["ids"].tolist(), sampling=pb.SamplingParams(**kw))
        )
        for kw in ways
      ]
      for case, ways in zip(cases, sampling, strict=True)
    ]
    wanted = wanted.result(timeout=300)
  for case, (greedy, sampled), (want_greedy, want_seeded) in zip(
    cases, served, wanted, strict=True
  ):
    prompt = case["ids"].tolist()
    ids, text, last = greedy
    assert (ids, text) == (want_greedy.token_ids, want_greedy.text)
    assert_greedy_equal(model, prompt, case["greedy"].tolist(), ids)
    assert last.usage.prompt_tokens == len(prompt) and last.usage.completion_tokens == len(ids)
    ids, text, _ = sampled
    assert (ids, text) == (want_seeded.token_ids, want_seeded.text)


def test_chat_and_text_inputs_are_templated_and_tokenized_as_offline(stub, offline, golden):
  i = golden.chat_cases()[0]
  messages = golden.messages(i)
  want = offline.chat([messages], SamplingParams(max_tokens=16))[0]
  chat = [pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages]
  ids, text, _ = collect(
    stub, pb.GenerateRequest(messages=chat, sampling=pb.SamplingParams(max_tokens=16))
  )
  assert (ids, text) == (want.token_ids, want.text)
  tokenized = stub.Tokenize(pb.TokenizeRequest(messages=chat), timeout=10)
  assert list(tokenized.token_ids) == golden.case(i)["ids"].tolist()
  assert tokenized.text == offline.tokenizer.apply_chat_template(messages)


BAD_INPUTS = [
  ({}, "input"),
  ({"text": "hi", "token_ids": [1, 2]}, "input"),
  ({"text": "hi", "sampling": {"temperature": float("nan")}}, "sampling.temperature"),
  ({"text": "hi", "sampling": {"temperature": -0.5}}, "sampling.temperature"),
  ({"text": "hi", "sampling": {"top_p": 0.0}}, "sampling.top_p"),
  ({"text": "hi", "sampling": {"top_p": 1.5}}, "sampling.top_p"),
  ({"text": "hi", "sampling": {"top_k": -1}}, "sampling.top_k"),
  ({"text": "hi", "sampling": {"max_tokens": 0}}, "sampling.max_tokens"),
  ({"text": "hi", "sampling": {"max_tokens": -3}}, "sampling.max_tokens"),
  ({"text": "hi", "sampling": {"max_tokens": 256}}, "sampling.max_tokens"),  # + prompt > 256
  ({"token_ids": [1] * 300}, "token_ids"),
  ({"token_ids": [1] * 200, "sampling": {"max_tokens": 100}}, "sampling.max_tokens"),
  ({"text": "word " * 300}, "text"),  # 300 tokens, far under the 1 MiB byte limit
  ({"token_ids": [5, 49152]}, "token_ids"),
  ({"token_ids": [-1]}, "token_ids"),
  ({"text": "hi", "sampling": {"logprobs": 21}}, "sampling.logprobs"),
  ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
  ({"messages": [{"role": "user", "content": "x" * (2 << 20)}]}, "messages[0].content"),
  ({"text": "x" * (2 << 20)}, "text"),
  ({"text": "hi", "sampling": {"stop": [""]}}, "sampling.stop"),
  ({"text": "hi", "sampling": {"stop_token_ids": [99999]}}, "sampling.stop_token_ids"),
  ({"text": "hi", "sampling": {"stop": ["x"] * 17}}, "sampling.stop"),
  ({"text": "hi", "sampling": {"stop": ["x" * 257]}}, "sampling.stop"),
  ({"text": "hi", "sampling": {"stop_token_ids": list(range(65))}}, "sampling.stop_token_ids"),
  ({"text": "hi", "cache_salt": "s" * 257}, "cache_salt"),
  # Cheap checks come before tokenizing: a bad field is named even beside a huge text.
  ({"text": "word " * 200_000, "sampling": {"stop": ["x"] * 17}}, "sampling.stop"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_INPUTS, ids=[f for _, f in BAD_INPUTS])
def test_bad_input_gets_invalid_argument_naming_the_field(stub, fields, field):
  with pytest.raises(grpc.RpcError) as e:
    collect(stub, pb.GenerateRequest(**fields))
  assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
  assert e.value.details().startswith(field), e.value.details()


@pytest.mark.parametrize(
  ("fields", "field"),
  [({}, "input"), ({"text": "x", "messages": [{"role": "user", "content": "x"}]}, "input"),
   ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
   ({"text": "x" * (2 << 20)}, "text")],
)  # fmt: skip
def test_bad_tokenize_input_gets_invalid_argument_naming_the_field(stub, fields, field):
  with pytest.raises(grpc.RpcError) as e:
    stub.Tokenize(pb.TokenizeRequest(**fields), timeout=30)
  assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
  assert e.value.details().startswith(field), e.value.details()


def test_a_prompt_filling_the_context_gets_what_room_is_left(stub):
  """Unset max_tokens means 64, or fewer when the context has less room."""
  ids, _, last = collect(
    stub, pb.GenerateRequest(token_ids=[1000] * 250, sampling={"ignore_eos": True})
  )
  assert len(ids) == 6 and last.finish_reason == pb.FINISH_REASON_LENGTH


def test_after_bad_input_a_normal_request_is_served(stub, offline):
  want = offline.generate("The capital of France is", SamplingParams(max_tokens=8))[0]
  ids, _, _ = collect(
    stub,
    pb.GenerateRequest(text="The capital of France is", sampling=pb.SamplingParams(max_tokens=8)),
  )
  assert ids == want.token_ids
  wait_all_pages_free(stub)


def test_model_info_reports_every_request_limit(stub):
  info = model_info(stub)
  assert (info.max_stop_strings, info.max_stop_string_chars, info.max_stop_token_ids) == (
    16,
    256,
    64,
  )
  assert info.max_text_bytes == 1 << 20


def test_a_salted_prompt_is_never_served_from_another_salts_cache(stub):
  """The probe of a shared prefix cache: a victim's prompt, then a caller guessing it. Under
  another salt (or none) the guess finds nothing cached; under the same salt it does."""
  secret = pb.GenerateRequest(
    text="Patient record: John Doe, SSN 123-45-6789, diagnosis pending review. " * 2,
    sampling=pb.SamplingParams(max_tokens=2),
  )

  def cached(salt: str) -> int:
    request = pb.GenerateRequest()
    request.CopyFrom(secret)
    request.cache_salt = salt
    return collect(stub, request)[2].usage.cached_prompt_tokens

  cached("victim")
  assert cached("attacker") == 0
  assert cached("") == 0
  assert cached("victim") > 0
  wait_all_pages_free(stub)


def test_server_assigned_request_ids_are_random(stub):
  request = pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(max_tokens=2))
  ids = {collect(stub, request)[2].request_id for _ in range(3)}
  assert len(ids) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids), ids


def test_a_request_id_in_flight_cannot_be_reused(stub):
  request = pb.GenerateRequest(
    request_id="twice", text="Count to a hundred:", sampling=pb.SamplingParams(max_tokens=40)
  )
  first = stub.Generate(request, timeout=60)
  assert next(first).request_id == "twice"
  with pytest.raises(grpc.RpcError) as e:
    collect(stub, request)
  assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS and "request_id" in e.value.details()
  rest = list(first)
  assert rest[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
  assert collect(stub, request)[2].request_id == "twice"  # free again once finished


def test_50_cancels_and_deadlines_at_random_points_return_every_page(server, stub, offline):
  rng = random.Random(0)

  async def one(stub_aio, i: int) -> str:
    request = pb.GenerateRequest(
      text=f"Story number {i}: once upon a time", sampling=pb.SamplingParams(max_tokens=60)
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
    cut = rng.randrange(0, 20)
    async for k, _ in _enumerate(call):
      if k >= cut:
        call.cancel()
        return "cancelled"
    return "done"

  async def main():
    async with grpc.aio.insecure_channel(server.address) as channel:
      stub_aio = inference_pb2_grpc.InferenceStub(channel)
      return await asyncio.gather(*(one(stub_aio, i) for i in range(50)))

  outcomes = asyncio.run(main())
  # How many deadlines pass before their request is done depends on the machine's speed: not
  # asserted. Each cancel is made by the client after a set number of responses.
  assert outcomes.count("cancelled") > 10, outcomes
  wait_all_pages_free(stub)
  test_after_bad_input_a_normal_request_is_served(stub, offline)


async def _enumerate(aiter):
  k = 0
  async for item in aiter:
    yield k, item
    k += 1


@pytest.mark.slow  # default: 50 random cancels over the same server
def test_64_concurrent_streams_complete_correctly(server, stub, offline, model):
  rng = np.random.default_rng(1)
  prompts = [rng.integers(100, 40000, size=rng.integers(4, 40)).tolist() for _ in range(64)]
  params = SamplingParams(max_tokens=12, ignore_eos=True)
  want = offline.generate(prompts, params)

  async def one(stub_aio, i):
    request = pb.GenerateRequest(
      request_id=f"r{i}", token_ids=prompts[i],
      sampling=pb.SamplingParams(max_tokens=12, ignore_eos=True),
    )  # fmt: skip
    responses = [r async for r in stub_aio.Generate(request, timeout=300)]
    assert {r.request_id for r in responses} == {f"r{i}"}
    return responses

  async def main():
    async with grpc.aio.insecure_channel(server.address) as channel:
      stub_aio = inference_pb2_grpc.InferenceStub(channel)
      return await asyncio.gather(*(one(stub_aio, i) for i in range(64)))

  results = asyncio.run(main())
  for i, responses in enumerate(results):
    ids = [t for r in responses for t in r.token_ids]
    assert len(ids) == 12 == responses[-1].usage.completion_tokens
    assert_greedy_equal(model, prompts[i], want[i].token_ids, ids)
  wait_all_pages_free(stub)


def test_metrics_are_plausible_after_traffic(server, stub):
  """After this test's own 8 requests of 12 tokens (and the bad input of the tests before)."""
  sampling = pb.SamplingParams(max_tokens=12, ignore_eos=True)
  for i in range(8):
    collect(stub, pb.GenerateRequest(token_ids=list(range(100 + i, 120 + i)), sampling=sampling))
  wait_all_pages_free(stub)
  text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10)
  metrics = {}
  for line in text.read().decode().splitlines():
    if line and not line.startswith("#"):
      name, value = line.rsplit(" ", 1)
      metrics[name] = float(value)
  ok = metrics['meshserve_requests_total{finish_reason="length",status="OK"}']
  assert ok >= 8
  assert metrics['meshserve_requests_total{finish_reason="none",status="INVALID_ARGUMENT"}'] >= 15
  assert metrics["meshserve_generation_tokens_total"] >= 8 * 12
  assert metrics["meshserve_prompt_tokens_total"] > metrics["meshserve_prompt_cached_tokens_total"]
  assert metrics["meshserve_time_to_first_token_seconds_count"] >= ok
  assert 0 < metrics["meshserve_time_per_output_token_seconds_sum"] < 10 * ok
  stage = '{stage="colocated"}'
  assert metrics["meshserve_kv_pages_free" + stage] == 127
  assert metrics["meshserve_kv_pages_total" + stage] == 127
  assert metrics["meshserve_requests_running" + stage] == 0
  assert metrics["meshserve_requests_waiting" + stage] == 0
  assert 0.0 <= metrics["meshserve_prefix_cache_hit_rate"] <= 1.0
  # Every shape was compiled in the warm-up: none since, whatever the traffic.
  assert metrics["meshserve_compilations_total" + stage] == len(ENGINE.step_shapes)
  assert "compiled step" not in server.output()


def test_client_command_streams_from_the_server(server):
  proc = subprocess.run(
    [sys.executable, "-m", "meshserve.server.cli", "client", "--address", server.address, "--chat",
     "--max-tokens", "16", "What is the capital of France?"],
    capture_output=True, text=True, timeout=120,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  assert "Paris" in proc.stdout and "finish_reason=" in proc.stderr
  proc = subprocess.run(
    [sys.executable, "-m", "meshserve.server.cli", "client", "--address", server.address,
     "--choice", "yes", "--choice", "no", "Is the sky blue? Answer:"],
    capture_output=True, text=True, timeout=120,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() in ("yes", "no") and "finish_reason=stop" in proc.stderr


def test_every_constraint_kind_through_grpcurl_equals_offline(server, offline):
  """Each kind of the `constraint` oneof, set in a JSON request through grpcurl: the output is
  valid, ends with STOP and is the offline engine's; one that does not compile gets
  InvalidArgument naming its field, and loses no page."""
  generate = functools.partial(grpcurl, server.address, "meshserve.v1.Inference/Generate")
  for oneof, args, valid in KINDS:
    responses, stderr, status = generate({"text": PROMPT, "sampling": {"max_tokens": 160, **oneof}})
    assert status == 0, stderr
    text = "".join(r.get("text", "") for r in responses)
    ids = [t for r in responses for t in r.get("token_ids", [])]
    assert responses[-1].get("finish_reason") == "FINISH_REASON_STOP", responses
    assert valid(text), (oneof, text)
    params = SamplingParams(max_tokens=160, constraint=Constraint(*args))
    want = offline.generate(PROMPT, params)[0]
    assert (ids, text) == (want.token_ids, want.text)
  for oneof, message in BAD:
    _, stderr, status = generate({"text": PROMPT, "sampling": oneof})
    assert status != 0 and "Code: InvalidArgument" in stderr, stderr
    assert f"Message: {message}" in stderr, stderr


def test_a_mixed_constrained_and_free_run_compiles_nothing(stub, offline):
  """Free and constrained streams at once, greedy and seeded: each free output is the offline
  engine's, each constrained one valid; the compilation counter stays put and every page
  comes back."""
  before = model_info(stub).stages[0].stats.compilations
  free = [dict(max_tokens=48, temperature=0.8, top_k=20, seed=7), dict(max_tokens=48)]
  bound = [(dict(max_tokens=160, **oneof), valid) for oneof, _, valid in KINDS]
  bound += [  # seeded at temperature 1: a date and a choice, which always end
    (dict(max_tokens=160, temperature=1.0, seed=3, **KINDS[i][0]), KINDS[i][2]) for i in (2, 4)
  ]
  requests = [pb.GenerateRequest(text=PROMPT, sampling=s) for s in free + [b for b, _ in bound]]
  with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
    served = list(pool.map(lambda r: collect(stub, r), requests))
  for sampling, (ids, _, _) in zip(free, served, strict=False):
    assert ids == offline.generate(PROMPT, SamplingParams(**sampling))[0].token_ids
  for (sampling, valid), (_, text, last) in zip(bound, served[len(free) :], strict=True):
    assert last.finish_reason == pb.FINISH_REASON_STOP and valid(text), (sampling, text)
  assert model_info(stub).stages[0].stats.compilations == before == len(ENGINE.step_shapes)
  wait_all_pages_free(stub)


@pytest.mark.slow  # default: test_benchmark_serving on a fake server
def test_benchmark_serving_never_compiles_and_compares_offline(server, stub, model, tmp_path):
  bench = _load_script("benchmark_serving")
  out = tmp_path / "bench.json"
  argv = ["--address", server.address, "--concurrency", "1,4", "--num-requests", "6",
          "--input-len", "8:40", "--output-len", "6:12", "--json", str(out)]  # fmt: skip
  assert bench.main(argv) == 0
  record = json.loads(out.read_text())
  assert record["compilations"] == [len(ENGINE.step_shapes)] * 2
  for level in record["levels"]:
    assert level["ok"] == 6 and level["output_throughput"] > 0
    assert level["ttft_ms"]["p50"] <= level["e2e_ms"]["p50"]
  requests = bench.make_requests(6, (8, 40), (6, 12), seed=0)
  info = model_info(stub)
  tok_s = bench.run_offline(model, info, [(requests, 2), (requests, None)])
  assert len(tok_s) == 2 and min(tok_s) > 0


def _load_script(name: str):
  path = pathlib.Path(__file__).parents[1] / "scripts" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  module = sys.modules[name] = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_sigterm_drains_streams_in_flight_then_exits_0(server):
  """Last: it stops the module's server."""

  async def main():
    async with grpc.aio.insecure_channel(server.address) as channel:
      stub_aio = inference_pb2_grpc.InferenceStub(channel)
      request = pb.GenerateRequest(
        text="List the planets:", sampling=pb.SamplingParams(max_tokens=40, ignore_eos=True)
      )
      calls = [stub_aio.Generate(request, timeout=120) for _ in range(4)]
      firsts = [await call.read() for call in calls]  # all four are streaming now
      status = asyncio.ensure_future(asyncio.to_thread(server.terminate))
      rests = [[r async for r in read_all(call)] for call in calls]
      return firsts, rests, await status

  firsts, rests, status = asyncio.run(main())
  assert status == 0, server.output()
  for first, rest in zip(firsts, rests, strict=True):
    assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 40
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
  assert "draining" in server.output()
