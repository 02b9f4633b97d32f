"""The serving load generator and its statistics: seeded random-token requests, sent over
gRPC one closed-loop level or Poisson stream at a time, timed per response, summarized in
percentiles. benchmark_serving.py and compare_modes.py drive it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import numpy as np

from meshserve.server.proto.meshserve.v1 import inference_pb2, inference_pb2_grpc

TOKEN_RANGE = (100, 40000)  # prompt token ids: clear of special tokens, inside common vocabs
WARMUP_SEED_OFFSET = 1_000_000
PERCENTILES = (50, 90, 99)
Range = int | tuple[int, int]


@dataclass
class RequestResult:
  prompt_len: int
  max_tokens: int
  ok: bool = False
  code: str | None = None  # gRPC status name on failure
  error: str = ""
  ttft: float | None = None  # seconds
  e2e: float | None = None
  itl: list[float] = field(default_factory=list)
  completion_tokens: int = 0
  start: float = 0.0  # time.perf_counter() at send
  end: float = 0.0

  @property
  def tpot(self) -> float | None:
    if not self.ok or self.completion_tokens < 2 or self.ttft is None or self.e2e is None:
      return None
    return (self.e2e - self.ttft) / (self.completion_tokens - 1)


def parse_range(text: str) -> tuple[int, int]:
  lo, _, hi = text.partition(":")
  lo_i, hi_i = int(lo), int(hi or lo)
  if not 1 <= lo_i <= hi_i:
    raise argparse.ArgumentTypeError(f"bad range {text!r}: need 1 <= MIN <= MAX")
  return lo_i, hi_i


def make_requests(
  num: int, input_len: Range, output_len: Range, seed: int
) -> list[tuple[list[int], int]]:
  """`num` (prompt token ids, output length) pairs; the same arguments give the same list."""
  in_lo, in_hi = (input_len, input_len) if isinstance(input_len, int) else input_len
  out_lo, out_hi = (output_len, output_len) if isinstance(output_len, int) else output_len
  rng = np.random.default_rng(seed)
  requests = []
  for _ in range(num):
    n_in = int(rng.integers(in_lo, in_hi + 1))
    n_out = int(rng.integers(out_lo, out_hi + 1))
    requests.append((rng.integers(*TOKEN_RANGE, size=n_in).tolist(), n_out))
  return requests


def make_channel(address: str, tls_ca: str | None = None) -> grpc.aio.Channel:
  if tls_ca is None:
    return grpc.aio.insecure_channel(address)
  with open(tls_ca, "rb") as f:
    return grpc.aio.secure_channel(
      address, grpc.ssl_channel_credentials(root_certificates=f.read())
    )


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
  return (("authorization", f"Bearer {token}"),) if token else ()


async def send_one(
  stub, prompt: list[int], max_tokens: int, timeout: float = 600.0, metadata=()
) -> RequestResult:
  """One Generate call, timed; failures are recorded in the result, never raised."""
  sampling = inference_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
  request = inference_pb2.GenerateRequest(token_ids=prompt, sampling=sampling)
  res = RequestResult(prompt_len=len(prompt), max_tokens=max_tokens, start=time.perf_counter())
  last, finished = None, False
  try:
    async for resp in stub.Generate(request, timeout=timeout, metadata=metadata):
      now, n = time.perf_counter(), len(resp.token_ids)
      if n:
        if last is None:
          res.ttft = now - res.start
        else:
          res.itl.extend([(now - last) / n] * n)
        last = now
        res.completion_tokens += n
      if resp.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED:
        finished = True
        res.completion_tokens = resp.usage.completion_tokens or res.completion_tokens
  except grpc.aio.AioRpcError as e:
    res.code, res.error = e.code().name, e.details() or ""
  except Exception as e:  # a broken client or channel must not end the run
    res.code, res.error = type(e).__name__, str(e)
  res.end = time.perf_counter()
  if res.code is None and not finished:
    res.code, res.error = "NO_FINISH", "stream ended without finish_reason"
  elif res.code is None and res.ttft is None:
    res.code, res.error = "NO_TOKENS", "finished without tokens"
  res.ok = res.code is None
  res.e2e = res.end - res.start if res.ok else None
  return res


async def run_level(
  target,
  requests: list[tuple[list[int], int]],
  concurrency: int | None = None,
  rate: float | None = None,
  seed: int = 0,
  timeout: float = 600.0,
  metadata=(),
  tls_ca: str | None = None,
) -> list[RequestResult]:
  """Serves `requests` against `target` (an address or an InferenceStub): at most
  `concurrency` in flight, and/or Poisson arrivals at `rate` req/s (inf: all at once)."""
  if concurrency is None and rate is None:
    raise ValueError("give concurrency or rate")
  channel = make_channel(target, tls_ca) if isinstance(target, str) else None
  stub = inference_pb2_grpc.InferenceStub(channel) if channel else target
  limit = asyncio.Semaphore(concurrency) if concurrency else contextlib.nullcontext()
  arrivals = np.zeros(len(requests))
  if rate is not None and math.isfinite(rate):  # the first arrives at once, then Poisson gaps
    arrivals[1:] = np.cumsum(np.random.default_rng(seed).exponential(1 / rate, len(requests) - 1))

  async def one(prompt: list[int], max_tokens: int) -> RequestResult:
    async with limit:
      return await send_one(stub, prompt, max_tokens, timeout, metadata)

  try:
    tasks, start = [], time.perf_counter()
    for at, (prompt, max_tokens) in zip(arrivals, requests, strict=True):
      # Absolute arrival times: sleep overshoot does not pile up over the run.
      await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
      tasks.append(asyncio.create_task(one(prompt, max_tokens)))
    return list(await asyncio.gather(*tasks))
  finally:
    if channel is not None:
      await channel.close()


def _pcts(values: list[float]) -> dict[str, float | None]:
  if not values:
    return {f"p{p}": None for p in PERCENTILES} | {"mean": None}
  ms = np.asarray(values) * 1e3
  return {f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES} | {"mean": float(ms.mean())}


def summarize(
  results: list[RequestResult],
  duration: float | None = None,
  slo_ttft_ms: float = 2000.0,
  slo_tpot_ms: float = 200.0,
) -> dict:
  """Summary numbers of one level; duration defaults to first send .. last finish."""
  ok = [r for r in results if r.ok]
  if duration is None:
    duration = max(r.end for r in results) - min(r.start for r in results) if results else 0.0
  rate = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)
  good = [
    r for r in ok if r.ttft * 1e3 <= slo_ttft_ms and (r.tpot is None or r.tpot * 1e3 <= slo_tpot_ms)
  ]
  out_tokens = sum(r.completion_tokens for r in ok)
  return {
    "requests": len(results),
    "ok": len(ok),
    "failed": len(results) - len(ok),
    "failures": dict(Counter(r.code for r in results if not r.ok)),
    "duration_s": duration,
    "request_throughput": rate(len(ok)),
    "output_throughput": rate(out_tokens),
    "output_tokens": out_tokens,
    "ttft_ms": _pcts([r.ttft for r in ok]),
    "tpot_ms": _pcts([r.tpot for r in ok if r.tpot is not None]),
    "itl_ms": _pcts([x for r in ok for x in r.itl]),
    "e2e_ms": _pcts([r.e2e for r in ok]),
    "slo_ttft_ms": slo_ttft_ms,
    "slo_tpot_ms": slo_tpot_ms,
    "goodput": rate(len(good)),
    "slo_fraction": len(good) / len(results) if results else 0.0,
  }
