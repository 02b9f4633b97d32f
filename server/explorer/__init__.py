"""The layout explorer: compile the engine's own prefill and decode steps for a target
topology (a real TPU slice, from any machine, or fake CPU devices) under each layout, and
report what XLA says about them.

    rows = explore("llama3-8b", "tpu:v5e:2x4", ["tp=8", "dp=2,tp=4"], ServingShape(batch=64))

For each layout the explorer builds abstract inputs (no weights, no device memory) with the
layout's shardings and AOT-compiles `meshserve.engine.runner.model_step`, the function the
engine runs. From the compiled programs it reads:
- bytes per device of the weights (from their shardings), the KV pool and the temporaries
  (`memory_analysis()`), whether they fit the chip's HBM, and the largest decode batch (at the
  given context) and context (at the given batch) that would;
- the collectives in the compiled HLO, by kind, with count and bytes (ops inside the layer loop
  count once per layer);
- the decode step's bytes and FLOPs by XLA's cost analysis with every layer counted (the
  analysis counts a loop body once: `decode_costs` compiles unrolled stand-ins), per output
  token, and the time they take at the chip's peak bandwidth and FLOP rate, never below the
  roofline of what the step must read (each device's weights and its rows' live KV); the
  tokens/s per chip that time implies; rows ranked by bytes per token;
- the compile time.
A layout that cannot work gets a row that says why instead of a crash.

TPU targets compile through libtpu (the `dev` extra) with `jax.experimental.topologies`, which
works on a CPU-only machine. Nothing here runs a step.
"""

from meshserve.server.explorer.compile import (
  LayoutReport,
  StepReport,
  collectives,
  explore,
)
from meshserve.server.explorer.report import format_table, plot, verify, write_csv
from meshserve.server.explorer.targets import (
  CHIPS,
  MEGATRON,
  ServingShape,
  load_rules,
  parse_layouts,
  presets,
  target_devices,
)

__all__ = [
  "CHIPS",
  "MEGATRON",
  "LayoutReport",
  "ServingShape",
  "StepReport",
  "collectives",
  "explore",
  "format_table",
  "load_rules",
  "parse_layouts",
  "plot",
  "presets",
  "target_devices",
  "verify",
  "write_csv",
]
