"""Meshes, the logical-axis rules table and sharded placement (see ARCHITECTURE.md).

Models name logical axes only: every parameter carries `logical_axes` metadata
(`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `layers`, `norm`); this package
maps them to mesh axes.
"""

from meshserve.sharding.layout import AXES, Layout, split_devices
from meshserve.sharding.rules import MEGATRON, Rules, spec_for
from meshserve.sharding.shard import (
  KV_CACHE_AXES,
  batch_sharding,
  kv_cache_sharding,
  param_shardings,
  put,
  shard_state,
)

__all__ = [
  "AXES",
  "KV_CACHE_AXES",
  "MEGATRON",
  "Layout",
  "Rules",
  "batch_sharding",
  "kv_cache_sharding",
  "param_shardings",
  "put",
  "shard_state",
  "spec_for",
  "split_devices",
]
