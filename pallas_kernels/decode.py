"""Ragged paged decode attention: one new query token per sequence, KV read straight from the
page pool through each sequence's page table.

Grid (B, P): step (b, p) attends sequence b's query heads to its p-th page with an online
softmax (float32) held in VMEM scratch. Page indices and lengths are scalar-prefetched, so the K/V
BlockSpecs fetch exactly the pages a sequence uses: steps past its last page map to the same
block (no new DMA) and skip compute.

With `layer`, the pool is every layer's ([L, N, Z, K, D]) and the layer index is
scalar-prefetched too: a model's layer loop hands the kernel the pool it carries, and the
kernel DMAs the pages it needs from it. Slicing `pool[layer]` outside would copy a whole layer
of the pool on every layer of every step.

Letters: B batch, H query heads, K kv heads, G = H // K, D head dim, N pool pages, Z page
size, P pages per sequence.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from meshserve.pallas_kernels import online_softmax
from meshserve.pallas_kernels.online_softmax import LANES


def _kernel(
  layer_ref,  # [1] int32 (SMEM, scalar prefetch)
  lens_ref,  # [B] int32 (SMEM, scalar prefetch)
  pages_ref,  # [B, P] int32 (SMEM, scalar prefetch)
  q_ref,  # [H, D]
  k_ref,  # [Z*K, D]: one page, token-major, heads interleaved
  v_ref,  # [Z*K, D]
  o_ref,  # [H, D]
  m_ref,  # [H, LANES] f32 scratch: running max
  l_ref,  # [H, LANES] f32 scratch: running denominator
  acc_ref,  # [H, D] f32 scratch
  *,
  sm_scale: float,
  num_kv_heads: int,
  page_size: int,
  sliding_window: int | None,
):
  del layer_ref  # used by the BlockSpecs only
  b, p = pl.program_id(0), pl.program_id(1)
  kv_len = lens_ref[b]
  H = q_ref.shape[0]
  K, Z = num_kv_heads, page_size
  G = H // K

  @pl.when(p == 0)
  def _init():
    online_softmax.init(m_ref, l_ref, acc_ref)

  first_visible = 0 if sliding_window is None else kv_len - sliding_window
  page_start = p * Z

  @pl.when((page_start < kv_len) & (page_start + Z > first_visible))
  def _attend():
    # Row r of a page is token r // K, kv head r % K. Each head attends to the whole page with
    # the other heads' rows masked: decode is bound by reading the page, not by these tiny
    # matmuls, and it avoids strided loads (which Mosaic lacks for 16-bit types).
    cols = jax.lax.broadcasted_iota(jnp.int32, (G, Z * K), 1)
    token = jnp.floor((cols.astype(jnp.float32) + 0.5) * (1.0 / K)).astype(jnp.int32)
    head = cols - token * K
    pos = page_start + token
    in_range = (pos < kv_len) & (pos >= first_visible)
    k = k_ref[...].astype(jnp.float32)  # [Z*K, D]
    v = v_ref[...]  # [Z*K, D]
    for h in range(K):  # static: K is small
      rows = slice(h * G, (h + 1) * G)
      q = q_ref[rows, :].astype(jnp.float32) * sm_scale  # [G, D]
      s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
      s = jnp.where(in_range & (head == h), s, -jnp.inf)  # [G, Z*K]
      online_softmax.update(m_ref, l_ref, acc_ref, s, v, rows)

  @pl.when(p == pl.num_programs(1) - 1)
  def _finish():
    o_ref[...] = online_softmax.finalize(l_ref, acc_ref, o_ref.dtype)


def _validate(q, k_pages, v_pages, kv_lens, page_indices, layered: bool):
  if q.ndim != 3:
    raise ValueError(f"q: expected [B, H, D], got shape {q.shape}")
  want = "[L, N, Z, K, D] (with layer)" if layered else "[N, Z, K, D]"
  if k_pages.ndim != 4 + layered or k_pages.shape != v_pages.shape:
    raise ValueError(
      f"k_pages, v_pages: expected equal {want} shapes, got {k_pages.shape}, {v_pages.shape}"
    )
  B, H, D = q.shape
  N, Z, K, Dk = k_pages.shape[-4:]
  if Dk != D:
    raise ValueError(f"k_pages: head dim {Dk} != q head dim {D}")
  if H % K:
    raise ValueError(f"q: {H} query heads are not a multiple of {K} kv heads")
  if kv_lens.shape != (B,) or kv_lens.dtype != jnp.int32:
    raise ValueError(f"kv_lens: expected int32 [{B}], got {kv_lens.dtype} {kv_lens.shape}")
  if page_indices.ndim != 2 or page_indices.shape[0] != B or page_indices.dtype != jnp.int32:
    raise ValueError(
      f"page_indices: expected int32 [{B}, P], got {page_indices.dtype} {page_indices.shape}"
    )
  if q.dtype != k_pages.dtype or k_pages.dtype != v_pages.dtype:
    raise ValueError(f"q, k_pages, v_pages: dtypes differ ({q.dtype}, {k_pages.dtype})")


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "interpret"))
def ragged_paged_attention(
  q: jax.Array,
  k_pages: jax.Array,
  v_pages: jax.Array,
  kv_lens: jax.Array,
  page_indices: jax.Array,
  *,
  layer: jax.Array | int | None = None,
  sm_scale: float | None = None,
  sliding_window: int | None = None,
  interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
  """Attention of each sequence's newest token to its cached KV.

  Args:
    q: [B, H, D], the newest token of each sequence.
    k_pages, v_pages: [N, Z, K, D], the page pool; H % K == 0. With `layer`: [L, N, Z, K, D],
      every layer's pool, read in place.
    kv_lens: [B] int32, tokens in each sequence's cache, the newest included (0 allowed).
    page_indices: [B, P] int32, pool page of each of a sequence's pages; entries past a
      sequence's last page are never read.
    layer: the layer of a [L, N, Z, K, D] pool to attend to (an int32 scalar, traced or not).
    sm_scale: softmax scale, default D ** -0.5.
    sliding_window: attend only to the newest `sliding_window` tokens.
    interpret: run the kernel in interpret mode (True, or `pltpu.InterpretParams()`).

  Returns:
    [B, H, D] in q's dtype; zeros for a sequence of length 0.
  """
  _validate(q, k_pages, v_pages, kv_lens, page_indices, layered=layer is not None)
  B, H, D = q.shape
  N, Z, K, _ = k_pages.shape[-4:]
  P = page_indices.shape[1]
  sm_scale = D**-0.5 if sm_scale is None else sm_scale
  # [L, N, Z, K, D] -> [L, N, Z*K, D] is free (row-major) and keeps each block's two minor dims
  # whole, as Mosaic wants. A one-layer pool is a pool of L = 1.
  k_flat = k_pages.reshape(-1, N, Z * K, D)
  v_flat = v_pages.reshape(-1, N, Z * K, D)
  layer = jnp.zeros(1, jnp.int32) if layer is None else jnp.reshape(layer, (1,)).astype(jnp.int32)

  def kv_map(b, p, layer, lens, pages):
    last = jax.lax.div(jnp.maximum(lens[b] - 1, 0), Z)  # lax.div: `//` would lower `sign`
    return layer[0], pages[b, jnp.minimum(p, last)], 0, 0

  kernel = functools.partial(
    _kernel, sm_scale=sm_scale, num_kv_heads=K, page_size=Z, sliding_window=sliding_window
  )
  return pl.pallas_call(
    kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(B, P),
      in_specs=[
        pl.BlockSpec((None, H, D), lambda b, p, *_: (b, 0, 0)),
        pl.BlockSpec((None, None, Z * K, D), kv_map),
        pl.BlockSpec((None, None, Z * K, D), kv_map),
      ],
      out_specs=pl.BlockSpec((None, H, D), lambda b, p, *_: (b, 0, 0)),
      scratch_shapes=[
        pltpu.VMEM((H, LANES), jnp.float32),
        pltpu.VMEM((H, LANES), jnp.float32),
        pltpu.VMEM((H, D), jnp.float32),
      ],
    ),
    out_shape=jax.ShapeDtypeStruct((B, H, D), q.dtype),
    # An upper bound: lengths are dynamic, so count every page the tables could name.
    cost_estimate=pl.CostEstimate(
      flops=4 * B * H * P * Z * K * D,
      transcendentals=B * H * P * Z * K,
      bytes_accessed=q.dtype.itemsize * (2 * B * H * D + 2 * B * P * Z * K * D)
      + 4 * (B * (P + 1) + 1),
    ),
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
    interpret=interpret,
  )(layer, kv_lens, page_indices, q, k_flat, v_flat)
