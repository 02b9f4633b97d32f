"""The events of disaggregated serving, between a prefill engine core and a decode one.

A prefill core ends a request's stream with a `Handoff`: the request's state and its prompt's
KV, packed by `Runner.export_pages` (the copy is dispatched, not waited for). Its pages stay
pinned in the prefill pool until the stream's consumer releases them.

A decode core takes the state and a `KVFetch`: it first reserves pages, then calls the fetch
with the packed array's target sharding (its own layout) and shape. The fetch starts the copy
and returns at once: `jax.device_put` within a process, a `jax.experimental.transfer` pull
across processes. The core keeps stepping while the copy runs; once the array is ready it
writes it into the reserved pages, admits the request and reports `Landed`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from meshserve.engine.api import Landed, RequestTiming, TransferError  # noqa: F401 - re-exported
from meshserve.engine.request import RequestState


@dataclasses.dataclass(frozen=True, slots=True)
class PackedKV:
  """The layout of a request's KV between two stages: one array [2, L, n, Z, K, D] (keys and
  values, layers, n pages, page slots, kv heads, head dim), n a page bucket whose tail is
  padding. A stage packs it from its pool's pages and unpacks it into its own; across
  processes it travels cut along the kv heads, one piece per kv-head shard of the receiver."""

  AXES = ("kv", "layers", "pages", "page_slots", "kv_heads", "head_dim")
  KV_HEADS = AXES.index("kv_heads")

  num_layers: int
  page_size: int
  kv_heads: int
  head_dim: int

  def shape(self, num_pages: int) -> tuple[int, ...]:
    return (2, self.num_layers, num_pages, self.page_size, self.kv_heads, self.head_dim)

  def piece_shape(self, num_pages: int, pieces: int) -> tuple[int, ...]:
    """One of `pieces` equal cuts along the kv heads."""
    shape = list(self.shape(num_pages))
    shape[self.KV_HEADS] //= pieces
    return tuple(shape)


# (sharding, shape) -> the packed KV (PackedKV) in that sharding; may not be ready yet.
KVFetch = Callable[[jax.sharding.Sharding, tuple[int, ...]], jax.Array]


@dataclasses.dataclass(frozen=True)
class Handoff:
  """A prefill stream's last event: continue `state` on a decode stage with `kv`."""

  request_id: str  # the prefill core's id: what `release` takes
  state: RequestState
  kv: jax.Array  # PackedKV on the prefill mesh
  num_pages: int  # pages that hold the prompt (n >= num_pages; the rest is padding)
  timing: RequestTiming  # the prefill stage's queue and first-token times
  final = True

  def fetch(self, sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> jax.Array:
    """The in-process KVFetch: one device_put into the decode stage's sharding."""
    if shape != self.kv.shape:
      raise TransferError(f"kv: decode expects {shape}, prefill packed {self.kv.shape}")
    return jax.device_put(self.kv, sharding)


@dataclasses.dataclass(frozen=True)
class StageFailed:
  """A request's stream ends with an error of its own (the stage goes on serving)."""

  request_id: str
  error: Exception
  final = True
