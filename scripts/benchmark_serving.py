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
import contextlib
import json
import math
import sys
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


class Topology:
  """The processes of one serving mode on this machine: loopback only, free ports, stopped by
  their own PIDs."""

  def __init__(self, mode: str, serve_args: list[str], log_dir: str):
    import pathlib
    import subprocess

    processes = MODES[mode]
    ports = [_free_port() for _ in processes]
    fill = {
      "prefill": f"127.0.0.1:{ports[0]}",
      "decode": f"127.0.0.1:{ports[min(1, len(ports) - 1)]}",
    }
    self.mode, self.address = mode, f"127.0.0.1:{ports[-1]}"
    self.procs = []
    for i, (flags, port) in enumerate(zip(processes, ports, strict=True)):
      argv = [sys.executable, "-m", "meshserve.server.cli", "serve", "--host", "127.0.0.1",
              "--port", str(port), *serve_args, *(f.format(**fill) for f in flags)]  # fmt: skip
      log = open(pathlib.Path(log_dir) / f"{mode}-{i}.log", "w")  # noqa: SIM115 - kept with the process
      self.procs.append((subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), log))
    self.addresses = [f"127.0.0.1:{p}" for p in ports]

  def wait_serving(self, timeout: float = 1800.0) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(self.address) as channel:
      check = health_pb2_grpc.HealthStub(channel).Check
      while time.monotonic() < deadline:
        if any(p.poll() is not None for p, _ in self.procs):
          raise RuntimeError(f"{self.mode}: a server exited; see its log")
        with contextlib.suppress(grpc.RpcError):
          if check(health_pb2.HealthCheckRequest(), timeout=5).status == 1:  # SERVING
            return
        time.sleep(0.5)
    raise TimeoutError(f"{self.mode}: not SERVING after {timeout}s")

  def stop(self) -> None:
    import signal

    for proc, _ in reversed(self.procs):
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    for proc, log in self.procs:
      try:
        proc.wait(60)
      except Exception:  # noqa: BLE001 - it would not stop: kill it
        proc.kill()
        proc.wait(30)
      log.close()


def _free_port() -> int:
  import socket

  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


async def run_interference(stub, args, seed: int) -> tuple[dict, dict, list, list]:
  """Steady decode streams while long prompts arrive: (summary of the decode streams, summary
  of the long prompts, and their results)."""
  background = make_requests(
    args.decode_streams * 4, (16, 32), (args.decode_len, args.decode_len), seed
  )
  long = make_requests(args.long_prompts, args.long_len, (4, 4), seed + 1)
  start = time.perf_counter()

  async def delayed_long():
    await asyncio.sleep(2.0)  # the decode streams are running by then
    return await run_level(stub, long, rate=args.long_rate, seed=seed, timeout=args.timeout)

  bg, lg = await asyncio.gather(
    run_level(stub, background, concurrency=args.decode_streams, timeout=args.timeout),
    delayed_long(),
  )
  duration = time.perf_counter() - start
  summaries = [summarize(r, duration, args.slo_ttft_ms, args.slo_tpot_ms) for r in (bg, lg)]
  return summaries[0], summaries[1], bg, lg


async def _measure_mode(address: str, args) -> dict:
  channel = make_channel(address)
  stub = inference_pb2_grpc.InferenceStub(channel)
  info = inference_pb2.GetModelInfoRequest()
  try:
    warm = make_requests(2, args.input_len, args.output_len, args.seed + WARMUP_SEED_OFFSET)
    await run_level(stub, warm, concurrency=2, timeout=args.timeout)
    before = await stub.GetModelInfo(info, timeout=30)
    steady = []
    for i, level in enumerate(args.concurrency):
      requests = make_requests(
        args.num_requests or max(16, 2 * level), args.input_len, args.output_len, args.seed + i
      )
      start = time.perf_counter()
      results = await run_level(stub, requests, concurrency=level, timeout=args.timeout)
      summary = summarize(results, time.perf_counter() - start, args.slo_ttft_ms, args.slo_tpot_ms)
      steady.append((level, summary, results))
    bg, lg, bg_results, lg_results = await run_interference(stub, args, args.seed + 100)
    after = await stub.GetModelInfo(info, timeout=30)
  finally:
    await channel.close()
  transfers = sum(s.stats.kv_transfers for s in after.stages) - sum(
    s.stats.kv_transfers for s in before.stages
  )
  transfer_s = sum(s.stats.kv_transfer_seconds for s in after.stages) - sum(
    s.stats.kv_transfer_seconds for s in before.stages
  )
  compiled = [sum(s.stats.compilations for s in i.stages) for i in (before, after)]
  return {
    "layout": after.layout,
    "steady": steady,
    "interference": (bg, lg, bg_results, lg_results),
    "transfer_ms": 1e3 * transfer_s / transfers if transfers else None,
    "compilations_during_run": compiled[1] - compiled[0],
  }


def compare_modes(args) -> int:
  """Starts each mode's processes in turn, runs both workloads, prints one table."""
  import tempfile

  log_dir = args.log_dir or tempfile.mkdtemp(prefix="meshserve-modes-")
  serve_args = args.serve_args.split()
  results = {}
  for mode in args.compare_modes:
    topology = Topology(mode, serve_args, log_dir)
    try:
      start = time.perf_counter()
      topology.wait_serving()
      print(f"{mode}: SERVING in {time.perf_counter() - start:.0f}s", file=sys.stderr)
      results[mode] = asyncio.run(_measure_mode(topology.address, args))
    finally:
      topology.stop()
  rows = []
  head = (f"{'mode':>13} {'layout':>32} {'workload':>14} {'tok/s':>7} {'ttft50':>7} {'ttft99':>7}"
          f" {'tpot50':>7} {'tpot99':>7} {'xfer ms':>8}")  # fmt: skip
  print(head)
  for mode, r in results.items():
    xfer = "-" if r["transfer_ms"] is None else f"{r['transfer_ms']:.1f}"
    for level, s, _ in r["steady"]:
      rows.append((mode, r["layout"], f"steady c={level}", s))
    bg, lg, *_ = r["interference"]
    rows += [(mode, r["layout"], "decode streams", bg), (mode, r["layout"], "long prompts", lg)]
    for m, layout, workload, s in rows[-len(r["steady"]) - 2 :]:
      t, p = s["ttft_ms"], s["tpot_ms"]
      cells = [s["output_throughput"], t["p50"], t["p99"], p["p50"], p["p99"]]
      shown = " ".join(f"{'-' if v is None else f'{v:.1f}':>7}" for v in cells)
      print(f"{m:>13} {layout:>32} {workload:>14} {shown} {xfer:>8}")
    if r["compilations_during_run"]:
      print(f"{mode}: {r['compilations_during_run']} compilations during the run")
  print("(ms; 'decode streams' keep decoding while 'long prompts' arrive: their tpot99 is the"
        " interference)")  # fmt: skip
  if args.plot:
    _plot_modes(results, args.plot)
  if args.json:
    record = {
      "args": vars(args),
      "modes": {
        mode: {
          "layout": r["layout"],
          "transfer_ms": r["transfer_ms"],
          "steady": [s for _, s, _ in r["steady"]],
          "decode_streams": r["interference"][0],
          "long_prompts": r["interference"][1],
        }
        for mode, r in results.items()
      },
    }
    with open(args.json, "w") as f:
      json.dump(_jsonable(record), f, indent=2, allow_nan=False)
  return 0 if all(s["ok"] for *_, s in rows) else 1


def _plot_modes(results: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  modes = list(results)
  fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
  steady = [results[m]["steady"][0][1]["output_throughput"] for m in modes]
  axes[0].bar(modes, steady, color="tab:blue")
  axes[0].set(title=f"steady c={results[modes[0]]['steady'][0][0]}: output tok/s", ylabel="tok/s")
  panels = (("decode streams TPOT", "tpot_ms", 0), ("long prompts TTFT", "ttft_ms", 1))
  for ax, (name, key, i) in zip(axes[1:], panels, strict=True):
    for j, p in enumerate(("p50", "p99")):
      values = [results[m]["interference"][i][key][p] or 0 for m in modes]
      ax.bar(np.arange(len(modes)) + 0.4 * j - 0.2, values, width=0.4, label=p)
    ax.set_xticks(range(len(modes)), modes)
    ax.set(title=f"interference: {name}", ylabel="ms")
    ax.legend()
  for ax in axes:
    ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv: list[str] | None = None) -> int:
  """Runs every level; 1 when no measured request succeeded, else 0."""
  args = parse_args(argv)
  if args.compare_modes:
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
    from meshserve.engine.runner import enable_compilation_cache

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
