"""The paged KV cache and the attention backends that read it.

One model, three attention backends chosen at configuration time:
  xla     gathers a sequence's pages and runs masked softmax attention (any platform);
  native  xla, but decode steps over a float32 or bfloat16 pool call the C++ kernel in
          `cpu_kernels` (the default for a one-device CPU model, where the kernel builds);
  pallas  the kernels in `pallas_kernels/` (the TPU default; `interpret=True` runs them on CPU).

Letters: B batch, T query tokens, S key tokens, L layers, H query heads, K kv heads,
G = H // K, D head dim, N pool pages, Z page size, P pages per sequence.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec as P

from meshserve.models import cpu_kernels, precision
from meshserve.models.config import ModelConfig
from meshserve.pallas_kernels import (
  flash_attention,
  paged_prefill_attention,
  ragged_paged_attention,
)
from meshserve.sharding import MEGATRON, Rules


@struct.dataclass
class KVCache:
  """The paged KV pool of every layer. A sequence's page table lists the pool pages holding
  its tokens [0, Z), [Z, 2Z), ... Page 0 is a sink that padding tokens write to: the host
  never allocates it.

  A bfloat16 pool is stored as its uint16 bits on CPU (`models.precision`); `write` and `read`
  convert at the edges, and to everything else (the page movers, transfers) the pool is just
  its arrays."""

  k: jax.Array  # [L, N, Z, K, D]
  v: jax.Array  # [L, N, Z, K, D]

  @property
  def page_size(self) -> int:
    return self.k.shape[2]

  @property
  def dtype(self) -> jnp.dtype:
    """The dtype of the values held (bfloat16 for a pool stored as bits)."""
    return precision.value_dtype(self.k.dtype)

  @classmethod
  def zeros(cls, cfg: ModelConfig, num_pages: int, page_size: int, storage=None) -> KVCache:
    """An empty pool of the model's dtype, stored as `storage` (default: that dtype)."""
    shape = (cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    storage = cfg.dtype if storage is None else storage
    return cls(k=jnp.zeros(shape, storage), v=jnp.zeros(shape, storage))

  def write(self, layer: jax.Array, slots, k: jax.Array, v: jax.Array) -> KVCache:
    """Stores k, v [B, T, K, D] of one layer at slots (page, offset) [B, T]."""
    page, offset = slots
    k, v = precision.stored(k, self.k.dtype), precision.stored(v, self.v.dtype)
    return KVCache(
      k=self.k.at[layer, page, offset].set(k, mode="promise_in_bounds"),
      v=self.v.at[layer, page, offset].set(v, mode="promise_in_bounds"),
    )

  def read(self, layer: jax.Array, pages: jax.Array) -> tuple[jax.Array, jax.Array]:
    """k, v [*pages.shape, Z, K, D] of `pages` in one layer, as values of `dtype`."""
    return precision.values(self.k[layer, pages]), precision.values(self.v[layer, pages])

  def gather(self, layer: jax.Array, page_table: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each sequence's pages of one layer, in order: k, v [B, P*Z, K, D]."""
    B, P = page_table.shape
    _, _, Z, K, D = self.k.shape
    k, v = self.read(layer, page_table)
    return k.reshape(B, P * Z, K, D), v.reshape(B, P * Z, K, D)


def cache_slots(positions, page_table, page_size: int) -> tuple[jax.Array, jax.Array]:
  """(page, offset) [B, T] in the pool of each token; padding goes to the sink page 0."""
  page = jnp.take_along_axis(page_table, jnp.maximum(positions, 0) // page_size, axis=1)
  valid = positions >= 0
  return jnp.where(valid, page, 0), jnp.where(valid, positions % page_size, 0)


@dataclasses.dataclass(frozen=True, slots=True)
class AttentionBackend:
  """Which attention implementation the model traces. Static: part of the model's graph."""

  kind: Literal["xla", "native", "pallas"] = "xla"
  interpret: bool = False  # pallas only: run the kernels in interpret mode (CPU)
  # The model's layout's rules table: which mesh axes a Pallas call's rows (`batch`) and heads
  # (`kv_heads`) are split over, on a mesh (load_model sets the layout's own).
  rules: Rules = MEGATRON

  def __post_init__(self):
    if self.kind not in ("xla", "native", "pallas"):
      raise ValueError(f"attention: unknown backend {self.kind!r}; use 'xla', 'native' or 'pallas'")

  @classmethod
  def default_for(cls, platform: str, *, sharded: bool = False) -> AttentionBackend:
    """pallas on TPU (our kernels lower through Mosaic; GPU keeps XLA until a Triton variant
    exists); on CPU the native decode kernel when it builds and the model is on one device
    (XLA cannot split a custom call over a mesh), else xla."""
    if platform == "tpu":
      return cls("pallas")
    if platform == "cpu" and not sharded and cpu_kernels.available():
      return cls("native")
    return cls("xla")

  def __call__(
    self,
    q: jax.Array,  # [B, T, H, D]
    k: jax.Array,  # [B, T, K, D]: this step's keys (already written to `cache`, if any)
    v: jax.Array,  # [B, T, K, D]
    positions: jax.Array,  # [B, T]; -1 = padding
    cache: KVCache | None,
    layer: jax.Array,
    page_table: jax.Array | None,  # [B, P]
    *,
    window: int | None = None,  # a sliding window: keys each query sees, its own included
    local: jax.Array | None = None,  # traced bool: whether `window` applies to this layer
  ) -> jax.Array:
    """With `window` and no `local` the window applies; with `local`, only where it is True
    (a model that interleaves sliding-window and global layers under one scan)."""
    if window is not None and local is not None and self.kind == "pallas":
      # The kernels take the window as a static argument: trace both, run one.
      windowed = functools.partial(self, window=window)
      full = functools.partial(self, window=None)
      args = (q, k, v, positions, cache, layer, page_table)
      return jax.lax.cond(local, windowed, full, *args)
    # XLA paths take it as data: the keys visible from position p are those after p - span.
    span = window
    if window is not None and local is not None:
      span = jnp.where(local, window, NO_WINDOW)

    def paged_xla():
      k_all, v_all = cache.gather(layer, page_table)
      key_positions = jnp.arange(k_all.shape[1])[None, :]
      return xla_attention(q, k_all, v_all, positions, key_positions, span)

    def fresh_flash():
      # Every row starts at position 0, so its keys are exactly this step's tokens (padding
      # sits after them and only padded queries can see it).
      flash = functools.partial(
        flash_attention, causal=True, sliding_window=window, interpret=self.interpret
      )
      rows = _per_shard(q.shape[0], k.shape[2], self.rules)
      if rows is None:
        return flash(q, k, v)
      b, h = rows
      spec = P(b, None, h, None)
      return jax.shard_map(flash, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(
        q, k, v
      )

    if self.kind in ("xla", "native"):
      if cache is None:
        return xla_attention(q, k, v, positions, positions, span)
      if q.shape[1] > 1:
        return paged_xla()
      if self.kind == "native" and cache.k.dtype in cpu_kernels.TARGETS:
        return cpu_kernels.paged_decode_attention(
          q, cache.k, cache.v, layer, positions, page_table, span
        )
      return xla_paged_decode_attention(q, cache, layer, positions, page_table, span)
    if cache is None:
      return fresh_flash()
    k_pool, v_pool = precision.values(cache.k), precision.values(cache.v)  # bits on CPU
    rows = _per_shard(q.shape[0], cache.k.shape[3], self.rules)
    if q.shape[1] > 1:
      # A chunk after a cached prefix (chunked prefill, a prefix-cache hit) reads the pages
      # before it too: the paged kernel. A fresh prompt's keys are all in hand: flash.
      starts = jnp.maximum(positions[:, 0], 0).astype(jnp.int32)
      kv_lens = (jnp.max(positions, axis=1) + 1).astype(jnp.int32)  # padding is -1

      def after_prefix():
        return self._paged(
          paged_prefill_attention, rows, q, (starts, kv_lens), k_pool, v_pool, page_table, layer,
          window,
        )  # fmt: skip

      return jax.lax.cond(jnp.all(positions[:, 0] <= 0), fresh_flash, after_prefix)
    kv_lens = jnp.where(positions[:, 0] >= 0, positions[:, 0] + 1, 0).astype(jnp.int32)
    out = self._paged(
      ragged_paged_attention, rows, q[:, 0], (kv_lens,), k_pool, v_pool, page_table, layer,
      window,
    )  # fmt: skip
    return out[:, None]

  def _paged(self, kernel, rows, q, lens, k_pool, v_pool, page_table, layer, window):
    """`kernel` over this layer's pages, read in place (no slice of the pool); on a mesh, per
    shard of rows and kv heads. q: [B, T, H, D] for prefill, [B, H, D] for decode; lens: the
    kernel's per-row int32 arguments."""
    call = functools.partial(kernel, sliding_window=window, interpret=self.interpret)

    def run(q, k, v, *rest):
      *lens, table, layer = rest
      return call(q, k, v, *lens, table, layer=layer)

    args = (q, k_pool, v_pool, *lens, page_table, layer)
    if rows is None:
      return run(*args)
    b, h = rows
    pool = P(None, None, None, h, None)
    q_spec = P(b, None, h, None) if q.ndim == 4 else P(b, h, None)  # prefill, decode
    specs = (q_spec, pool, pool, *(P(b) for _ in lens), P(b, None), P())
    return jax.shard_map(run, in_specs=specs, out_specs=q_spec, check_vma=False)(*args)


NO_WINDOW = 1 << 30  # a span past any context: a global layer under a traced window


def _per_shard(batch: int, kv_heads: int, rules: Rules) -> tuple[str | None, str | None] | None:
  """How a Pallas kernel call is split over the mesh the step is traced under (XLA cannot
  partition a Mosaic kernel itself): rows and heads over the mesh axes the rules give `batch`
  and `kv_heads`, where they divide, each shard running the kernel on its own rows and heads.
  None without a multi-device mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None
  # Axes already manual (a data-parallel step runs each replica in a shard_map) are whole here.
  sizes = {a: n for a, n in mesh.shape.items() if a not in mesh.manual_axes}

  def axis(logical: str, size: int) -> str | None:
    name = rules.mesh_axis(logical)
    return name if sizes.get(name, 1) > 1 and size % sizes[name] == 0 else None

  return axis("batch", batch), axis("kv_heads", kv_heads)


def xla_attention(
  q: jax.Array,  # [B, T, H, D]
  k: jax.Array,  # [B, S, K, D]
  v: jax.Array,  # [B, S, K, D]
  q_pos: jax.Array,  # [B, T]; -1 = padding
  k_pos: jax.Array,  # [B or 1, S]
  window: jax.Array | int | None = None,  # a query at p sees keys after p - window
) -> jax.Array:
  """Masked softmax attention, causal by absolute position, GQA by grouping query heads.

  Heads lead ([B, K, G*T, D] against [B, K, S, D]) so both products are plain batched matrix
  multiplies: 3-4x faster on CPU than contracting in the [B, T, K, G, D] layout."""
  B, T, H, D = q.shape
  S, K = k.shape[1], k.shape[2]
  G = H // K
  qh = q.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, D)
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, D]
  scores = jnp.einsum("BKMD,BKSD->BKMS", qh, kh, preferred_element_type=jnp.float32)
  scores = (scores * (D**-0.5)).reshape(B, K, G, T, S)
  visible = (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] >= 0)  # [B, T, S]
  if window is not None:
    visible &= k_pos[:, None, :] > q_pos[:, :, None] - window
  scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
  # A padding query sees no key; give it a finite row so no NaN leaks anywhere.
  scores = jnp.where(jnp.any(visible, axis=-1)[:, None, None, :, None], scores, 0.0)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(B, K, G * T, S)
  out = jnp.einsum("BKMS,BKSD->BKMD", probs, vh, preferred_element_type=jnp.float32)
  out = out.reshape(B, K, G, T, D).transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)
  return out.astype(q.dtype)


def xla_paged_decode_attention(
  q: jax.Array,  # [B, 1, H, D]: each sequence's newest token
  cache: KVCache,
  layer: jax.Array,
  positions: jax.Array,  # [B, 1]; -1 = padding row
  page_table: jax.Array,  # [B, P]
  window: jax.Array | int | None = None,  # the newest `window` keys only
  groups: int = 4,
) -> jax.Array:
  """One-token attention that walks each sequence's pages one at a time with an online softmax.

  Gathering every sequence's pages into one [B, P*Z, K, D] copy first, as prefill does, is 3x
  slower on CPU at decode batch sizes. The rows are walked in `groups` of consecutive rows, each
  only as far as its longest sequence reaches: the runner orders decode rows longest first, so
  short sequences do not pay for the page-table width of long ones."""
  B, _, H, D = q.shape
  K, Z = cache.k.shape[3], cache.page_size
  G = H // K
  groups = math.gcd(B, groups)
  qg = (q.reshape(B, K, G, D).astype(jnp.float32) * (D**-0.5)).reshape(groups, -1, K, G, D)
  last = positions[:, 0].reshape(groups, -1)
  # The first visible position of each row (0, or where its window starts).
  first = jnp.zeros_like(last) if window is None else jnp.maximum(last - window + 1, 0)
  tables = page_table.reshape(groups, -1, page_table.shape[1])

  def walk(qg, last, first, table):
    rows = qg.shape[0]

    def page(p, carry):
      m, norm, acc = carry  # running max [R, K, G], normalizer [R, K, G], output [R, K, G, D]
      k, v = (x.astype(jnp.float32) for x in cache.read(layer, table[:, p]))  # [R, Z, K, D]
      s = jnp.sum(qg[:, None] * k[:, :, :, None, :], axis=-1)  # [R, Z, K, G]
      key = p * Z + jnp.arange(Z)[None, :]
      visible = (key <= last[:, None]) & (key >= first[:, None])  # [R, Z]
      s = jnp.where(visible[:, :, None, None], s, -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      e = jnp.exp(s - m_new[:, None])
      scale = jnp.exp(m - m_new)
      norm = norm * scale + jnp.sum(e, axis=1)
      acc = acc * scale[..., None] + jnp.sum(e[..., None] * v[:, :, :, None, :], axis=1)
      return m_new, norm, acc

    init = (
      jnp.full((rows, K, G), -1e30, jnp.float32),  # finite: a masked page leaves no NaN
      jnp.zeros((rows, K, G), jnp.float32),
      jnp.zeros((rows, K, G, D), jnp.float32),
    )
    # Only the pages that hold this group's visible keys (never past the table).
    num_pages = jnp.minimum(jnp.max(last) // Z + 1, table.shape[1])
    first_page = jnp.min(jnp.where(last >= 0, first, NO_WINDOW)) // Z
    _, norm, acc = jax.lax.fori_loop(jnp.minimum(first_page, num_pages), num_pages, page, init)
    return acc / jnp.maximum(norm, 1e-30)[..., None]  # a padding row (norm = 0) gets zeros

  out = jnp.stack([walk(qg[g], last[g], first[g], tables[g]) for g in range(groups)])
  return out.reshape(B, 1, H, D).astype(q.dtype)
