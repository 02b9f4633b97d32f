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
  seconds: float | None  # XLA's cost model, where the backend has one
  flops: float | None
  bytes_accessed: float | None


@dataclasses.dataclass
class LayoutReport:
  layout: str
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
  tokens_per_s_per_chip: float | None = None  # decode, from the cost model
  roofline_s: float | None = None  # decode step: (weights + KV) bytes / HBM bandwidth


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
  devices, chip, hbm, bandwidth = target_devices(target)
  if dtype is None:
    dtype = jnp.bfloat16 if chip != "cpu" else jnp.float32
  config = dataclasses.replace(config, dtype=dtype)
  reports = []
  from tqdm import tqdm

  for text in tqdm(layouts, desc="compiling layouts", unit="layout", disable=not progress):
    layout = Layout.parse(text)
    if rules is not None:
      layout = dataclasses.replace(layout, rules=rules)
    reports.append(_one(config, layout, text, devices, chip, hbm, bandwidth, shape))
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


def _one(config, layout, text, devices, chip, hbm, bandwidth, shape) -> LayoutReport:
  report = LayoutReport(text)
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
  try:
    graphdef, state, weight_bytes = _abstract_model(config, layout, mesh, chip)
    cache, kv_bytes = _abstract_cache(config, layout, mesh, shape)
    report.weight_bytes, report.kv_bytes = weight_bytes, kv_bytes
    decode = (shape.batch, 1, shape.pages_per_seq)
    # One prompt per data replica: a dp step's rows split evenly over them.
    prefill = (layout.data, shape.prefill, -(-shape.prefill // shape.page_size))
    report.decode = _compile(graphdef, state, cache, layout, mesh, decode, shape, config)
    report.prefill = _compile(graphdef, state, cache, layout, mesh, prefill, shape, config)
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
  if hbm is not None:
    used = weight_bytes + kv_bytes + temps
    report.fits = used <= hbm
    room = hbm - weight_bytes - temps
    report.max_batch = max(int(room // (per_token * shape.context)), 0) * layout.data
    report.max_context = max(int(room // (per_token * shape.batch / layout.data)), 0)
    # A decode step reads every weight shard once and, at full context, every row's KV.
    report.roofline_s = (weight_bytes + kv_bytes) / bandwidth
  if report.decode.seconds:
    report.tokens_per_s_per_chip = shape.batch / report.decode.seconds / layout.num_devices
  return report


def _abstract_model(config, layout, mesh, chip):
  from flax import nnx

  from meshserve.models import AttentionBackend, Transformer

  attention = AttentionBackend("pallas" if chip != "cpu" else "xla", rules=layout.rules)
  module = nnx.eval_shape(lambda: Transformer(config, attention))
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

  sampling = SamplingBatch.build([SamplingParams()] * B, [0] * B, B)
  sampling = dataclasses.replace(sampling, history=np.full((B, shape.context), -1, np.int32))
  ints = lambda *dims: np.zeros(dims, np.int32)  # noqa: E731
  inputs = (ints(B, T), ints(B, T), ints(B, P), ints(B), sampling, ints(B))
  # The engine's own step: under dp, each replica on its own rows and slice of the pool.
  replicated = NamedSharding(mesh, PartitionSpec())
  shardings = StepShardings(
    cache.k.sharding, replicated, replicas=layout.data, replica_axis=layout.rules.batch
  )
  started = time.perf_counter()
  with jax.set_mesh(mesh):  # the Pallas kernels split themselves over it
    lowered = model_step.lower(graphdef, state, cache, *jax.tree.map(spec, inputs), shardings)
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
    seconds=seconds if (seconds := cost.get("optimal_seconds", -1)) > 0 else None,
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
