"""XLA's compiled cost model for the Pallas attention kernels against plain XLA attention, on a
Llama-3-8B attention layer (32 query heads, 8 kv heads, head dim 128, bfloat16), compiled
ahead of time for a TPU v5e topology on this CPU machine (libtpu from the `dev` extra).

One table: prefill 2k and 8k (causal), and decode for a batch of 64 sequences of ragged
lengths. For each, XLA's `optimal_seconds` and `bytes accessed` of the compiled program.
The Pallas kernel body is opaque to XLA: its share of the figures is the kernel's declared
`pl.CostEstimate` (exact counts for prefill, an upper bound over all listed pages for decode);
everything around it (transposes, padding) is XLA's own estimate.

  JAX_PLATFORMS=cpu python scripts/bench_kernels.py [--topology v5e:2x4]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from meshserve.pallas_kernels import (  # noqa: E402
  flash_attention,
  flash_attention_reference,
  ragged_paged_attention,
  ragged_paged_attention_reference,
)

H, K, D, DTYPE = 32, 8, 128, jnp.bfloat16  # Llama-3-8B attention
PAGE, DECODE_BATCH, MAX_LEN = 16, 64, 4096


def cost(fn, args) -> tuple[float, float]:
  analysis = fn.lower(*args).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  return analysis["optimal_seconds"], analysis["bytes accessed"]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--topology", default="v5e:2x4")
  args = parser.parse_args()
  device = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices[0]
  sharding = jax.sharding.SingleDeviceSharding(device)

  def spec(shape, dtype=DTYPE):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  cases = []
  for T in (2048, 8192):
    qkv = (spec((1, T, H, D)), spec((1, T, K, D)), spec((1, T, K, D)))
    cases.append(
      (f"prefill {T // 1024}k", flash_attention, jax.jit(flash_attention_reference), qkv)
    )
  lens = np.random.default_rng(0).integers(128, MAX_LEN, DECODE_BATCH)
  P = MAX_LEN // PAGE
  pages = 1 + DECODE_BATCH * P
  decode_args = (
    spec((DECODE_BATCH, H, D)),
    spec((pages, PAGE, K, D)),
    spec((pages, PAGE, K, D)),
    spec((DECODE_BATCH,), jnp.int32),
    spec((DECODE_BATCH, P), jnp.int32),
  )
  cases.append(
    (
      f"decode B={DECODE_BATCH}",
      ragged_paged_attention,
      jax.jit(ragged_paged_attention_reference),
      decode_args,
    )
  )

  print(f"\n{args.topology} ({device.device_kind}), Llama-3-8B attention: H={H} K={K} D={D} bf16")
  print(
    f"decode: page size {PAGE}, lengths {lens.min()}..{lens.max()} of at most {MAX_LEN}; lengths"
    " are dynamic, so both cost models see the page-table bound\n"
  )
  header = f"{'case':<12} | {'pallas us':>10} | {'xla us':>10} | {'speedup':>7} | "
  header += f"{'pallas MB':>10} | {'xla MB':>10} | {'bytes ratio':>11}"
  print(header)
  print("-" * len(header))
  for name, kernel, reference, case_args in cases:
    t_p, b_p = cost(kernel, case_args)
    t_x, b_x = cost(reference, case_args)
    print(
      f"{name:<12} | {t_p * 1e6:10.1f} | {t_x * 1e6:10.1f} | {t_x / t_p:6.2f}x | "
      f"{b_p / 1e6:10.1f} | {b_x / 1e6:10.1f} | {b_x / b_p:10.2f}x"
    )
  print("\nFigures are XLA's cost model for the compiled programs, not measured TPU time.")


if __name__ == "__main__":
  main()
