"""Compiles the engine's steps for one layout on a target and reads what XLA reports."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from meshserve.server.explorer.targets import COLLECTIVES, ServingShape, presets, target_devices
from meshserve.sharding import (
  AXES,
  KV_CACHE_AXES,
  Layout,
  Rules,
  batch_sharding,
  kv_cache_sharding,
  param_shardings,
)


@dataclasses.dataclass
class StepReport:
  compile_s: float
  temp_bytes: int  # per device
  collectives: dict[str, tuple[int, int]]  # kind -> (count per step, bytes per step)
  # Per device, XLA's cost analysis: a scanned layer counts once, except in a report's decode
  # step, where every layer counts (decode_costs); the time its bytes and FLOPs take at the
  # chip's peak (Chip.seconds; TPU targets only) is set there too
  flops: float | None
  bytes_accessed: float | None
  seconds: float | None = None


@dataclasses.dataclass
class LayoutReport:
  layout: str
  num_devices: int = 1
  batch: int = 1  # decode rows per step
  error: str | None = None  # why this layout cannot work; the rest is then empty
  overflow: str | None = None  # the TPU compiler refused it for HBM: no step reports
  weight_bytes: int = 0  # per device
  kv_bytes: int = 0  # per device
  hbm_bytes: int | None = None
  fits: bool | None = None
  max_batch: int | None = None  # at the given context
  max_context: int | None = None  # at the given batch
  decode: StepReport | None = None
  prefill: StepReport | None = None
  # A decode step must read each device's weights and its rows' live KV (at full context):
  min_bytes: int = 0  # per device
  roofline_s: float | None = None  # min_bytes / HBM bandwidth
  step_s: float | None = None  # predicted decode step: the cost model's, never below roofline_s
  tokens_per_s_per_chip: float | None = None  # decode, at step_s

  def per_token(self, value: float | None) -> float | None:
    """A decode step's per-device `value` (bytes, FLOPs), summed over the devices and shared
    by the `batch` tokens the step makes: what one output token costs the whole slice."""
    if value is None or self.decode is None:
      return None
    return value * self.num_devices / self.batch


def explore(
  model,
  target: str,
  layouts: Sequence[str],
  shape: ServingShape | None = None,
  *,
  dtype=None,
  rules: Rules | None = None,
  progress: bool = True,
) -> list[LayoutReport]:
  """One report per layout. model: a preset name, a registered model name, a .gguf path, or a
  ModelConfig. shape: default ServingShape(). dtype: default bfloat16 on TPU, float32 on CPU."""
  shape = shape or ServingShape()
  config = _config(model)
  devices, chip, specs = target_devices(target)
  if dtype is None:
    dtype = jnp.bfloat16 if chip != "cpu" else jnp.float32
  config = dataclasses.replace(config, dtype=dtype)
  reports = []
  from tqdm import tqdm

  for text in tqdm(layouts, desc="compiling layouts", unit="layout", disable=not progress):
    layout = Layout.parse(text)
    if rules is not None:
      layout = dataclasses.replace(layout, rules=rules)
    reports.append(_one(config, layout, text, devices, chip, specs, shape))
  return reports


def _config(model):
  from meshserve.models import ModelConfig

  if isinstance(model, ModelConfig):
    return model
  table = presets()
  if model in table:
    return table[model]
  from meshserve.models import hf_loader
  from meshserve.models.gguf_loader import GGUFFile
  from meshserve.models.loader import resolve

  if hf_loader.is_hf_dir(model):  # its config.json only
    return hf_loader.read_config(pathlib.Path(model), pathlib.Path(model).name)
  name, path = resolve(model)  # a registered name or a .gguf path: its metadata only
  return GGUFFile(path).config(name)


def _one(config, layout, text, devices, chip, specs, shape) -> LayoutReport:
  report = LayoutReport(text, layout.num_devices, shape.batch)
  if layout.num_devices > len(devices):
    report.error = f"needs {layout.num_devices} devices, the target has {len(devices)}"
    return report
  for name, size in (("kv heads", config.num_kv_heads), ("heads", config.num_heads)):
    if size % layout.model:
      report.error = f"{name} ({size}) not divisible by tp={layout.model}"
      return report
  if shape.batch % layout.data:
    report.error = f"decode batch {shape.batch} not divisible by dp={layout.data}"
    return report
  mesh = Mesh(np.asarray(devices[: layout.num_devices]).reshape(layout.data, layout.model), AXES)
  hbm = None if specs is None else specs.hbm_bytes
  try:
    graphdef, state, weight_bytes = _abstract_model(config, layout, mesh, chip)
    cache, kv_bytes = _abstract_cache(config, layout, mesh, shape)
    report.weight_bytes, report.kv_bytes = weight_bytes, kv_bytes
    decode = (shape.batch, 1, shape.pages_per_seq)
    # One prompt per data replica: a dp step's rows split evenly over them.
    prefill = (layout.data, shape.prefill, -(-shape.prefill // shape.page_size))
    report.prefill = _compile(graphdef, state, cache, layout, mesh, prefill, shape, config)
    if config.num_layers <= STAND_IN_DEPTHS[-1] and layout.data == 1:
      # Shallow: one unrolled compile, whose cost analysis counts every layer, serves all.
      unrolled = _abstract_model(config, layout, mesh, chip, unroll=True)[:2]
      report.decode = _compile(*unrolled, cache, layout, mesh, decode, shape, config)
    else:
      report.decode = _compile(graphdef, state, cache, layout, mesh, decode, shape, config)
      costs = decode_costs(config, layout, mesh, chip, decode, shape)
      report.decode.flops, report.decode.bytes_accessed = costs
    d = report.decode
    if specs is not None and d.flops is not None and d.bytes_accessed is not None:
      d.seconds = specs.seconds(d.bytes_accessed, d.flops)
  except Exception as e:  # noqa: BLE001 - a layout XLA cannot compile gets a row saying so
    first = str(e).splitlines()[0]
    if "Ran out of memory" in first:  # the TPU compiler's own check: the sizes still show
      m = re.search(r"temporaries \(([\d.]+\w*)\) exceeds available HBM \(([\d.]+\w*)\)", first)
      report.fits, report.hbm_bytes = False, hbm
      report.overflow = (
        f"compiler: temporaries {m.group(1)} > HBM {m.group(2)}" if m else first[:200]
      )
    else:
      report.error = f"compile error: {type(e).__name__}: {first[:200]}"
    return report
  report.hbm_bytes = hbm
  # A device holds its replica's slice of the pool: bytes per token of one of its own rows.
  per_token = kv_bytes * layout.data / (shape.num_pages(layout.data) * shape.page_size)
  temps = max(report.decode.temp_bytes, report.prefill.temp_bytes)
  # A decode step reads every weight shard once and, at full context, its rows' live KV.
  report.min_bytes = int(weight_bytes + per_token * shape.context * shape.batch / layout.data)
  if hbm is not None:
    used = weight_bytes + kv_bytes + temps
    report.fits = used <= hbm
    room = hbm - weight_bytes - temps
    report.max_batch = max(int(room // (per_token * shape.context)), 0) * layout.data
    report.max_context = max(int(room // (per_token * shape.batch / layout.data)), 0)
    report.roofline_s = report.min_bytes / specs.bandwidth
  if report.decode.seconds:
    # The cost model may think a step faster than its bytes allow; the bytes win.
    report.step_s = max(report.decode.seconds, report.roofline_s or 0.0)
    report.tokens_per_s_per_chip = shape.batch / report.step_s / layout.num_devices
  return report


# The depths of the unrolled stand-ins decode_costs compiles. Shallower ones mislead: XLA's
# cost analysis of a 2-layer Llama-3-8B step counted more bytes than a 4-layer one's.
STAND_IN_DEPTHS = (4, 8)


def decode_costs(config, layout, mesh, chip, step_shape, shape) -> tuple[float | None, ...]:
  """(FLOPs, bytes accessed) per device of one decode step by XLA's cost analysis, every layer
  counted. (Its own time, `optimal_seconds`, is no use: each Pallas call makes it negative. The
  time is these through the chip's roofline, `Chip.seconds`.)

  The analysis counts a while loop's body once, so a scanned stack of L layers costs what one
  layer does. So the step is compiled again, unrolled: whole when L <= b, else for a and b
  layers (STAND_IN_DEPTHS; no weights, a minute at most) over the real pool (its size sways
  how XLA counts the KV writes), and the costs, linear in the depth, are extended to L:
  c(L) = c(a) + (L - a) * (c(b) - c(a)) / (b - a). A stack that mixes local and global layers
  stands in as alternating ones: the real stack's scanned body holds both kinds anyway.

  Under dp, one replica stands in: its rows and its slice of the pool on its own tp devices,
  the work each device does in the real step (less the gather of the sampled rows, a few KiB).
  An unrolled dp step trips a check in libtpu's SPMD partitioner, which aborts the process."""
  if layout.data > 1:
    dp = layout.data
    rows, tokens, pages = step_shape
    step_shape = (rows // dp, tokens, pages)
    pool = None if shape.pool_pages is None else shape.pool_pages // dp
    shape = dataclasses.replace(shape, batch=shape.batch // dp, pool_pages=pool)
    layout = dataclasses.replace(layout, data=1)
    mesh = Mesh(mesh.devices[:1], AXES)
  cache, _ = _abstract_cache(config, layout, mesh, shape)  # the real pool, every layer's
  (a, b), layers = STAND_IN_DEPTHS, config.num_layers
  if layers <= b:  # shallow enough to unroll whole
    graphdef, state, _ = _abstract_model(config, layout, mesh, chip, unroll=True)
    step = _compile(graphdef, state, cache, layout, mesh, step_shape, shape, config)
    return step.flops, step.bytes_accessed
  costs = []
  for depth in STAND_IN_DEPTHS:
    small = dataclasses.replace(config, num_layers=depth, sliding_layers=_pattern(config, depth))
    graphdef, state, _ = _abstract_model(small, layout, mesh, chip, unroll=True)
    step = _compile(graphdef, state, cache, layout, mesh, step_shape, shape, small)
    costs.append((step.flops, step.bytes_accessed))
  return tuple(
    None if ca is None or cb is None else ca + (layers - a) * (cb - ca) / (b - a)
    for ca, cb in zip(*costs, strict=True)
  )


def _pattern(config, depth: int) -> tuple[bool, ...] | None:
  """The sliding_layers of a `depth`-layer stand-in for the stack: alternating when the stack
  mixes local and global layers, else the stack's own kind."""
  if config.sliding_layers is None:
    return None
  kinds = set(config.sliding_layers)
  if len(kinds) > 1:
    return tuple(i % 2 == 0 for i in range(depth))
  return (kinds.pop(),) * depth


def _abstract_model(config, layout, mesh, chip, *, unroll: bool = False):
  from flax import nnx

  from meshserve.models import AttentionBackend, Transformer

  attention = AttentionBackend("pallas" if chip != "cpu" else "xla", rules=layout.rules)
  module = nnx.eval_shape(lambda: Transformer(config, attention, unroll=unroll))
  graphdef, abstract = nnx.split(module)
  shardings = param_shardings(abstract, layout, mesh)

  def place(v, s):
    x = v.get_value()
    return v.replace(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s))

  state = jax.tree.map(place, abstract, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
  weight_bytes = sum(
    _shard_bytes(v.get_value())
    for _, v in nnx.to_flat_state(state)
  )  # fmt: skip
  return graphdef, state, weight_bytes


def _abstract_cache(config, layout, mesh, shape):
  from meshserve.models import KVCache

  pages = shape.num_pages(layout.data)
  dims = (config.num_layers, pages, shape.page_size, config.num_kv_heads, config.head_dim)
  sharding = kv_cache_sharding(dims, layout, mesh)
  pool = jax.ShapeDtypeStruct(dims, config.dtype, sharding=sharding)
  assert len(dims) == len(KV_CACHE_AXES)
  return KVCache(k=pool, v=pool), 2 * _shard_bytes(pool)


def _shard_bytes(x: jax.ShapeDtypeStruct) -> int:
  return math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize


def _compile(graphdef, state, cache, layout, mesh, step_shape, shape, config) -> StepReport:
  from meshserve.engine.runner import StepShardings, model_step
  from meshserve.engine.sampling import SamplingBatch, SamplingParams

  B, T, P = step_shape
  rows = batch_sharding(B, layout, mesh)

  def spec(x):
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows)

  # No structured-output mask: the step of unconstrained rows, whose batches skip it (a cost
  # analysis would count the masked branch's [B, V] traffic as if every step took it).
  sampling = SamplingBatch.build([SamplingParams()] * B, [0] * B, B)
  ints = lambda *dims: np.zeros(dims, np.int32)  # noqa: E731
  inputs = (ints(B, T), ints(B, T), ints(B, P), ints(B), sampling, ints(B))
  # The engine's own step: under dp, each replica on its own rows and slice of the pool.
  replicated = NamedSharding(mesh, PartitionSpec())
  shardings = StepShardings(
    cache.k.sharding, replicated, replicas=layout.data, replica_axis=layout.rules.batch
  )
  num_pages, page_size = cache.k.shape[1:3]
  page_tokens = jax.ShapeDtypeStruct(
    (num_pages, page_size), jnp.int32, sharding=shardings.page_tokens
  )
  started = time.perf_counter()
  with jax.set_mesh(mesh):  # the Pallas kernels split themselves over it
    lowered = model_step.lower(
      graphdef, state, cache, page_tokens, *jax.tree.map(spec, inputs), shardings
    )
  compiled = lowered.compile()
  compile_s = time.perf_counter() - started
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, list):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return StepReport(
    compile_s=compile_s,
    temp_bytes=int(getattr(memory, "temp_size_in_bytes", 0) or 0),
    collectives=collectives(compiled.as_text(), config.num_layers),
    flops=cost.get("flops"),
    bytes_accessed=cost.get("bytes accessed"),
  )


_OP = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.+?) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


def collectives(hlo: str, loop_trips: int = 1) -> dict[str, tuple[int, int]]:
  """Collectives of compiled HLO text by kind: (count, bytes of their results) per step. An op
  inside a while loop body (the layer scan) counts `loop_trips` times; its nested loops (the
  attention's page walk) hold none."""
  bodies = set(re.findall(r" while\(.*?body=%?([\w.\-]+)", hlo))
  out: dict[str, list[int]] = {}
  computation = None
  for line in hlo.splitlines():
    if header := re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line):
      computation = header.group(1)
    m = _OP.search(line)
    if not m:
      continue
    size = sum(
      math.prod(map(int, dims.split(","))) * _itemsize(dtype) if dims else _itemsize(dtype)
      for dtype, dims in _ARRAY.findall(m.group(1))
    )
    trips = loop_trips if computation in bodies else 1
    count, total = out.setdefault(m.group(2), [0, 0])
    out[m.group(2)] = [count + trips, total + trips * size]
  return {k: (c, b) for k, (c, b) in out.items()}


def _itemsize(hlo_type: str) -> int:
  return {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}.get(hlo_type, 4)  # fmt: skip
