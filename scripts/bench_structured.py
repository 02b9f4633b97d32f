"""What structured output costs: output tok/s with every row under a realistic JSON Schema,
against the same rows unconstrained, at concurrency 1 and 64.

C requests (varied prompts asking for a product catalog) start together on one offline engine
and each generates --output-len tokens. The schema (an object holding 8 to 40 products of five
typed fields) cannot close within that many tokens, and free rows ignore EOS, so both runs
make the same number of tokens and the ratio is the cost alone. Rounds alternate the two, and
the table gives medians:

  out tok/s      output tokens / wall time, prefill included
  decode step    median engine step once every row decodes (host work included)
  mask fill      median time per step of filling the constrained rows' bitmasks
                 (llguidance, on its own thread pool), inside the decode step
  append         median time per step of each row's new-token bookkeeping (Engine._append:
                 EOS, stop ids, length; for a constrained row, advancing its matcher too)
  bare step      the jitted decode step alone at the run's shape, with every row's mask all
                 ones (it skips the mask) and with a mask in every row: the device's share

The host work of a constrained row (mask fill and advance) runs between two device steps, as
all scheduling does until async scheduling (ARCHITECTURE.md); the table shows how much it is.

  python scripts/bench_structured.py [--concurrency 1 64] [--output-len 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
from machine import describe  # noqa: E402

from meshserve.engine import (  # noqa: E402
  Constraint,
  Engine,
  EngineConfig,
  SamplingParams,
  structured,  # noqa: E402
)
from meshserve.models import load_model  # noqa: E402

PRODUCT = {
  "type": "object",
  "properties": {
    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
    "name": {"type": "string", "maxLength": 40},
    "price": {"type": "number", "minimum": 0, "maximum": 10000},
    "category": {"enum": ["tools", "garden", "kitchen", "toys", "books"]},
    "in_stock": {"type": "boolean"},
  },
  "required": ["sku", "name", "price", "category", "in_stock"],
  "additionalProperties": False,
}
CATALOG = {
  "type": "object",
  "properties": {
    "store": {"type": "string", "maxLength": 40},
    "products": {"type": "array", "items": PRODUCT, "minItems": 8, "maxItems": 40},
  },
  "required": ["store", "products"],
  "additionalProperties": False,
}
TOPICS = ["a hardware store", "a garden centre", "a kitchen shop", "a toy shop", "a bookshop"]


class Timer:
  """Wall seconds spent in the functions it wraps, since the last reset."""

  def __init__(self):
    self.seconds = 0.0

  def wrap(self, fn):
    @functools.wraps(fn)
    def timed(*args, **kw):
      start = time.perf_counter()
      try:
        return fn(*args, **kw)
      finally:
        self.seconds += time.perf_counter() - start

    return timed


def run(engine: Engine, prompts, params: SamplingParams, fill: Timer, advance: Timer) -> dict:
  """Serves `prompts` together: output tok/s, and per-step medians of the decode step, the
  mask fill and the matchers' advance (steps where every row decodes)."""
  start = time.perf_counter()
  for p in prompts:
    engine.add_request(p, params)
  tokens, steps = 0, {"step": [], "fill": [], "advance": []}
  while engine.has_unfinished():
    fill.seconds = advance.seconds = 0.0
    tokens += sum(len(d.new_token_ids) for d in engine.step())
    stats = engine.last_step
    if stats.prefill_tokens == 0 and stats.decodes == len(prompts):
      steps["step"].append(stats.seconds)
      steps["fill"].append(fill.seconds)
      steps["advance"].append(advance.seconds)
  seconds = time.perf_counter() - start
  return {"tok_s": tokens / seconds, **{k: statistics.median(v) for k, v in steps.items()}}


def bare_step(engine: Engine, batch: int, masked: bool, repeats: int = 20) -> float:
  """Median seconds of the jitted decode step alone at (batch, 1, P): every row all-padding,
  its mask all ones or (masked) half the vocabulary allowed."""
  runner = engine.runner
  shape = engine.config.step_shape([1] * batch, [1] * batch, prefill=False)
  tokens, positions, table, logits_at, sampling, index = runner.dummy_inputs(shape)
  if masked:
    allowed = np.full_like(sampling.allowed, -1)
    allowed[:, ::2] = 0  # every other word: half the vocabulary out
    sampling = dataclasses.replace(sampling, allowed=allowed)
  inputs = (tokens, positions, table, logits_at, sampling, index)
  times = []
  for i in range(repeats + 1):
    start = time.perf_counter()
    sampled, _ = runner._dispatch(*inputs)
    sampled.tokens.block_until_ready()
    if i:  # the first: warm
      times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
  p.add_argument("--output-len", type=int, default=64)
  p.add_argument("--rounds", type=int, default=3)
  args = p.parse_args(argv)

  model = load_model("smollm2-135m-instruct")
  C = max(args.concurrency)
  config = EngineConfig(max_model_len=256, num_pages=C * 256 // 16 + 1, max_batch=C)
  engine = Engine(model, config)
  fill, advance = Timer(), Timer()
  structured.fill = fill.wrap(structured.fill)  # the runner calls it through the module
  Engine._append = advance.wrap(Engine._append)  # each sampled token's bookkeeping
  tokenizer = model.tokenizer
  prompts = [
    tokenizer.encode(f"List the products of {TOPICS[i % len(TOPICS)]} as JSON, store {i}:")
    for i in range(C)
  ]
  schema = Constraint("json_schema", json.dumps(CATALOG))
  ways = {
    "free": SamplingParams(max_tokens=args.output_len, ignore_eos=True),
    "json_schema": SamplingParams(max_tokens=args.output_len, ignore_eos=True, constraint=schema),
  }
  for c in args.concurrency:  # compiles every shape, builds the tokenizer view
    for params in ways.values():
      run(engine, prompts[:c], params, fill, advance)
  results = {(c, w): [] for c in args.concurrency for w in ways}
  for _ in range(args.rounds):
    for c in args.concurrency:
      for name, params in ways.items():
        results[c, name].append(run(engine, prompts[:c], params, fill, advance))

  print(describe())
  print(
    f"model: {model.config.name}, {args.output_len} output tokens a row, {args.rounds} rounds "
    f"(medians); schema: a store's catalog of 8-40 products, {len(schema.value)} characters\n"
  )
  print(
    "| concurrency | rows | out tok/s | vs free | decode step ms | mask fill ms | append ms "
    "| bare step ms (no mask / mask) |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for c in args.concurrency:
    free = statistics.median(r["tok_s"] for r in results[c, "free"])
    bare = bare_step(engine, c, False), bare_step(engine, c, True)
    for name in ways:
      rs = results[c, name]
      tok_s = statistics.median(r["tok_s"] for r in rs)
      step, mask, adv = (
        statistics.median(r[k] for r in rs) * 1e3 for k in ("step", "fill", "advance")
      )
      print(
        f"| {c} | {name} | {tok_s:.1f} | {tok_s / free:.3f}x | {step:.1f} | {mask:.2f} | "
        f"{adv:.2f} | {bare[0] * 1e3:.1f} / {bare[1] * 1e3:.1f} |"
      )


if __name__ == "__main__":
  main()
