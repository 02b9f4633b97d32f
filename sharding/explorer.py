"""The layout explorer: compile the engine's own prefill and decode steps for a target
topology (a real TPU slice, from any machine, or fake CPU devices) under each layout, and
report what XLA says about them.

    rows = explore("llama3-8b", "tpu:v5e:2x4", ["tp=8", "dp=2,tp=4"], ServingShape(batch=64))

For each layout the explorer builds abstract inputs (no weights, no device memory) with the
layout's shardings and AOT-compiles `engine.runner.model_step`, the function the engine runs.
From the compiled programs it reads:
- bytes per device of the weights (from their shardings), the KV pool and the temporaries
  (`memory_analysis()`), whether they fit the chip's HBM, and the largest decode batch (at the
  given context) and context (at the given batch) that would;
- the collectives in the compiled HLO, by kind, with count and bytes (ops inside the layer loop
  count once per layer);
- XLA's cost-model time per step (`optimal_seconds`) where the backend reports one, the
  tokens/s per chip it implies, and its ratio to the step's HBM roofline;
- the compile time.
A layout that cannot work gets a row that says why instead of a crash.

TPU targets compile through libtpu (the `dev` extra) with `jax.experimental.topologies`, which
works on a CPU-only machine. Nothing here runs a step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from meshserve.sharding.layout import AXES, Layout
from meshserve.sharding.rules import MEGATRON, Rules
from meshserve.sharding.shard import (
  KV_CACHE_AXES,
  batch_sharding,
  kv_cache_sharding,
  param_shardings,
)

# Per chip: HBM bytes and peak HBM bandwidth (bytes/s), from the public Cloud TPU specs.
CHIPS = {
  "v4": (32 << 30, 1.2e12),
  "v5e": (16 << 30, 8.19e11),
  "v5p": (95 << 30, 2.765e12),
  "v6e": (32 << 30, 1.64e12),
}

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def presets() -> dict:
  """Shape-only model configs of public checkpoints (config.json numbers); no weights."""
  from meshserve.models import ModelConfig

  def llama(name, vocab, embed, mlp, layers, heads, kv, theta, eps, bos, eos, context, **more):
    return ModelConfig(
      name=name, arch=more.pop("arch", "llama"), vocab_size=vocab, embed_dim=embed, mlp_dim=mlp,
      num_layers=layers, num_heads=heads, num_kv_heads=kv,
      head_dim=more.pop("head_dim", embed // heads), rope_theta=theta, norm_eps=eps,
      max_context=context, tie_embeddings=more.pop("tie", False), bos_token_id=bos,
      eos_token_ids=eos, **more,
    )  # fmt: skip

  return {
    "llama3-8b": llama(
      "llama3-8b", 128256, 4096, 14336, 32, 32, 8, 5e5, 1e-5, 128000, (128001, 128009), 8192
    ),
    "llama3-70b": llama(
      "llama3-70b", 128256, 8192, 28672, 80, 64, 8, 5e5, 1e-5, 128000, (128001, 128009), 8192
    ),
    "qwen2.5-7b": llama(
      "qwen2.5-7b",
      152064,
      3584,
      18944,
      28,
      28,
      4,
      1e6,
      1e-6,
      None,
      (151645, 151643),
      32768,
      arch="qwen2",
      qkv_bias=True,
    ),
    # The text model of Gemma 3 27B: five sliding-window layers (1024 tokens) to each global
    # one, RoPE scaled 8x on the global layers, query scale 168 ** -0.5.
    "gemma3-27b": llama(
      "gemma3-27b",
      262208,
      5376,
      21504,
      62,
      32,
      16,
      1e6,
      1e-6,
      2,
      (1, 106),
      131072,
      arch="gemma3",
      head_dim=128,
      tie=True,
      qk_norm=True,
      post_norms=True,
      embed_scale=5376**0.5,
      activation="gelu_tanh",
      query_scale=168**-0.5,
      rope_scale=8.0,
      sliding_window=1024,
      sliding_layers=tuple((i + 1) % 6 != 0 for i in range(62)),
      rope_local_theta=1e4,
    ),
  }


@dataclasses.dataclass(frozen=True)
class ServingShape:
  """The steps to compile: decode at `batch` rows of up to `context` tokens each, and one
  prefill chunk of `prefill` tokens (one per data replica); the pool holds `batch` full
  contexts."""

  batch: int = 64
  context: int = 2048
  page_size: int = 16
  prefill: int = 2048
  pool_pages: int | None = None  # a pool of another size than batch x context

  @property
  def pages_per_seq(self) -> int:
    return -(-self.context // self.page_size)

  def num_pages(self, replicas: int = 1) -> int:
    """`pool_pages`, else every row's full context; plus one sink page per data replica."""
    return (self.pool_pages or self.batch * self.pages_per_seq) + replicas


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


def parse_layouts(text: str) -> list[str]:
  """'tp=8;dp=2,tp=4' -> ['tp=8', 'dp=2,tp=4']. Without ';', a dp piece starts a new layout,
  as does a tp piece after a tp: 'tp=8,dp=2,tp=4,dp=4,tp=2' -> ['tp=8', 'dp=2,tp=4',
  'dp=4,tp=2']."""
  if ";" in text:
    layouts = [g.strip().replace(" ", "") for g in text.split(";") if g.strip()]
  else:
    groups: list[list[str]] = []
    for piece in filter(None, (p.strip() for p in text.split(","))):
      key = piece.partition("=")[0]
      if not groups or key == "dp" or any(p.startswith(key + "=") for p in groups[-1]):
        groups.append([])
      groups[-1].append(piece)
    layouts = [",".join(g) for g in groups]
  for layout in layouts:
    Layout.parse(layout)  # raises with the bad piece named
  return layouts


def load_rules(path: str | pathlib.Path) -> Rules:
  """A rules table from JSON: {"logical axis": "data" | "model" | null, ...}; axes not named
  keep MEGATRON's mapping."""
  table = json.loads(pathlib.Path(path).read_text())
  if not isinstance(table, dict):
    raise ValueError(f"{path}: expected an object of logical axis -> mesh axis")
  for name, axis in table.items():
    MEGATRON.mesh_axis(name)  # raises for an unknown logical axis
    if axis not in (None, *AXES):
      raise ValueError(f"{path}: {name!r} maps to {axis!r}; use one of {AXES} or null")
  return dataclasses.replace(MEGATRON, **table)


def target_devices(target: str) -> tuple[list, str, int | None, float | None]:
  """(devices, chip kind, HBM bytes per chip, HBM bandwidth) of 'tpu:v5e:2x4' or 'cpu:N'."""
  platform, _, rest = target.partition(":")
  if platform == "tpu":
    from jax.experimental import topologies

    chip = rest.partition(":")[0]
    if chip not in CHIPS:
      raise ValueError(f"target {target!r}: unknown TPU {chip!r}; known: {', '.join(CHIPS)}")
    devices = topologies.get_topology_desc(platform="tpu", topology_name=rest).devices
    return list(devices), chip, *CHIPS[chip]
  if platform == "cpu":
    if not rest.isdigit() or int(rest) < 1:
      raise ValueError(f"target {target!r}: expected cpu:N")
    devices = jax.devices("cpu")
    if len(devices) < int(rest):
      raise ValueError(
        f"target {target!r}: {len(devices)} CPU devices; fake more with --cpu-devices {rest}"
      )
    return devices[: int(rest)], "cpu", None, None
  raise ValueError(f"target {target!r}: expected tpu:CHIP:TOPOLOGY (e.g. tpu:v5e:2x4) or cpu:N")


def explore(
  model,
  target: str,
  layouts: Sequence[str],
  shape: ServingShape = ServingShape(),
  *,
  dtype=None,
  rules: Rules | None = None,
  progress: bool = True,
) -> list[LayoutReport]:
  """One report per layout. model: a preset name, a registered model name, a .gguf path, or a
  ModelConfig. dtype: default bfloat16 on TPU, float32 on CPU."""
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

  attention = AttentionBackend("pallas" if chip != "cpu" else "xla")
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
  shardings = StepShardings(cache.k.sharding, replicated, replicas=layout.data)
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


def format_table(reports: list[LayoutReport], shape: ServingShape, target: str) -> str:
  """A Markdown table, one row per layout."""
  gib = lambda b: f"{b / (1 << 30):.2f}"  # noqa: E731
  head = [
    "layout", "weights GiB/dev", "KV GiB/dev", "temp GiB/dev", "fits", "max batch",
    "max context", "decode collectives", "decode ms (cost model)", "tok/s/chip",
    "roofline ms", "cost/roofline", "compile s",
  ]  # fmt: skip
  lines = [
    f"{target}, decode batch {shape.batch} x context {shape.context}, prefill {shape.prefill}",
    "",
    "| " + " | ".join(head) + " |",
    "|" + "---|" * len(head),
  ]
  for r in reports:
    if r.error:
      lines.append(f"| {r.layout} | " + f"cannot work: {r.error} |" + " |" * (len(head) - 2))
      continue
    if r.overflow:
      cells = [r.layout, gib(r.weight_bytes), gib(r.kv_bytes), "-", f"NO: {r.overflow}"]
      lines.append("| " + " | ".join(cells) + " |" + " - |" * (len(head) - len(cells)))
      continue
    d = r.decode
    temp = max(d.temp_bytes, r.prefill.temp_bytes)
    coll = (
      ", ".join(
        f"{k} x{c} ({b / (1 << 20):.1f} MiB)" for k, (c, b) in sorted(d.collectives.items())
      )
      or "none"
    )
    cells = [
      r.layout, gib(r.weight_bytes), gib(r.kv_bytes), gib(temp),
      "-" if r.fits is None else ("yes" if r.fits else "NO: over HBM"),
      _maybe(r.max_batch), _maybe(r.max_context), coll,
      "-" if d.seconds is None else f"{d.seconds * 1e3:.2f}",
      "-" if r.tokens_per_s_per_chip is None else f"{r.tokens_per_s_per_chip:.0f}",
      "-" if r.roofline_s is None else f"{r.roofline_s * 1e3:.2f}",
      "-" if not (d.seconds and r.roofline_s) else f"{d.seconds / r.roofline_s:.2f}x",
      f"{d.compile_s + r.prefill.compile_s:.0f}",
    ]  # fmt: skip
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_csv(reports: list[LayoutReport], path) -> None:
  import csv

  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow([
      "layout", "error", "weight_bytes", "kv_bytes", "temp_bytes", "fits", "max_batch",
      "max_context", "decode_collectives", "decode_s", "prefill_s", "tokens_per_s_per_chip",
      "roofline_s", "compile_s",
    ])  # fmt: skip
    for r in reports:
      if r.error or r.overflow:
        w.writerow([r.layout, r.error or r.overflow, r.weight_bytes, r.kv_bytes, "", r.fits])
        continue
      coll = ";".join(f"{k}:{c}:{b}" for k, (c, b) in sorted(r.decode.collectives.items()))
      w.writerow([
        r.layout, "", r.weight_bytes, r.kv_bytes, max(r.decode.temp_bytes, r.prefill.temp_bytes),
        r.fits, r.max_batch, r.max_context, coll, r.decode.seconds, r.prefill.seconds,
        r.tokens_per_s_per_chip, r.roofline_s, r.decode.compile_s + r.prefill.compile_s,
      ])  # fmt: skip


def _maybe(x) -> str:
  return "-" if x is None else str(x)


def plot(reports: list[LayoutReport], path: str) -> None:
  """Memory per device (stacked) and decode step time per layout."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ok = [r for r in reports if not (r.error or r.overflow)]
  names = [r.layout for r in ok]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
  bottom = np.zeros(len(ok))
  for label, values in (
    ("weights", [r.weight_bytes for r in ok]),
    ("KV pool", [r.kv_bytes for r in ok]),
    ("temporaries", [max(r.decode.temp_bytes, r.prefill.temp_bytes) for r in ok]),
  ):
    gib = np.asarray(values) / (1 << 30)
    ax1.bar(names, gib, bottom=bottom, label=label)
    bottom += gib
  if ok and ok[0].hbm_bytes:
    ax1.axhline(ok[0].hbm_bytes / (1 << 30), color="red", linestyle="--", label="HBM")
  ax1.set(title="memory per device", ylabel="GiB")
  ax1.legend()
  steps = [(r.decode.seconds or 0) * 1e3 for r in ok]
  roofs = [(r.roofline_s or 0) * 1e3 for r in ok]
  x = np.arange(len(ok))
  ax2.bar(x - 0.2, steps, width=0.4, label="cost model")
  ax2.bar(x + 0.2, roofs, width=0.4, label="HBM roofline")
  ax2.set_xticks(x, names)
  ax2.set(title="decode step", ylabel="ms")
  ax2.legend()
  for ax in (ax1, ax2):
    ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def verify(model: str, layouts: Sequence[str], prompts: Sequence[str], max_tokens: int = 16):
  """Runs each layout on this machine's devices with real weights and compares its greedy
  tokens with tp=1's: {layout: None if equal, else the first prompt index that differs}."""
  from meshserve.engine import LLM, EngineConfig, SamplingParams
  from meshserve.models import load_model

  config = EngineConfig(num_pages=256, max_model_len=512, max_batch=8)
  params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
  want = [
    o.token_ids for o in LLM(load_model(model, layout="tp=1"), config).generate(prompts, params)
  ]
  out = {}
  for text in layouts:
    got = [
      o.token_ids for o in LLM(load_model(model, layout=text), config).generate(prompts, params)
    ]
    out[text] = next((i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b), None)
  return out
