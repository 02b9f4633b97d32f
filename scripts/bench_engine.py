"""Offline engine throughput at several concurrencies, against the bare step and the roofline.

One pool of requests is drawn: prompt lengths uniform in [--min-prompt, --max-prompt],
--output-len output tokens each (EOS ignored). Concurrency C serves the first max(C,
--min-requests) of them with at most C in flight, a new one arriving as one finishes (a closed
loop, as vLLM's `--max-concurrency`), so concurrency 1 is not decided by one prompt's length.
Every level sees the same prompt-length distribution. One run prints one table:

  out tok/s        output tokens / wall time, prefill included
  TTFT, TPOT       time to first token (from arrival) and time per output token after it
  engine step      median wall time of the engine's decode-only steps at full batch, host work
                   (scheduling, page tables, detokenization) included
  bare step        median time of the jitted decode step alone at the same shape, replaying
                   the rows (page tables, positions) of one of the engine's own steps
                   mid-run, timed right after each measured pass
  KV share         how much of the bare step goes to reading the rows' context: 1 - (the same
                   step with every row one token in) / (bare step)
  padded           the share of prefill token slots (rows x row width) that held no token
  roofline         the larger of (weights + the batch's KV) bytes / measured read bandwidth
                   and the step's FLOPs / measured matmul throughput: no step can be faster

Every configuration first runs once unmeasured (it compiles its buckets). Then --rounds
measured passes go over all concurrencies in turn; out tok/s is the median over rounds, and
with several rounds each round's throughput ratios are printed too. The machine is noisy:
medians and ratios are the figures to read.

  python scripts/bench_engine.py [--concurrency 1 8 32 64] [--output-len 128] [--rounds 1]
                                 [--attention xla|native] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import statistics
import time
from typing import NamedTuple

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from machine import describe  # noqa: E402

from meshserve.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from meshserve.models import load_model  # noqa: E402


def median_time(fn, repeats: int) -> float:
  fn()  # compile / warm
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def read_bandwidth(nbytes: int, repeats: int) -> float:
  """Bytes/s of a jitted full read (a sum) over an array of `nbytes`."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  return nbytes / median_time(lambda: total(x).block_until_ready(), repeats)


def matmul_flops(repeats: int) -> float:
  """FLOP/s of a jitted float32 [1024, 1024] x [1024, 1024] matmul."""
  a = jnp.ones((1024, 1024), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  return 2 * 1024**3 / median_time(lambda: matmul(a, a).block_until_ready(), repeats)


def serve(engine: Engine, prompts: list[list[int]], output_len: int, concurrency: int):
  """Serves `prompts` with at most `concurrency` in flight, admitting the next as one
  finishes, until all finish: (outputs, wall seconds, decode-only full-batch steps grouped by
  shape: each step's seconds and the Batch it decoded, the padded share of prefill slots)."""
  params = SamplingParams(max_tokens=output_len, ignore_eos=True)
  queue = collections.deque(prompts)
  start = time.perf_counter()
  outputs, steps = [], collections.defaultdict(list)
  slots = tokens = 0  # prefill token slots dispatched (rows x width), and tokens in them
  while queue or engine.has_unfinished():
    while queue and len(engine.requests) < concurrency:
      engine.add_request(queue.popleft(), params)
    outputs += [o for o in engine.step() if o.finished]
    stats = engine.last_step
    if stats.prefill_tokens:
      B, T, _ = stats.shapes[0]
      slots, tokens = slots + B * T, tokens + stats.prefill_tokens
    if stats.prefill_tokens == 0 and stats.decodes == concurrency:
      steps[stats.shapes[0]].append((stats.seconds, decoded_batch(engine)))
  padded = 1 - tokens / slots if slots else 0.0
  return outputs, time.perf_counter() - start, steps, padded


class Batch(NamedTuple):
  """The rows a decode step ran: each one's page table and the position it computed."""

  tables: list[list[int]]
  positions: list[int]


def decoded_batch(engine: Engine) -> Batch | None:
  """The rows the last decode-only step ran, read from the allocator; None when a row finished
  in it (its table is gone)."""
  running = engine.scheduler.running
  if len(running) != engine.last_step.decodes:
    return None
  tables = [list(engine.allocator.table(r.request_id)) for r in running]
  return Batch(tables, [r.num_computed - 1 for r in running])


def bare_step_time(engine: Engine, shape: tuple[int, ...], batch: Batch, repeats: int) -> float:
  """Median seconds of the compiled decode step alone at `shape` (B, 1, P), its cache donated
  step to step, replaying `batch`: the engine's own rows, pages and positions, ordered as the
  runner orders them (longest first). The same attention work and memory access as the
  engine's step, without the host's."""
  B, _, P = shape
  runner, model = engine.runner, engine.model
  positions = np.full((B, 1), -1, np.int32)
  page_table = np.zeros((B, P), np.int32)  # unused entries point at the sink page
  rows = sorted(zip(batch.positions, batch.tables, strict=True), key=lambda row: -row[0])
  for i, (position, table) in enumerate(rows):
    positions[i, 0] = position
    page_table[i, : len(table)] = table
  tokens, _, _, zeros, sampling, _ = runner.dummy_inputs(shape)
  args = jax.device_put((tokens, positions, page_table, zeros, sampling, zeros))
  executable = runner.executables[shape]

  def run():
    sampled, _, runner.cache, runner.page_tokens = executable(
      model.state, runner.cache, runner.page_tokens, *args
    )
    sampled.tokens.block_until_ready()

  return median_time(run, repeats)


class Run(NamedTuple):
  """One measured pass at one concurrency."""

  outputs: list
  seconds: float
  steps: dict  # decode-only full-batch step times by shape
  bare: float  # median bare step at `commonest(steps)`, timed right after the pass
  no_context: float  # the same with every row one token in
  padded: float  # the share of prefill token slots that held padding


def commonest(steps: dict) -> tuple[int, ...]:
  """The shape the decode-only steps took most often."""
  return max(steps, key=lambda shape: len(steps[shape]))


def throughput(run: Run) -> float:
  return sum(o.num_output_tokens for o in run.outputs) / run.seconds


def percentile(values, q) -> float:
  return float(np.percentile(np.asarray(values), q))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
  parser.add_argument("--min-prompt", type=int, default=32)
  parser.add_argument("--max-prompt", type=int, default=512)
  parser.add_argument("--output-len", type=int, default=128)
  parser.add_argument("--page-size", type=int, default=EngineConfig().page_size)
  parser.add_argument(
    "--attention", choices=["xla", "native"], help="attention backend (default: the platform's)"
  )
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  parser.add_argument(
    "--min-requests", type=int, default=8, help="requests served at low concurrency"
  )
  parser.add_argument("--repeats", type=int, default=10, help="bare-step timing repeats")
  parser.add_argument(
    "--rounds", type=int, default=1,
    help="measured passes over every concurrency, interleaved; out tok/s is their median",
  )  # fmt: skip
  args = parser.parse_args()

  model = load_model(attention=args.attention, dtype=args.dtype)
  cfg = model.config
  page_size = args.page_size
  max_len = -(-(args.max_prompt + args.output_len) // page_size) * page_size
  top = max(args.concurrency)
  config = EngineConfig(
    page_size=page_size,
    num_pages=top * (max_len // page_size) + 1,
    max_model_len=max_len,
    max_batch=top,
    prefix_caching=False,  # random prompts share nothing; keep the comparison plain
  )
  engine = Engine(model, config)
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(model.state))
  bandwidth = read_bandwidth(weight_bytes, 20)
  flops = matmul_flops(20)
  num_params = sum(x.size for x in jax.tree.leaves(model.state))
  kv_bytes_per_token = (
    2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
  )
  rng = random.Random(0)
  pool = [
    [rng.randrange(3, cfg.vocab_size) for _ in range(rng.randint(args.min_prompt, args.max_prompt))]
    for _ in range(max(top, args.min_requests))
  ]

  def workload(n: int) -> list[list[int]]:
    return pool[: max(n, args.min_requests)]

  def mean_context(n: int) -> float:
    return statistics.mean(len(p) for p in workload(n)) + args.output_len / 2

  def measure(n: int) -> Run:
    """One measured pass at concurrency n, then the bare step at the shape the engine's decode
    steps took most often, timed right after so both see the same stretch of machine noise."""
    outputs, seconds, steps, padded = serve(engine, workload(n), args.output_len, n)
    shape = commonest(steps)
    batches = [batch for _, batch in steps[shape] if batch is not None]
    mid = batches[len(batches) // 2]  # the rows in flight mid-run
    bare = bare_step_time(engine, shape, mid, args.repeats)
    no_context = bare_step_time(engine, shape, Batch(mid.tables, [0] * n), args.repeats)
    step_times = {s: [t for t, _ in group] for s, group in steps.items()}
    return Run(outputs, seconds, step_times, bare, no_context, padded)

  for n in args.concurrency:
    serve(engine, workload(n), args.output_len, n)  # compiles every bucket this workload meets
  runs = collections.defaultdict(list)  # concurrency -> one Run per round
  for _ in range(args.rounds):
    for n in args.concurrency:
      runs[n].append(measure(n))

  rows = []
  for n in args.concurrency:
    tok_s = statistics.median(throughput(run) for run in runs[n])
    outputs = [o for run in runs[n] for o in run.outputs]
    ttft = [o.timing.first_token_s for o in outputs]
    tpot = [
      (o.timing.finished_s - o.timing.first_token_s) / (o.num_output_tokens - 1) for o in outputs
    ]
    steps = collections.defaultdict(list)
    for run in runs[n]:
      for shape, times in run.steps.items():
        steps[shape] += times
    shape = commonest(steps)
    engine_step = statistics.median(steps[shape])
    same = [run for run in runs[n] if commonest(run.steps) == shape]
    bare = statistics.median(run.bare for run in same)
    no_context = statistics.median(run.no_context for run in same)
    step_bytes = weight_bytes + n * mean_context(n) * kv_bytes_per_token
    step_flops = n * (
      2 * num_params + 4 * mean_context(n) * cfg.num_layers * cfg.num_heads * cfg.head_dim
    )
    roofline = max(step_bytes / bandwidth, step_flops / flops)
    seconds_per_step = (engine_step, bare, no_context, roofline)
    padded = statistics.median(run.padded for run in runs[n])
    rows.append((n, len(workload(n)), tok_s, ttft, tpot, *seconds_per_step, padded, shape))

  print(f"\n{describe()}")
  print(
    f"model: {cfg.name} ({args.dtype}), prompts "
    f"{args.min_prompt}-{args.max_prompt} tokens, {args.output_len} output tokens, "
    f"KV pages of {page_size} tokens, {model.attention.kind} attention"
  )
  print(
    f"weights: {weight_bytes / 1e6:.0f} MB, read bandwidth: {bandwidth / 1e9:.1f} GB/s, "
    f"matmul: {flops / 1e9:.0f} GFLOP/s\n"
  )
  header = (
    f"{'conc':>4} | {'reqs':>4} | {'out tok/s':>9} | {'TTFT p50':>8} | {'TTFT p99':>8} | "
    f"{'TPOT p50':>8} | {'TPOT p99':>8} | {'engine step':>11} | {'bare step':>9} | "
    f"{'engine/bare':>11} | {'KV share':>8} | {'roofline':>8} | {'bare/roofline':>13} | "
    f"{'padded':>6}"
  )
  print(header)
  print("-" * len(header))
  for n, reqs, tok_s, ttft, tpot, eng, bare, no_context, roof, padded, _ in rows:
    print(
      f"{n:>4} | {reqs:>4} | {tok_s:9.1f} | "
      f"{percentile(ttft, 50):7.2f}s | {percentile(ttft, 99):7.2f}s | "
      f"{percentile(tpot, 50) * 1e3:6.0f}ms | {percentile(tpot, 99) * 1e3:6.0f}ms | "
      f"{eng * 1e3:9.1f}ms | {bare * 1e3:7.1f}ms | {eng / bare:10.2f}x | "
      f"{1 - no_context / bare:8.0%} | "
      f"{roof * 1e3:6.1f}ms | {bare / roof:12.1f}x | {padded:6.0%}"
    )
  first, _, base, *_ = rows[0]
  ratios = (f"c{n}/c{first} throughput: {tok_s / base:.1f}x" for n, _, tok_s, *_ in rows[1:])
  print("\n" + ", ".join(ratios))
  if args.rounds > 1:  # a round's runs are minutes apart, so its ratio shrugs off slow drift
    for n in args.concurrency[1:]:
      pairs = zip(runs[n], runs[first], strict=True)
      per_round = ", ".join(f"{throughput(a) / throughput(b):.1f}x" for a, b in pairs)
      print(f"c{n}/c{first} per round: {per_round}")
  print("step shapes (B, T, P, history, top): " + ", ".join(f"c{r[0]}: {r[-1]}" for r in rows))


if __name__ == "__main__":
  main()
