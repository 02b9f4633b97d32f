"""scripts/benchmark_serving.py against an in-process fake Inference server."""

import asyncio
import json
import threading

import benchmark_serving as bench  # scripts/, on sys.path (conftest)
import grpc
import pytest

from meshserve.server.proto.meshserve.v1 import inference_pb2, inference_pb2_grpc

FAIL_MARKER = 7  # a first prompt token below the benchmark's id range: the fake rejects it
CHUNK = 3  # tokens per streamed response after the first


class FakeInference(inference_pb2_grpc.InferenceServicer):
  """Streams exactly max_tokens tokens: one, then chunks of CHUNK, with small sleeps."""

  auth: set[str] = set()  # authorization metadata seen

  async def Generate(self, request, context):
    FakeInference.auth.update(v for k, v in context.invocation_metadata() if k == "authorization")
    if request.token_ids and request.token_ids[0] == FAIL_MARKER:
      await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
    n = request.sampling.max_tokens
    await asyncio.sleep(0.01)  # "prefill"
    sent = 0
    while sent < n:
      k = 1 if sent == 0 else min(CHUNK, n - sent)
      sent += k
      resp = inference_pb2.GenerateResponse(token_ids=[1] * k, text="x" * k)
      if sent == n:
        resp.finish_reason = inference_pb2.FINISH_REASON_LENGTH
        resp.usage.prompt_tokens = len(request.token_ids)
        resp.usage.completion_tokens = n
      yield resp
      if sent < n:
        await asyncio.sleep(0.002)

  async def GetModelInfo(self, request, context):
    info = inference_pb2.ModelInfo(model="fake", max_batch=4)
    info.stages.add(role="colocated").stats.compilations = 3
    return info


@pytest.fixture(scope="module")
def address():
  """The fake server on its own event loop in a thread, so main()'s asyncio.run can call it."""
  loop = asyncio.new_event_loop()
  thread = threading.Thread(target=loop.run_forever, daemon=True)
  thread.start()

  async def start():
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServicer_to_server(FakeInference(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port

  server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
  try:
    yield f"127.0.0.1:{port}"
  finally:
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


def test_make_requests_reproducible_and_in_range():
  a = bench.make_requests(50, (5, 20), (3, 9), seed=3)
  assert a == bench.make_requests(50, (5, 20), (3, 9), seed=3)
  assert a != bench.make_requests(50, (5, 20), (3, 9), seed=4)
  assert all(5 <= len(p) <= 20 and 3 <= n <= 9 for p, n in a)
  assert all(100 <= t < 40000 for p, _ in a for t in p)
  assert {len(p) for p, _ in a} != {len(a[0][0])}  # lengths actually vary
  fixed = bench.make_requests(4, 8, 5, seed=0)
  assert all(len(p) == 8 and n == 5 for p, n in fixed)
  assert bench.parse_range("7") == (7, 7) and bench.parse_range("2:9") == (2, 9)


def test_concurrency_level_counts_tokens_and_failures(address):
  requests = bench.make_requests(10, (4, 12), (2, 11), seed=1)
  requests[3] = ([FAIL_MARKER] + requests[3][0][1:], requests[3][1])
  results = asyncio.run(bench.run_level(address, requests, concurrency=4, timeout=10))

  assert len(results) == 10
  failed = results[3]
  assert not failed.ok and failed.code == "RESOURCE_EXHAUSTED"
  for i, (r, (prompt, n)) in enumerate(zip(results, requests, strict=True)):
    assert r.prompt_len == len(prompt) and r.max_tokens == n
    if i == 3:
      continue
    assert r.ok and r.code is None, r.error
    assert r.completion_tokens == n
    assert len(r.itl) == n - 1  # the first response carries one token
    assert 0 < r.ttft < r.e2e
    assert r.tpot == pytest.approx((r.e2e - r.ttft) / (n - 1))

  s = bench.summarize(results, slo_ttft_ms=10_000, slo_tpot_ms=10_000)
  assert (s["ok"], s["failed"], s["failures"]) == (9, 1, {"RESOURCE_EXHAUSTED": 1})
  assert s["output_tokens"] == sum(n for i, (_, n) in enumerate(requests) if i != 3)
  for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
    assert 0 <= s[metric]["p50"] <= s[metric]["p90"] <= s[metric]["p99"], metric
  assert s["ttft_ms"]["p50"] < s["e2e_ms"]["p50"]
  assert s["slo_fraction"] == pytest.approx(0.9)
  assert s["goodput"] == pytest.approx(s["request_throughput"])
  strict = bench.summarize(results, slo_ttft_ms=0.0, slo_tpot_ms=10_000)
  assert strict["goodput"] == 0 and strict["slo_fraction"] == 0


def test_poisson_rate_level_finishes(address):
  requests = bench.make_requests(8, 4, (2, 6), seed=2)
  results = asyncio.run(bench.run_level(address, requests, rate=50.0, seed=2, timeout=10))
  assert all(r.ok for r in results)
  starts = sorted(r.start for r in results)
  assert starts[-1] - starts[0] > 0.02  # 7 seeded gaps of mean 20 ms, not all at once
  burst = asyncio.run(bench.run_level(address, requests, rate=float("inf"), timeout=10))
  assert [r.completion_tokens for r in burst] == [n for _, n in requests]


def test_main_writes_plot_and_json(address, tmp_path, capsys):
  png, out = tmp_path / "lat.png", tmp_path / "summary.json"
  argv = ["--address", address, "--concurrency", "2,4", "--num-requests", "6"]
  argv += ["--input-len", "4:8", "--output-len", "3:6", "--warmup", "1", "--auth-token", "tok"]
  assert bench.main(argv + ["--plot", str(png), "--json", str(out)]) == 0

  assert "Bearer tok" in FakeInference.auth
  assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  data = json.loads(out.read_text())
  assert [lvl["level"] for lvl in data["levels"]] == ["c=2", "c=4"]
  assert all(lvl["ok"] == 6 and lvl["failed"] == 0 for lvl in data["levels"])
  table = capsys.readouterr().out
  assert "ttft50" in table and "c=4" in table

  rated = tmp_path / "rated.json"
  argv = ["--address", address, "--request-rate", "inf", "--num-requests", "3", "--warmup", "0"]
  assert bench.main(argv + ["--output-len", "2", "--json", str(rated)]) == 0
  assert json.loads(rated.read_text())["levels"][0]["rate"] == "inf"


def test_deadline_is_a_counted_failure(address):
  requests = bench.make_requests(2, 4, 300, seed=5)  # ~100 chunks: well past 50 ms
  results = asyncio.run(bench.run_level(address, requests, concurrency=2, timeout=0.05))
  assert [r.code for r in results] == ["DEADLINE_EXCEEDED"] * 2
  assert bench.summarize(results)["failures"] == {"DEADLINE_EXCEEDED": 2}
