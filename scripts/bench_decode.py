"""Decode throughput of the default model against the weight-bandwidth roofline.

One run prints one table: the memory bandwidth measured now, the batch-1 roofline it implies
(float32 weight bytes / bandwidth), the bare jitted decode step and the engine's decode loop at
batch 1 and 32, and the ratios between them. Medians over repeats; the machine is noisy.

  python scripts/bench_decode.py [--steps 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from engine import LLM, EngineConfig, SamplingParams  # noqa: E402
from engine.runner import bucket, model_step  # noqa: E402
from engine.sampling import SamplingBatch  # noqa: E402


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


PROMPT_LEN = 6


def bare_step_time(llm: LLM, batch: int, steps: int, repeats: int) -> float:
  """Median seconds of the jitted decode step alone, with its cache donated step to step, at
  the shapes and mid-run context length the engine runs below."""
  cfg = llm.config
  pages = bucket(-(-(PROMPT_LEN + steps + 1) // cfg.page_size), cfg.page_buckets)
  cache = llm.runner.cache
  model = llm.model
  args = (
    jnp.zeros((batch, 1), jnp.int32),
    jnp.full((batch, 1), PROMPT_LEN + steps // 2, jnp.int32),
    jnp.arange(1, batch * pages + 1, dtype=jnp.int32).reshape(batch, pages),
    jnp.zeros((batch,), jnp.int32),
    SamplingBatch.build([SamplingParams()] * batch, [0] * batch, batch),
    jnp.zeros((batch,), jnp.int32),
  )

  def run():
    nonlocal cache
    tokens, _, cache = model_step(model.graphdef, model.state, cache, *args)
    tokens.block_until_ready()

  t = median_time(run, repeats)
  llm.runner.cache = cache
  return t


def engine_step_time(llm: LLM, batch: int, steps: int, repeats: int) -> float:
  """Seconds per decode step of LLM.generate (host loop included), median over repeats."""
  prompts = [[1 + i, 504, 3575, 282, 4649][: PROMPT_LEN - 1] + [314] for i in range(batch)]
  params = SamplingParams(max_tokens=steps + 1, ignore_eos=True)
  per_step = []
  for _ in range(repeats + 1):
    llm.generate(prompts, params)
    per_step.append(llm.last_timing["decode_s"] / llm.last_timing["steps"])
  return statistics.median(per_step[1:])  # the first run compiles


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=32, help="decode steps per engine run")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  llm = LLM(config=EngineConfig(num_pages=1024, max_model_len=512, max_batch=32))
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(llm.model.state))
  bandwidth = read_bandwidth(weight_bytes, args.repeats * 4)
  roofline_b1 = bandwidth / weight_bytes  # tokens/s if each step only streamed the weights
  rows = []
  for batch in (1, 32):
    bare = bare_step_time(llm, batch, args.steps, args.repeats * 4)
    eng = engine_step_time(llm, batch, args.steps, args.repeats)
    rows.append((batch, "bare jitted step", bare, bare))
    rows.append((batch, "engine (LLM.generate)", eng, bare))

  print(f"\ndevice: {jax.devices()[0].device_kind}, model: {llm.model.config.name} (float32)")
  print(f"weights: {weight_bytes / 1e6:.0f} MB, read bandwidth: {bandwidth / 1e9:.1f} GB/s")
  print(f"batch-1 roofline (weights bytes / bandwidth): {roofline_b1:.1f} tok/s\n")
  print(f"{'batch':>5} | {'path':<22} | {'step ms':>8} | {'tok/s':>8} | {'vs roofline':>11} | "
        f"{'vs bare':>7}")  # fmt: skip
  print("-" * 78)
  for batch, path, step, bare in rows:
    tok_s = batch / step
    print(f"{batch:>5} | {path:<22} | {step * 1e3:8.1f} | {tok_s:8.1f} | "
          f"{tok_s / roofline_b1:10.0%} | {bare / step:6.2f}x")  # fmt: skip
  print(
    "\nvs roofline: tokens/s over the batch-1 weight-streaming bound (batching can exceed it);"
    "\nvs bare: bare jitted step time / this path's step time (1.00x = no engine overhead)."
  )


if __name__ == "__main__":
  main()
