"""Shardings derived from logical axes, and placement of host arrays shard by shard.

Letters: B batch, L layers, N pool pages, Z page size, K kv heads, D head dim.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from meshserve.sharding.layout import Layout
from meshserve.sharding.rules import spec_for

KV_CACHE_AXES = ("layers", "pages", "page_slots", "kv_heads", "head_dim")  # [L, N, Z, K, D]


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def param_shardings(abstract_state: nnx.State, layout: Layout, mesh: Mesh) -> nnx.State:
  """A NamedSharding per parameter, from its shape and `logical_axes` metadata. The state may
  hold ShapeDtypeStructs, host arrays or device arrays: only shapes are read."""

  def one(v: nnx.Variable) -> NamedSharding:
    axes = v.get_metadata()["logical_axes"]
    return NamedSharding(mesh, spec_for(axes, layout.rules, v.get_value().shape, mesh))

  return jax.tree.map(one, abstract_state, is_leaf=_is_variable)


def put(value, sharding: NamedSharding) -> jax.Array:
  """Places a host array: each addressable device receives only its own slice, so a split
  array never exists whole on one device (and each process supplies only its own shards)."""
  host = np.asarray(value)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_state(state: nnx.State, shardings: nnx.State) -> nnx.State:
  """A copy of `state` (host or device values) with every value placed by `put`."""
  return jax.tree.map(
    lambda v, s: v.replace(put(v.get_value(), s)), state, shardings, is_leaf=_is_variable
  )


def kv_cache_sharding(shape: tuple[int, ...], layout: Layout, mesh: Mesh) -> NamedSharding:
  """Sharding of a KV pool array of `shape` [L, N, Z, K, D]: kv heads split over `model` when it
  divides K, else replicated (the same fallback as the attention weights)."""
  return NamedSharding(mesh, spec_for(KV_CACHE_AXES, layout.rules, shape, mesh))


def batch_sharding(batch_size: int, layout: Layout, mesh: Mesh) -> NamedSharding:
  """Sharding of an engine input [B, ...]: rows split over `data` when it divides B, else
  replicated; the trailing dims are replicated."""
  return NamedSharding(mesh, spec_for(("batch",), layout.rules, (batch_size,), mesh))
