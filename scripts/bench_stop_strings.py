"""What the worst legal stop strings cost another request: its time per output token.

A "heavy" request generates tokens under the most and the longest stop strings the API allows
(SamplingParams: 16 of 256 characters, none of which ever matches). Once it has 2,000 tokens
of text (--lead), a second request (the "victim") starts beside it; its time per
output token (TPOT, after its first token) is measured. The same is done with a "plain" twin
of the heavy request (same prompt and length, no stop strings). Both run on one engine core
thread, as in the server, so any cost of stop matching there lands on the victim's steps.

Rounds alternate plain and heavy; the table gives each one's median TPOT and their ratio, and
the stop matching's own cost per token measured on the heavy request's text (a TextStream fed
that text alone, no model), beside the engine's median step time.

  python scripts/bench_stop_strings.py [--rounds 3] [--lead 2000] [--victim-tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import string
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from machine import describe  # noqa: E402

from meshserve.engine import AsyncEngine, Engine, EngineConfig, SamplingParams  # noqa: E402
from meshserve.engine.output import TextStream  # noqa: E402
from meshserve.engine.sampling import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS  # noqa: E402
from meshserve.models import load_model  # noqa: E402


def worst_stops() -> tuple[str, ...]:
  """The most and the longest stop strings allowed; each a near-miss of itself repeated, so
  the matchers keep partial matches alive (a rare character ends each)."""
  alphabet = string.ascii_lowercase + " "
  return tuple(
    (alphabet[i % len(alphabet)] + " ") * (MAX_STOP_STRING_CHARS // 2 - 1) + "\x07~"
    for i in range(MAX_STOP_STRINGS)
  )


async def run_once(engine: AsyncEngine, heavy: SamplingParams, args) -> tuple[float, str]:
  """The victim's TPOT while `heavy` runs on from its --lead-th token; the heavy request's
  text so far."""
  heavy_text, started = [], asyncio.Event()

  async def run_heavy():
    n = 0
    async for delta in engine.generate("Write a very long story about the sea.", heavy):
      heavy_text.append(delta.new_text)
      n += len(delta.new_token_ids)
      if n >= args.lead:
        started.set()

  heavy_task = asyncio.create_task(run_heavy())
  await started.wait()
  victim = SamplingParams(max_tokens=args.victim_tokens, ignore_eos=True)
  stamps = []
  async for delta in engine.generate("List the planets of the solar system.", victim):
    stamps += [time.perf_counter()] * len(delta.new_token_ids)
  heavy_task.cancel()  # it has served its purpose; leaving its stream aborts it
  with contextlib.suppress(asyncio.CancelledError):
    await heavy_task
  return (stamps[-1] - stamps[0]) / (len(stamps) - 1), "".join(heavy_text)


def matching_cost(text: str, tokenizer, stops: tuple[str, ...]) -> float:
  """Seconds per token of a TextStream over `text`'s tokens with `stops`, minus without."""

  def run(stop):
    ids = tokenizer.encode(text)
    stream = TextStream(tokenizer, stop)
    start = time.perf_counter()
    for t in ids:
      stream.add(t)
    return (time.perf_counter() - start) / len(ids)

  return statistics.median(run(stops) for _ in range(3)) - statistics.median(
    run(()) for _ in range(3)
  )


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--lead", type=int, default=2000, help="heavy tokens before the victim starts")
  p.add_argument("--victim-tokens", type=int, default=128)
  args = p.parse_args()

  model = load_model("smollm2-135m-instruct")
  config = EngineConfig(max_model_len=4096, num_pages=1024, max_batch=4)
  engine = AsyncEngine(Engine(model, config))
  stops = worst_stops()
  length = args.lead + 4 * args.victim_tokens  # outlives the victim
  plain = SamplingParams(max_tokens=length, ignore_eos=True)
  heavy = SamplingParams(max_tokens=length, ignore_eos=True, stop=stops)

  async def measure():
    await run_once(engine, plain, args)  # compiles every shape the runs below use
    tpot = {"plain": [], "heavy": []}
    text = ""
    for _ in range(args.rounds):
      for name, params in (("plain", plain), ("heavy", heavy)):
        seconds, out = await run_once(engine, params, args)
        tpot[name].append(seconds)
        text = out if name == "heavy" else text
    return tpot, text

  try:
    tpot, text = asyncio.run(measure())
  finally:
    engine.shutdown(60)
  step = statistics.median(tpot["plain"])
  cost = matching_cost(text, model.tokenizer, stops)
  ratio = statistics.median(tpot["heavy"]) / step
  print(describe())
  print(
    f"heavy request: {len(stops)} stop strings of {len(stops[0])} characters, "
    f"{len(text)} characters of text by the victim's end; victim: {args.victim_tokens} tokens "
    f"from the heavy request's token {args.lead} on; {args.rounds} rounds\n"
  )
  print("| beside the victim | victim TPOT ms (median) | each round ms | vs plain |")
  print("|---|---|---|---|")
  for name in ("plain", "heavy"):
    rounds = ", ".join(f"{t * 1e3:.1f}" for t in tpot[name])
    median = statistics.median(tpot[name])
    print(f"| {name} | {median * 1e3:.1f} | {rounds} | {median / step:.3f}x |")
  print(
    f"\nstop matching alone: {cost * 1e6:.1f} us per token of the heavy request "
    f"({cost / step * 100:.2f}% of the victim's plain TPOT); TPOT ratio heavy/plain {ratio:.3f}"
  )


if __name__ == "__main__":
  main()
