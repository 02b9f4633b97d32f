"""Offline throughput on issue 16's workload: dtypes and prefill layouts side by side, profiled.

The workload: --requests prompts of --words random words (from a 20-word vocabulary), each
asking for --output-len greedy tokens (EOS ignored), all submitted at once to one engine with
room for all of them (concurrency = --requests). A warm-up pass with other prompts compiles
every shape first; nothing is shared between warm-up and the measured passes (the prefix
cache is off). Then concurrency 1: --c1-requests requests one after another.

Each configuration is DTYPE:SEGMENT, the model's dtype and the engine's prefill row width
(`EngineConfig.prefill_segment`; 0: one row per prompt chunk, as before segmented prefill).
The first is the baseline the others are compared with. For each configuration and measured
pass, the engine's own step records split the wall time:
  prefill steps   steps that ran prompt tokens (their decode rows ride along)
  decode steps    steps that only decoded; `decode step` is their median at the full batch
  padded          the share of prefill token slots (rows x bucket width) that held no token
Output tok/s is the median over --rounds passes; the machine is noisy, so read the ratios.

  python scripts/bench_throughput.py [--configs float32:0 float32:16 bfloat16:0 bfloat16:16]
                                     [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from meshserve.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from meshserve.models import load_model  # noqa: E402

WORDS = "the cat sat on a mat and dog ran to big red house with small green tree under blue sky"


def prompts(tokenizer, n: int, words: tuple[int, int], seed: int) -> list[list[int]]:
  rng = random.Random(seed)
  vocab = WORDS.split()
  texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(*words))) for _ in range(n)]
  return [tokenizer.encode(t, add_special_tokens=True) for t in texts]


def run(engine: Engine, batch: list[list[int]], output_len: int, concurrency: int) -> dict:
  """Serves `batch` with at most `concurrency` in flight; the wall time and its split."""
  params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
  queue = list(batch)
  prefill_s = decode_s = 0.0
  slots = tokens = 0
  full_decode = []
  start = time.perf_counter()
  while queue or engine.has_unfinished():
    while queue and len(engine.requests) < concurrency:
      engine.add_request(queue.pop(0), params)
    engine.step()
    step = engine.last_step
    if step.prefill_tokens:
      prefill_s += step.seconds
      B, T, _ = step.shapes[0]
      slots, tokens = slots + B * T, tokens + step.prefill_tokens
    else:
      decode_s += step.seconds
      if step.decodes == concurrency:
        full_decode.append(step.seconds)
  wall = time.perf_counter() - start
  return dict(
    tok_s=len(batch) * output_len / wall,
    wall=wall,
    prefill=prefill_s,
    decode=decode_s,
    padded=1 - tokens / slots if slots else 0.0,
    decode_step=statistics.median(full_decode) if full_decode else float("nan"),
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--configs", nargs="+", default=["float32:0", "float32:16", "bfloat16:0", "bfloat16:16"],
    help="DTYPE:SEGMENT each; the first is the baseline",
  )  # fmt: skip
  parser.add_argument("--requests", type=int, default=64)
  parser.add_argument("--words", type=int, nargs=2, default=(16, 96), metavar=("MIN", "MAX"))
  parser.add_argument("--output-len", type=int, default=64)
  parser.add_argument("--c1-requests", type=int, default=4)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument(
    "--max-prefill-seqs", type=int, default=EngineConfig().max_prefill_seqs,
    help="prompts prefilled in one step",
  )  # fmt: skip
  args = parser.parse_args()

  results = {}
  for name in args.configs:
    dtype, segment = name.split(":")
    model = load_model(dtype=jnp.dtype(dtype))
    n = args.requests
    config = EngineConfig(
      max_batch=n, max_model_len=256, num_pages=n * 16 + 1, prefix_caching=False,
      max_prefill_seqs=args.max_prefill_seqs, prefill_segment=int(segment),
    )  # fmt: skip
    engine = Engine(model, config)
    tok = model.tokenizer
    run(engine, prompts(tok, n, args.words, seed=0), args.output_len, n)  # compiles
    c64 = [run(engine, prompts(tok, n, args.words, seed=1 + r), args.output_len, n)
           for r in range(args.rounds)]  # fmt: skip
    c1_batch = prompts(tok, args.c1_requests, args.words, seed=100)
    run(engine, c1_batch, args.output_len, 1)  # compiles the batch-1 shapes
    c1 = [run(engine, c1_batch, args.output_len, 1) for _ in range(args.rounds)]
    results[name] = (c64, c1)
    del engine, model

  median = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
  base = args.configs[0]
  print(
    f"\ndevice: {jax.devices()[0].device_kind} x{os.cpu_count()} cores, SmolLM2-135M, "
    f"{args.requests} prompts of {args.words[0]}-{args.words[1]} words all at once, "
    f"{args.output_len} greedy tokens each; medians of {args.rounds} passes\n"
  )
  header = (
    f"{'dtype:segment':>13} | {'c64 tok/s':>9} | {'vs ' + base:>12} | {'wall':>6} | "
    f"{'prefill':>7} | {'decode':>6} | {'decode step':>11} | {'padded':>6} | {'c1 tok/s':>8} | "
    f"{'vs ' + base:>12}"
  )
  print(header)
  print("-" * len(header))
  for name, (c64, c1) in results.items():
    ratio = median(c64, "tok_s") / median(results[base][0], "tok_s")
    ratio1 = median(c1, "tok_s") / median(results[base][1], "tok_s")
    print(
      f"{name:>13} | {median(c64, 'tok_s'):9.1f} | {ratio:11.2f}x | {median(c64, 'wall'):5.1f}s | "
      f"{median(c64, 'prefill'):6.1f}s | {median(c64, 'decode'):5.1f}s | "
      f"{median(c64, 'decode_step') * 1e3:9.0f}ms | {median(c64, 'padded'):6.0%} | "
      f"{median(c1, 'tok_s'):8.1f} | {ratio1:11.2f}x"
    )


if __name__ == "__main__":
  main()
