"""Ragged paged decode attention: one new query token per sequence, KV read straight from the
page pool through each sequence's page table, in the spirit of ragged paged attention v3.

One grid step per sequence. It walks only the sequence's live KV, a block of
`pages_per_block` pages at a time (from the first block of its sliding window, if any, to the
block of its last token), each page DMA'd from the pool in HBM into VMEM while the previous
block is attended to (double buffering). Work and traffic follow `kv_lens`, not the page
table's width. The page table reaches SMEM a row at a time (a [1, P] block per step), so any
batch and context that fit HBM fit SMEM too.

Each KV head is attended once, by all G of its query heads in one matmul: the pool is viewed
as [.., Z, K*D] (free, row-major), so head h is the lane slice [h*D, (h+1)*D) of a block.
MXU operands stay in the KV dtype (bfloat16 in serving); scores, the softmax and the
accumulator are float32.

With `layer`, the pool is every layer's ([L, N, Z, K, D]) and the layer index is
scalar-prefetched: the kernel DMAs the pages it needs from the pool the model carries.

Letters: B batch, H query heads, K kv heads, G = H // K, D head dim, N pool pages, Z page
size, P pages per sequence, T tokens per block (pages_per_block * Z).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from meshserve.pallas_kernels import online_softmax
from meshserve.pallas_kernels.online_softmax import LANES

PAGES_PER_BLOCK = 16  # pages per DMA batch: 256 tokens at page size 16


def _kernel(
  layer_ref,  # [1] int32 (SMEM, scalar prefetch)
  lens_ref,  # [B] int32 (SMEM, scalar prefetch)
  pages_ref,  # [1, P] int32 (SMEM): this sequence's page table
  q_ref,  # [H, D]
  k_hbm,  # [L, N, Z, K*D] (HBM)
  v_hbm,  # [L, N, Z, K*D] (HBM)
  o_ref,  # [H, D]
  k_buf,  # [2, T, K*D] (VMEM): two blocks, one being filled while the other is read
  v_buf,  # [2, T, K*D]
  sems,  # DMA semaphores [2, 2]: (k or v, buffer)
  m_ref,  # [H, LANES] f32: running max
  l_ref,  # [H, LANES] f32: running denominator
  acc_ref,  # [H, D] f32
  *,
  sm_scale: float,
  num_kv_heads: int,
  page_size: int,
  pages_per_block: int,
  sliding_window: int | None,
):
  b = pl.program_id(0)
  kv_len, layer = lens_ref[b], layer_ref[0]
  H, D = q_ref.shape
  K, Z, ppb = num_kv_heads, page_size, pages_per_block
  G, T = H // K, pages_per_block * page_size
  first_visible = 0 if sliding_window is None else jnp.maximum(kv_len - sliding_window, 0)
  # lax.div and lax.rem, not // and %: those lower `sign`, which Mosaic lacks on scalars.
  first_block = jax.lax.div(first_visible, T)
  end_block = jax.lax.div(kv_len + T - 1, T)
  last_page = jnp.maximum(jax.lax.div(kv_len + Z - 1, Z) - 1, 0)

  def page_copies(block, slot):
    """The DMAs of a block's live pages, (page in the block, k copy, v copy)."""
    for j in range(ppb):  # static: pages_per_block is small
      index = block * ppb + j
      page = pages_ref[0, jnp.minimum(index, last_page)]
      rows = pl.ds(j * Z, Z)
      k = pltpu.make_async_copy(k_hbm.at[layer, page], k_buf.at[slot, rows], sems.at[0, slot])
      v = pltpu.make_async_copy(v_hbm.at[layer, page], v_buf.at[slot, rows], sems.at[1, slot])
      yield index <= last_page, k, v

  def start(block, slot):
    for live, k, v in page_copies(block, slot):
      pl.when(live)(_both(k.start, v.start))

  def wait(block, slot):
    for live, k, v in page_copies(block, slot):
      pl.when(live)(_both(k.wait, v.wait))

  def attend(block, slot):
    pos = block * T + jax.lax.broadcasted_iota(jnp.int32, (1, T), 1)
    visible = (pos < kv_len) & (pos >= first_visible)  # [1, T]
    # Rows past the last live page hold whatever the buffer held: zero their values, so that
    # a zero weight times a stale NaN cannot reach the output.
    rows_visible = block * T + jax.lax.broadcasted_iota(jnp.int32, (T, 1), 0) < (last_page + 1) * Z
    k_all, v_all = k_buf[slot], jnp.where(rows_visible, v_buf[slot], 0)  # [T, K*D]
    for h in range(K):  # static: each kv head once, for its G query heads
      rows, cols = slice(h * G, (h + 1) * G), slice(h * D, (h + 1) * D)
      q = q_ref[rows, :].astype(k_all.dtype)  # [G, D]
      s = jax.lax.dot_general(
        q, k_all[:, cols], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
      )  # [G, T]
      s = jnp.where(visible, s * sm_scale, -jnp.inf)
      online_softmax.update(m_ref, l_ref, acc_ref, s, v_all[:, cols], rows)

  online_softmax.init(m_ref, l_ref, acc_ref)

  @pl.when(end_block > first_block)
  def _walk():
    start(first_block, 0)

    def step(block, carry):
      slot = jax.lax.rem(block - first_block, 2)

      @pl.when(block + 1 < end_block)
      def _():
        start(block + 1, 1 - slot)

      wait(block, slot)
      attend(block, slot)
      return carry

    jax.lax.fori_loop(first_block, end_block, step, 0)

  o_ref[...] = online_softmax.finalize(l_ref, acc_ref, o_ref.dtype)


def _both(first, second):
  def run():
    first()
    second()

  return run


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


def cost_estimate(B, H, D, N, Z, K, P, itemsize, window, block_tokens) -> pl.CostEstimate:
  """What a step reads and computes, for XLA's scheduler and cost analysis. The live KV is
  dynamic, so the estimate assumes full rows, capped by the pool: a pool sized for the batch is
  what the rows hold (prefix pages shared by several rows are read once per row, and count once
  here). A windowed row reads its window and, on average, half a block more."""
  row = P * Z if window is None else min(P * Z, window + block_tokens // 2)
  tokens = min(B * row, N * Z)
  return pl.CostEstimate(
    flops=4 * tokens * H * D,
    transcendentals=tokens * H,
    bytes_accessed=itemsize * (2 * B * H * D + 2 * tokens * K * D) + 4 * (B * (P + 1) + 1),
  )


@functools.partial(
  jax.jit, static_argnames=("sm_scale", "sliding_window", "pages_per_block", "interpret")
)
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
  pages_per_block: int = PAGES_PER_BLOCK,
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
    pages_per_block: pages fetched per block (fewer when P is smaller).
    interpret: run the kernel in interpret mode (True, or `pltpu.InterpretParams()`).

  Returns:
    [B, H, D] in q's dtype; zeros for a sequence of length 0.
  """
  _validate(q, k_pages, v_pages, kv_lens, page_indices, layered=layer is not None)
  B, H, D = q.shape
  N, Z, K, _ = k_pages.shape[-4:]
  P = page_indices.shape[1]
  ppb = max(1, min(pages_per_block, P))
  sm_scale = D**-0.5 if sm_scale is None else sm_scale
  # [L, N, Z, K, D] -> [L, N, Z, K*D] is free (row-major); a one-layer pool is a pool of L = 1.
  k_flat = k_pages.reshape(-1, N, Z, K * D)
  v_flat = v_pages.reshape(-1, N, Z, K * D)
  layer = jnp.zeros(1, jnp.int32) if layer is None else jnp.reshape(layer, (1,)).astype(jnp.int32)
  kernel = functools.partial(
    _kernel, sm_scale=sm_scale, num_kv_heads=K, page_size=Z, pages_per_block=ppb,
    sliding_window=sliding_window,
  )  # fmt: skip
  return pl.pallas_call(
    kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(B,),
      in_specs=[
        # [B, 1, P]: a block's last two dims must be whole (or (8, 128) multiples).
        pl.BlockSpec((None, 1, P), lambda b, *_: (b, 0, 0), memory_space=pltpu.SMEM),
        pl.BlockSpec((None, H, D), lambda b, *_: (b, 0, 0)),
        pl.BlockSpec(memory_space=pl.ANY),
        pl.BlockSpec(memory_space=pl.ANY),
      ],
      out_specs=pl.BlockSpec((None, H, D), lambda b, *_: (b, 0, 0)),
      scratch_shapes=[
        pltpu.VMEM((2, ppb * Z, K * D), k_flat.dtype),
        pltpu.VMEM((2, ppb * Z, K * D), v_flat.dtype),
        pltpu.SemaphoreType.DMA((2, 2)),
        pltpu.VMEM((H, LANES), jnp.float32),
        pltpu.VMEM((H, LANES), jnp.float32),
        pltpu.VMEM((H, D), jnp.float32),
      ],
    ),
    out_shape=jax.ShapeDtypeStruct((B, H, D), q.dtype),
    cost_estimate=cost_estimate(B, H, D, N, Z, K, P, q.dtype.itemsize, sliding_window, ppb * Z),
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
    interpret=interpret,
  )(layer, kv_lens, page_indices[:, None, :], q, k_flat, v_flat)
