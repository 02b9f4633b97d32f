"""Online serving benchmark: load a running meshserve gRPC server and report latency percentiles.

Prompts are random token ids with seeded lengths; every request is greedy with `ignore_eos`, so
it yields exactly its drawn output length. A level is either a fixed number of requests in
flight (`--concurrency`, a closed loop) or seeded Poisson arrivals (`--request-rate`, `inf`:
all at once). Level i serves make_requests(num, input_len, output_len, seed + i), so no level
replays another's prompts into the prefix cache, and an offline run can rebuild the exact
workload. Warm-up requests use seed + 1_000_000 and are not counted.

  TTFT   send until the first response carrying tokens
  ITL    gap between responses carrying tokens, spread evenly over that response's tokens
  TPOT   (E2E - TTFT) / (completion tokens - 1)
  goodput  successful requests/s within both --slo-ttft-ms and --slo-tpot-ms

  python scripts/benchmark_serving.py --address localhost:50051 --concurrency 1,8,32
      [--input-len 128:512] [--output-len 128] [--plot out.png] [--json out.json] [--offline]

--offline then runs each level's requests through the offline engine in this process (the
loop `LLM.generate` runs, at most `concurrency` requests in flight), on the same model with the
server's engine configuration (from GetModelInfo), warmed up the same way, and prints the
server's output throughput as a share of it. The server sits idle meanwhile.
The server's compilation counter is read before and after: a change is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import numpy as np

from server.proto.meshserve.v1 import inference_pb2, inference_pb2_grpc

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


def format_table(summaries: list[dict]) -> str:
  cols = ["level", "ok/fail", "dur s", "req/s", "tok/s"]
  cols += [f"{m}{p}" for m in ("ttft", "tpot", "itl", "e2e") for p in PERCENTILES]
  cols += ["good/s", "slo%"]
  lines = [" ".join(f"{c:>9}" for c in cols)]
  for s in summaries:
    cells = [str(s["level"]), f"{s['ok']}/{s['failed']}", f"{s['duration_s']:.2f}"]
    cells += [f"{s['request_throughput']:.2f}", f"{s['output_throughput']:.1f}"]
    for m in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
      cells += ["-" if (v := s[m][f"p{p}"]) is None else f"{v:.1f}" for p in PERCENTILES]
    cells += [f"{s['goodput']:.2f}", f"{100 * s['slo_fraction']:.0f}"]
    lines.append(" ".join(f"{c:>9}" for c in cells))
  return "\n".join(lines)


def plot(levels: list[tuple[str, list[RequestResult]]], path: str) -> None:
  """CDFs of TTFT, TPOT, ITL and E2E, one line per level."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  metrics = {
    "TTFT": lambda rs: [r.ttft for r in rs],
    "TPOT": lambda rs: [r.tpot for r in rs if r.tpot is not None],
    "ITL": lambda rs: [x for r in rs for x in r.itl],
    "E2E": lambda rs: [r.e2e for r in rs],
  }
  fig, axes = plt.subplots(2, 2, figsize=(11, 8))
  for ax, (name, get) in zip(axes.flat, metrics.items(), strict=True):
    for label, results in levels:
      values = np.sort(np.asarray(get([r for r in results if r.ok]), dtype=float) * 1e3)
      if values.size:
        ax.step(values, np.arange(1, values.size + 1) / values.size, where="post", label=label)
    ax.set(title=f"{name} CDF", xlabel="ms", ylabel="fraction")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def int_list(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x.strip()]


def float_list(text: str) -> list[float]:
  return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--address", required=True, help="HOST:PORT of the meshserve gRPC server")
  p.add_argument("--auth-token", help="sent as `authorization: Bearer TOKEN`")
  p.add_argument("--tls-ca", help="root certificate (PEM) for a TLS channel; default: insecure")
  load = p.add_mutually_exclusive_group(required=True)
  load.add_argument("--concurrency", type=int_list, help="N[,N...] in flight")
  load.add_argument("--request-rate", type=float_list, help="R[,R...] req/s; inf")
  p.add_argument("--num-requests", type=int, help="per level; default max(16, 2 * level)")
  p.add_argument("--input-len", type=parse_range, default=(128, 512), help="MIN:MAX or N")
  p.add_argument("--output-len", type=parse_range, default=(128, 128), help="MIN:MAX or N")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--warmup", type=int, default=2, help="uncounted requests before measuring")
  p.add_argument("--timeout", type=float, default=600.0, help="per-request gRPC deadline, s")
  p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
  p.add_argument("--slo-tpot-ms", type=float, default=200.0)
  p.add_argument("--plot", help="write latency CDFs to this PNG")
  p.add_argument("--json", help="write the summaries to this JSON file")
  p.add_argument(
    "--offline", action="store_true", help="also run each level offline (LLM.generate) and compare"
  )
  p.add_argument("--offline-model", help="model for --offline; default: the server's")
  args = p.parse_args(argv)
  if any(x <= 0 for x in args.concurrency or args.request_rate):
    p.error("levels must be positive")
  return args


def _jsonable(x):
  """Strict JSON: inf and nan become strings."""
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, list | tuple):
    return [_jsonable(v) for v in x]
  return x


async def _run(args: argparse.Namespace):
  """(label, results, summary, requests) per level, and the server's ModelInfo before and after."""
  metadata = auth_metadata(args.auth_token)
  rated = args.request_rate is not None
  levels = args.request_rate if rated else args.concurrency
  channel = make_channel(args.address, args.tls_ca)
  stub = inference_pb2_grpc.InferenceStub(channel)
  out = []
  info = inference_pb2.GetModelInfoRequest()
  try:
    before = await stub.GetModelInfo(info, metadata=metadata, timeout=30)
    if args.warmup > 0:
      warm = make_requests(
        args.warmup, args.input_len, args.output_len, args.seed + WARMUP_SEED_OFFSET
      )
      warmed = await run_level(
        stub, warm, concurrency=args.warmup, timeout=args.timeout, metadata=metadata
      )
      if failed := Counter(r.code for r in warmed if not r.ok):
        print(f"warm-up failures: {dict(failed)}", file=sys.stderr)
    for i, level in enumerate(levels):
      finite = math.isfinite(level)
      num = args.num_requests or max(16, 2 * math.ceil(level) if finite else 16)
      requests = make_requests(num, args.input_len, args.output_len, args.seed + i)
      load = {"rate": level} if rated else {"concurrency": level}
      start = time.perf_counter()
      results = await run_level(
        stub, requests, seed=args.seed + i, timeout=args.timeout, metadata=metadata, **load
      )
      summary = summarize(results, time.perf_counter() - start, args.slo_ttft_ms, args.slo_tpot_ms)
      label = f"{level:g}/s" if rated else f"c={level}"
      summary = {"level": label, "seed": args.seed + i, **load, **summary}
      out.append((label, results, summary, requests))
    after = await stub.GetModelInfo(info, metadata=metadata, timeout=30)
  finally:
    await channel.close()
  return out, before, after


def run_offline(model, info, levels: list[tuple[list[tuple[list[int], int]], float | None]]):
  """Output tokens/s of the offline engine on each level's (requests, concurrency): the
  requests go in as in the server run, at most `concurrency` at a time (None: all at once, as
  `LLM.generate` does; the same at any concurrency >= max_batch), on the server's engine
  configuration, every step shape compiled first as the server does.
  model: a name or path for load_model, or a loaded Model."""
  from engine import LLM, EngineConfig, SamplingParams
  from models import load_model

  stats = info.stages[0].stats
  config = EngineConfig(
    page_size=info.page_size,
    num_pages=stats.total_kv_pages + 1,
    max_model_len=info.max_model_len,
    max_batch=info.max_batch,
    max_num_batched_tokens=info.max_num_batched_tokens,
  )
  engine = LLM(load_model(model) if isinstance(model, str) else model, config).engine
  engine.runner.warmup()
  throughputs = []
  for requests, concurrency in levels:
    queue, limit, tokens = list(requests), concurrency or len(requests), 0
    start = time.perf_counter()
    while queue or engine.has_unfinished():
      while queue and len(engine.requests) < limit:
        prompt, n = queue.pop(0)
        engine.add_request(prompt, SamplingParams(max_tokens=n, ignore_eos=True))
      tokens += sum(len(delta.new_token_ids) for delta in engine.step())
    throughputs.append(tokens / (time.perf_counter() - start))
  return throughputs


def main(argv: list[str] | None = None) -> int:
  """Runs every level; 1 when no measured request succeeded, else 0."""
  args = parse_args(argv)
  runs, before, after = asyncio.run(_run(args))
  summaries = [s for _, _, s, _ in runs]
  print(format_table(summaries))
  print("(latencies in ms; ok/fail: requests; good/s: goodput within the SLO)")
  for s in summaries:
    if s["failures"]:
      print(f"{s['level']} failures: " + ", ".join(f"{k} x{v}" for k, v in s["failures"].items()))
  compiled = [info.stages[0].stats.compilations for info in (before, after)]
  print(f"server compilations: {compiled[0]} before, {compiled[1]} after")
  if args.offline:
    from engine.runner import enable_compilation_cache

    enable_compilation_cache()  # the server's compiled steps, where it shares this machine
    levels = [(requests, s.get("concurrency")) for (*_, s, requests) in runs]
    offline = run_offline(args.offline_model or before.model, before, levels)
    print(f"\n{'level':>8} {'server tok/s':>13} {'offline tok/s':>14} {'server/offline':>15}")
    for s, tok_s in zip(summaries, offline, strict=True):
      s["offline_output_throughput"] = tok_s
      ratio = s["output_throughput"] / tok_s
      print(f"{s['level']:>8} {s['output_throughput']:>13.1f} {tok_s:>14.1f} {ratio:>14.2f}x")
  if args.plot:
    plot([(label, results) for label, results, *_ in runs], args.plot)
  if args.json:
    with open(args.json, "w") as f:
      record = {"args": vars(args), "levels": summaries, "compilations": compiled}
      json.dump(_jsonable(record), f, indent=2, allow_nan=False)
  return 0 if any(s["ok"] for s in summaries) else 1


if __name__ == "__main__":
  raise SystemExit(main())
