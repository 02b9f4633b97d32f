"""What the explorer compiles for: chips, shape-only model presets, serving shapes, layouts
and rules tables as the CLI spells them."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax

from meshserve.sharding import (
  AXES,
  MEGATRON,
  Layout,
  Rules,
)


@dataclasses.dataclass(frozen=True)
class Chip:
  """One chip's public Cloud TPU specs."""

  hbm_bytes: int
  bandwidth: float  # peak HBM bytes/s
  flops: float  # peak bfloat16 FLOP/s

  def seconds(self, bytes_accessed: float, flops: float) -> float:
    """The roofline: a step takes at least its bytes' time and at least its FLOPs' time."""
    return max(bytes_accessed / self.bandwidth, flops / self.flops)


CHIPS = {
  "v4": Chip(32 << 30, 1.2e12, 275e12),
  "v5e": Chip(16 << 30, 8.19e11, 197e12),
  "v5p": Chip(95 << 30, 2.765e12, 459e12),
  "v6e": Chip(32 << 30, 1.64e12, 918e12),
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


def target_devices(target: str) -> tuple[list, str, Chip | None]:
  """(devices, chip kind, its specs) of 'tpu:v5e:2x4' or 'cpu:N' (no specs)."""
  platform, _, rest = target.partition(":")
  if platform == "tpu":
    from jax.experimental import topologies

    chip = rest.partition(":")[0]
    if chip not in CHIPS:
      raise ValueError(f"target {target!r}: unknown TPU {chip!r}; known: {', '.join(CHIPS)}")
    devices = topologies.get_topology_desc(platform="tpu", topology_name=rest).devices
    return list(devices), chip, CHIPS[chip]
  if platform == "cpu":
    if not rest.isdigit() or int(rest) < 1:
      raise ValueError(f"target {target!r}: expected cpu:N")
    devices = jax.devices("cpu")
    if len(devices) < int(rest):
      raise ValueError(
        f"target {target!r}: {len(devices)} CPU devices; fake more with --cpu-devices {rest}"
      )
    return devices[: int(rest)], "cpu", None
  raise ValueError(f"target {target!r}: expected tpu:CHIP:TOPOLOGY (e.g. tpu:v5e:2x4) or cpu:N")
