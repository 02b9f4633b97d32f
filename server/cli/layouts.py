"""`meshserve layouts`: compiles the engine's steps for a target topology under each layout and
compares them (meshserve.server.explorer)."""

from __future__ import annotations

import argparse
import logging
import pathlib
import time

from meshserve.server.cli.common import DTYPES

log = logging.getLogger("meshserve")


def add_parser(sub) -> None:
  p = sub.add_parser(
    "layouts",
    help="compile the engine's steps for a target topology under each layout and compare them",
  )
  p.add_argument(
    "--model", default=None,
    help="a preset (llama3-8b, llama3-70b, qwen2.5-7b, gemma3-27b: shapes only), a registered "
    "model, a .gguf file or a Hugging Face checkpoint directory (its config only)",
  )  # fmt: skip
  p.add_argument("--target", default="tpu:v5e:2x4", help="tpu:CHIP:TOPOLOGY or cpu:N")
  p.add_argument(
    "--layouts", required=True,
    help="e.g. tp=8,dp=2,tp=4 (a dp piece starts a new layout; ';' separates too)",
  )  # fmt: skip
  p.add_argument("--rules", default=None, help="JSON rules table: logical axis -> mesh axis")
  p.add_argument("--batch", type=int, default=64, help="decode batch")
  p.add_argument("--context", type=int, default=2048, help="tokens per sequence")
  p.add_argument("--page-size", type=int, default=16)
  p.add_argument("--prefill", type=int, default=2048, help="prefill chunk, tokens")
  p.add_argument(
    "--dtype", choices=DTYPES, default="auto",
    help="weights and KV (auto: the target's, bfloat16 on TPU and GPU, float32 on CPU)",
  )  # fmt: skip
  p.add_argument("--csv", type=pathlib.Path, default=None, help="also write the rows as CSV")
  p.add_argument("--plot", type=pathlib.Path, default=None, help="memory and step time PNG")
  p.add_argument(
    "--verify", action="store_true",
    help="cpu:N only: run each layout with real weights and compare its tokens with tp=1",
  )  # fmt: skip
  p.add_argument("--cpu-devices", type=int, default=None, help="fake N CPU devices")
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  import jax.numpy as jnp

  from meshserve.server import explorer

  layouts = explorer.parse_layouts(args.layouts)
  model = args.model or "llama3-8b"
  if args.verify and not args.target.startswith("cpu:"):
    raise ValueError("--verify runs the layouts here: give --target cpu:N")
  rules = explorer.load_rules(args.rules) if args.rules else None
  shape = explorer.ServingShape(args.batch, args.context, args.page_size, args.prefill)
  dtype = None if args.dtype == "auto" else jnp.dtype(args.dtype)
  start = time.perf_counter()
  reports = explorer.explore(model, args.target, layouts, shape, dtype=dtype, rules=rules)
  print(explorer.format_table(reports, shape, args.target))
  log.info("compiled %d layouts in %.0fs", len(layouts), time.perf_counter() - start)
  if args.csv:
    explorer.write_csv(reports, args.csv)
  if args.plot:
    explorer.plot(reports, str(args.plot))
  if args.verify:
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    for layout, differs in explorer.verify(model, layouts, prompts).items():
      verdict = "equal to tp=1" if differs is None else f"DIFFERS from tp=1 on prompt {differs}"
      print(f"verify {layout}: greedy tokens {verdict}")
  return 0
