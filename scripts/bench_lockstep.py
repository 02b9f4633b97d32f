"""What multi-host serving's per-step broadcast costs, against the step itself.

Two processes x 4 CPU devices (gloo) run SmolLM2 under tp=8, as `meshserve serve` over two
hosts does (engine/lockstep.py): process 0 publishes each engine turn to the jax.distributed
key-value store and steps; process 1 reads each turn, applies it and steps with it. B requests
decode --steps tokens each; the table gives, per decode turn, the median (and p90) of:

  decode step     process 0's Engine.step: the SPMD program, both processes in it
  publish         process 0's key-value set of the turn (the only cost lockstep adds to its
                  core; an empty turn while requests decode, an add's ~1 KiB when one arrives)
  broadcast       the alternative: multihost_utils.broadcast_one_to_all of a 1 KiB turn (a
                  collective both processes enter), timed after the run

  python scripts/bench_lockstep.py [--steps 64] [--batch 8]   # launches both processes
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

ROUNDS = 50  # broadcasts timed


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--steps", type=int, default=64)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
  p.add_argument("--coordinator", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.process_id is None:
    return launch(args)
  run(args)
  return 0


def launch(args) -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    coordinator = f"127.0.0.1:{s.getsockname()[1]}"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  base = [sys.executable, __file__, "--steps", str(args.steps), "--batch", str(args.batch),
          "--coordinator", coordinator]  # fmt: skip
  follower = subprocess.Popen(
    [*base, "--process-id", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  try:
    leader = subprocess.run([*base, "--process-id", "0"], env=env, timeout=1800)
    return leader.returncode or follower.wait(120)
  finally:
    if follower.poll() is None:
      follower.kill()


def run(args) -> None:
  sys.path.insert(0, str(pathlib.Path(__file__).parent))
  from jax.experimental import multihost_utils
  from machine import describe

  from meshserve.engine import Engine, EngineConfig, SamplingParams, lockstep
  from meshserve.models import load_model
  from meshserve.sharding import distributed

  distributed.initialize(args.coordinator, 2, args.process_id)
  config = EngineConfig(max_model_len=256, max_batch=args.batch, num_pages=128)
  model = load_model(layout="tp=8")
  engine = Engine(model, config)
  engine.runner.warmup(progress=False)
  turn = np.zeros(1024, np.uint8)  # a turn as broadcast_one_to_all would carry it
  if args.process_id:
    lockstep.follow(engine, args.process_id)
    for _ in range(ROUNDS + 1):
      multihost_utils.broadcast_one_to_all(turn)
    return
  publisher = lockstep.Publisher(2)
  publisher.wait_followers(threading.Event())
  prompt = model.tokenizer.encode("The lighthouse keeper climbed the stairs to light the lamp")
  params = SamplingParams(max_tokens=args.steps, ignore_eos=True)
  adds = [lockstep.add_message(f"r{i}", prompt[: 6 + i], params, "") for i in range(args.batch)]
  publish, steps, add_bytes = [], [], len(json.dumps(adds[:1]))
  start = time.perf_counter()
  publisher(adds)
  first = time.perf_counter() - start
  for message in adds:
    engine.add_request(message[2], params, message[1])
  while engine.has_unfinished():
    start = time.perf_counter()
    publisher([])
    published = time.perf_counter()
    engine.step()
    if engine.last_step.prefill_tokens == 0:  # decode turns
      publish.append(published - start)
      steps.append(time.perf_counter() - published)
  publisher([["stop"]])
  broadcast = []
  for i in range(ROUNDS + 1):
    start = time.perf_counter()
    multihost_utils.broadcast_one_to_all(turn)
    if i:  # the first compiles
      broadcast.append(time.perf_counter() - start)

  def row(name, xs):
    median, p90 = statistics.median(xs), float(np.percentile(xs, 90))
    step = statistics.median(steps)
    print(f"| {name} | {median * 1e3:.3f} | {p90 * 1e3:.3f} | {median / step:.4f} |")

  print(describe())
  print(
    f"2 processes x 4 CPU devices (gloo), tp=8, {args.batch} rows decoding {args.steps} tokens; "
    f"{len(steps)} decode turns; a turn of {args.batch} adds took {first * 1e3:.2f} ms to "
    f"publish ({add_bytes} bytes an add)\n"
  )
  print("| per decode turn | median ms | p90 ms | vs decode step |")
  print("|---|---|---|---|")
  row("decode step (both processes)", steps)
  row("publish the turn (key-value set)", publish)
  row("broadcast_one_to_all, 1 KiB", broadcast)


if __name__ == "__main__":
  sys.exit(main())
