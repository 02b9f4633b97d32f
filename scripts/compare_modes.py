"""`benchmark_serving.py --compare-modes`: each serving topology (colocated, disaggregated in
one process, router over prefill and decode workers) started in turn on this machine, the same
workloads run on each, one table. See benchmark_serving.py's docstring."""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
import sys
import time

import numpy as np
from benchmark_serving import MODES, _jsonable
from serving import Server, free_port
from serving_load import WARMUP_SEED_OFFSET, make_channel, make_requests, run_level, summarize

from meshserve.server.proto.meshserve.v1 import inference_pb2, inference_pb2_grpc


class Topology:
  """The processes of one serving mode on this machine (scripts/serving.py: loopback only,
  free ports, stopped by their own PIDs)."""

  def __init__(self, mode: str, serve_args: list[str], log_dir: str):
    processes = MODES[mode]
    ports = [free_port() for _ in processes]
    fill = {
      "prefill": f"127.0.0.1:{ports[0]}",
      "decode": f"127.0.0.1:{ports[min(1, len(ports) - 1)]}",
    }
    self.mode = mode
    self.servers = [
      Server(*serve_args, *(f.format(**fill) for f in flags), port=port, cache=None,
             engine_flags=(), platform=None, log=pathlib.Path(log_dir) / f"{mode}-{i}.log")
      for i, (flags, port) in enumerate(zip(processes, ports, strict=True))
    ]  # fmt: skip
    self.address = self.servers[-1].address

  def wait_serving(self, timeout: float = 1800.0) -> None:
    """Each process in turn (the workers, then the endpoint): one that exits fails it."""
    for server in self.servers:
      server.wait_serving(timeout)

  def stop(self) -> None:
    for server in reversed(self.servers):
      with contextlib.suppress(Exception):
        server.terminate()
      server.stop()


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
