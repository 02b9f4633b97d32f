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

--compare-modes colocated,disaggregated,router starts each topology itself (on free loopback
ports, one after the other, stopped by PID) and runs the same two workloads on each:
  steady        the --concurrency level(s), as above;
  interference  --decode-streams greedy streams that keep decoding, while --long-prompts long
                prompts arrive as a Poisson stream at --long-rate per second: the TPOT of the
                decoding streams shows how much the long prefills disturb them.

  python scripts/benchmark_serving.py --compare-modes colocated,disaggregated,router
      --concurrency 16 --input-len 16:96 --output-len 64 --plot modes.png --json modes.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections import Counter

import numpy as np
from serving_load import (  # noqa: F401 - this folder is on sys.path; tests use them here
  PERCENTILES,
  TOKEN_RANGE,
  WARMUP_SEED_OFFSET,
  Range,
  RequestResult,
  auth_metadata,
  make_channel,
  make_requests,
  parse_range,
  run_level,
  send_one,
  summarize,
)

from meshserve.server.proto.meshserve.v1 import inference_pb2, inference_pb2_grpc


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
  p.add_argument("--address", help="HOST:PORT of the meshserve gRPC server")
  modes = p.add_argument_group("--compare-modes: start each topology here and compare them")
  modes.add_argument(
    "--compare-modes", type=lambda t: [m.strip() for m in t.split(",")],
    help=f"modes to start and compare, of {','.join(MODES)}",
  )  # fmt: skip
  modes.add_argument(
    "--serve-args", default="--max-model-len 1024 --max-batch 16 --num-pages 512",
    help="flags given to every `meshserve serve` process",
  )  # fmt: skip
  modes.add_argument("--decode-streams", type=int, default=8, help="interference: streams")
  modes.add_argument("--decode-len", type=int, default=128, help="interference: their output")
  modes.add_argument("--long-prompts", type=int, default=8, help="interference: long prompts")
  modes.add_argument("--long-len", type=parse_range, default=(640, 768), help="their length")
  modes.add_argument("--long-rate", type=float, default=0.5, help="their arrivals per second")
  modes.add_argument("--log-dir", help="the servers' logs (default: a new temporary dir)")
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
  if args.compare_modes:
    if unknown := set(args.compare_modes) - set(MODES):
      p.error(f"--compare-modes: unknown {sorted(unknown)}; choose from {', '.join(MODES)}")
    if args.address or args.request_rate or args.offline:
      p.error("--compare-modes starts its own servers: no --address, --request-rate, --offline")
  elif not args.address:
    p.error("--address is required (or --compare-modes)")
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
  configuration and dtype, every step shape compiled first as the server does.
  model: a name or path for load_model, or a loaded Model."""
  from meshserve.engine import LLM, EngineConfig, SamplingParams
  from meshserve.models import load_model

  stats = info.stages[0].stats
  config = EngineConfig(
    page_size=info.page_size,
    num_pages=stats.total_kv_pages + 1,
    max_model_len=info.max_model_len,
    max_batch=info.max_batch,
    max_num_batched_tokens=info.max_num_batched_tokens,
  )
  if isinstance(model, str):  # in the server's dtype
    model = load_model(model, dtype=info.dtype or "float32")
  engine = LLM(model, config).engine
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


MODES = {
  # mode: the `meshserve serve` flags of each of its processes; the last one is the endpoint
  # ({prefill} and {decode}: the workers' addresses)
  "colocated": [[]],
  "disaggregated": [["--mode", "disaggregated", "--cpu-devices", "2"]],
  "router": [
    ["--role", "prefill"], ["--role", "decode"],
    ["--role", "router", "--prefill", "{prefill}", "--decode", "{decode}"],
  ],
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
  """Runs every level; 1 when no measured request succeeded, else 0."""
  args = parse_args(argv)
  if args.compare_modes:
    from compare_modes import compare_modes  # this folder is on sys.path

    return compare_modes(args)
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
    from meshserve.engine import api

    api.enable_compilation_cache()  # the server's compiled steps, where it shares this machine
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
