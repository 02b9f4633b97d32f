"""Decode attention on CPU: the XLA page walk against the compiled C++ kernel, and the roofline.

SmolLM2-135M's attention (9 query heads, 3 kv heads, head dim 64, float32, 30 layers under one
`lax.scan`, pages of 16 tokens), a batch of B rows with contexts drawn as in
`bench_engine.py` (prompts of 32-512 tokens, 64 tokens into a 128-token answer), the rows'
pages shuffled over the pool. One table: median seconds of all 30 layers for each backend (the
two take --rounds turns, each a median of --repeats calls), the KV bytes read per second, and
their ratio; the roofline is the KV bytes over the streaming read bandwidth measured in the same
run.

  python scripts/bench_cpu_attention.py [--batch 1 8 32 64] [--repeats 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_engine import median_time  # noqa: E402  (this folder is on sys.path)

from meshserve.models import cpu_kernels  # noqa: E402
from meshserve.models.attention import KVCache, xla_paged_decode_attention  # noqa: E402

L, H, K, D, Z = 30, 9, 3, 64, 16


def all_layers(attend):
  """A jitted function running `attend` on each of the L layers, as the model's scan does."""

  @jax.jit
  def run(q, k, v, positions, page_table):
    def layer(total, i):
      return total + attend(q, k, v, i, positions, page_table).sum(), None

    return jax.lax.scan(layer, 0.0, jnp.arange(L))[0]

  return run


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=3, help="turns each backend takes")
  args = parser.parse_args()
  if not cpu_kernels.available():
    raise SystemExit("the C++ kernel did not build (see the log): nothing to compare")
  rng = np.random.default_rng(0)
  contexts = rng.integers(32, 513, max(args.batch)) + 64
  P = -(-int(contexts.max()) // Z)
  N = max(args.batch) * P + 1
  k, v = (jnp.asarray(rng.standard_normal((L, N, Z, K, D), np.float32)) for _ in range(2))
  stream = jnp.ones((256 * 2**20,), jnp.float32)  # 1 GiB
  total = jax.jit(jnp.sum)
  bandwidth = stream.nbytes / median_time(lambda: total(stream).block_until_ready(), 5)

  backends = {
    "xla": all_layers(
      lambda q, k, v, i, pos, t: xla_paged_decode_attention(q, KVCache(k, v), i, pos, t)
    ),
    "native": all_layers(cpu_kernels.paged_decode_attention),
  }
  print(f"\nread bandwidth {bandwidth / 1e9:.1f} GB/s; {L} layers, pages of {Z} tokens\n")
  header = (
    f"{'batch':>5} | {'KV MB':>6} | {'roofline':>8} | {'xla':>8} | {'native':>8} | "
    f"{'xla GB/s':>8} | {'native GB/s':>11} | {'xla/native':>10}"
  )
  print(header)
  print("-" * len(header))
  for B in args.batch:
    lengths = np.sort(contexts[:B])[::-1]  # longest first, as the runner orders decode rows
    table = (rng.permutation(N - 1)[: B * P].reshape(B, P) + 1).astype(np.int32)
    inputs = (
      jnp.asarray(rng.standard_normal((B, 1, H, D), np.float32)),
      k,
      v,
      jnp.asarray(lengths[:, None] - 1, jnp.int32),
      jnp.asarray(table),
    )
    kv_bytes = int(lengths.sum()) * L * 2 * K * D * 4
    rounds = collections.defaultdict(list)  # the backends take turns, so noise hits both
    for _ in range(args.rounds):
      for name, f in backends.items():
        rounds[name].append(
          median_time(lambda f=f, x=inputs: f(*x).block_until_ready(), args.repeats)
        )
    seconds = {name: statistics.median(times) for name, times in rounds.items()}
    xla, native = seconds["xla"], seconds["native"]
    print(
      f"{B:>5} | {kv_bytes / 1e6:6.0f} | {kv_bytes / bandwidth * 1e3:6.1f}ms | "
      f"{xla * 1e3:6.1f}ms | {native * 1e3:6.1f}ms | {kv_bytes / xla / 1e9:8.1f} | "
      f"{kv_bytes / native / 1e9:11.1f} | {xla / native:9.1f}x"
    )


if __name__ == "__main__":
  main()
