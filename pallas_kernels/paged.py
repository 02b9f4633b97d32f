"""Ragged paged attention: queries read their sequence's KV straight from the page pool
through its page table, in the spirit of ragged paged attention v3. Decode
(`ragged_paged_attention`, one query a sequence) and a prefill chunk after a cached prefix
(`paged_prefill_attention`, blocks of `block_q` queries) run the same kernel.

One grid step per sequence and query block. It walks only the KV its queries can see, a block
of `pages_per_block` pages at a time (from the first block of the sliding window, if any, to
the block of the last query's position), each page DMA'd from the pool in HBM into VMEM while
the previous block is attended to (double buffering). Work and traffic follow the live
lengths, not the page table's width. The page table reaches SMEM a row at a time (a [1, P]
block per step), so any batch and context that fit HBM fit SMEM too.

Each KV block is read once per query block and attended once per KV head, by all G of its
query heads and all the block's queries in one matmul. The pool is viewed as [.., Z*K, D]
(free: the tiled minor dim stays whole), so a block's rows interleave the kv heads; where a
shard holds K > 1 of them, each head's matmul spans all the block's rows with the others'
masked (K-fold MXU work: a head's rows are strided, and Mosaic has no strided 16-bit loads;
a head-major pool, [N, K, Z, D], would remove it). MXU operands stay in the KV dtype (bfloat16
in serving); scores, the softmax and the accumulator are float32.

With `layer`, the pool is every layer's ([L, N, Z, K, D]) and the layer index is
scalar-prefetched: the kernel DMAs the pages it needs from the pool the model carries.

Letters: B batch, T queries, H query heads, K kv heads, G = H // K, D head dim, N pool pages,
Z page size, P pages per sequence, Tq queries per block, R = G * Tq rows per kv head, Tk keys
per block (pages_per_block * Z).
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
BLOCK_Q = 128  # queries per block of a prefill chunk, at most
ROWS = 2048  # query rows (heads x queries) per block, at most: 3 MiB of float32 state
KEY_ROWS = 256  # key rows (tokens x kv heads) per block, at most


def _kernel(
  layer_ref,  # [1] int32 (SMEM, scalar prefetch)
  starts_ref,  # [B] int32 (SMEM, scalar prefetch): position of each row's first query
  lens_ref,  # [B] int32 (SMEM, scalar prefetch): tokens in each row's cache
  pages_ref,  # [1, P] int32 (SMEM): this row's page table
  q_ref,  # [K, R, D]: a block of Tq queries, R = G * Tq rows per kv head (g major, t minor)
  k_hbm,  # [L, N, Z*K, D] (HBM): row z*K + h of a page is token z's key for kv head h
  v_hbm,  # [L, N, Z*K, D] (HBM)
  o_ref,  # [K, R, D]
  k_buf,  # [2, Tk*K, D] (VMEM): two blocks of keys, one being filled while the other is read
  v_buf,  # [2, Tk*K, D]
  sems,  # DMA semaphores [2, 2]: (k or v, buffer)
  m_ref,  # [K*R, LANES] f32: running max
  l_ref,  # [K*R, LANES] f32: running denominator
  acc_ref,  # [K*R, D] f32
  *,
  sm_scale: float,
  block_q: int,
  page_size: int,
  pages_per_block: int,
  sliding_window: int | None,
):
  b, i = pl.program_id(0), pl.program_id(1)
  kv_len, layer = lens_ref[b], layer_ref[0]
  K, R, D = q_ref.shape
  Z, ppb, Tq = page_size, pages_per_block, block_q
  Tk = ppb * Z
  # The block's queries sit at q_lo, q_lo + 1, ...; those at kv_len or past it are padding.
  q_lo = starts_ref[b] + i * Tq
  keys_end = jnp.where(q_lo < kv_len, jnp.minimum(q_lo + Tq, kv_len), 0)  # keys < keys_end
  keys_start = 0 if sliding_window is None else jnp.maximum(q_lo - sliding_window + 1, 0)
  # lax.div and lax.rem, not // and %: those lower `sign`, which Mosaic lacks on scalars.
  first_block = jax.lax.div(keys_start, Tk)
  end_block = jax.lax.div(keys_end + Tk - 1, Tk)
  last_page = jnp.maximum(jax.lax.div(keys_end + Z - 1, Z) - 1, 0)
  q_pos = q_lo + jax.lax.rem(jax.lax.broadcasted_iota(jnp.int32, (R, 1), 0), Tq)  # [R, 1]

  def page_copies(block, slot):
    """The DMAs of a block's live pages: (whether the page is live, k copy, v copy)."""
    for j in range(ppb):  # static: pages_per_block is small
      index = block * ppb + j
      page = pages_ref[0, jnp.minimum(index, last_page)]
      rows = pl.ds(j * Z * K, Z * K)
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
    # Key row c of the block is token c // K's, for kv head c % K (float division: Mosaic has
    # no vector integer division; exact for these small integers).
    cols = jax.lax.broadcasted_iota(jnp.int32, (1, Tk * K), 1)
    token = jnp.floor((cols.astype(jnp.float32) + 0.5) * (1.0 / K)).astype(jnp.int32)
    k_pos = block * Tk + token
    visible = (k_pos <= q_pos) & (k_pos < kv_len)  # [R, Tk*K]: causal
    if sliding_window is not None:
      visible &= k_pos > q_pos - sliding_window
    # Rows past the last live page hold whatever the buffer held: zero their values, so that
    # a zero weight times a stale NaN cannot reach the output.
    rows_live = (
      jax.lax.broadcasted_iota(jnp.int32, (Tk * K, 1), 0) < ((last_page + 1) * Z - block * Tk) * K
    )
    k_all, v_all = k_buf[slot], jnp.where(rows_live, v_buf[slot], 0)  # [Tk*K, D]
    for h in range(K):  # static: each kv head once, for all its query heads and queries
      rows = slice(h * R, (h + 1) * R)
      q = q_ref[h].astype(k_all.dtype)  # [R, D]
      s = jax.lax.dot_general(
        q, k_all, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
      )  # [R, Tk*K]
      # The other heads' rows are masked: interleaved in a page, a head's rows are strided,
      # and Mosaic has no strided 16-bit loads (the cost of a [Z, K, D] pool layout).
      mine = visible if K == 1 else visible & (cols - token * K == h)
      online_softmax.update(
        m_ref, l_ref, acc_ref, jnp.where(mine, s * sm_scale, -jnp.inf), v_all, rows
      )

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

  out = online_softmax.finalize(l_ref, acc_ref, jnp.float32)  # [K*R, D]
  for h in range(K):
    o_ref[h] = jnp.where(q_pos < kv_len, out[h * R : (h + 1) * R], 0.0).astype(o_ref.dtype)


def _both(first, second):
  def run():
    first()
    second()

  return run


def _validate(q, k_pages, v_pages, kv_lens, page_indices, layered: bool, prefill: bool):
  want_q = "[B, T, H, D]" if prefill else "[B, H, D]"
  if q.ndim != 3 + prefill:
    raise ValueError(f"q: expected {want_q}, got shape {q.shape}")
  want = "[L, N, Z, K, D] (with layer)" if layered else "[N, Z, K, D]"
  if k_pages.ndim != 4 + layered or k_pages.shape != v_pages.shape:
    raise ValueError(
      f"k_pages, v_pages: expected equal {want} shapes, got {k_pages.shape}, {v_pages.shape}"
    )
  B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
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


def cost_estimate(B, T, H, D, N, Z, K, P, itemsize, window, block_q, block_k) -> pl.CostEstimate:
  """What a call reads and computes, for XLA's scheduler and cost analysis. The live KV is
  dynamic, so the estimate assumes full rows, capped by the pool: a pool sized for the batch
  is what the rows hold (prefix pages shared by several rows are read once per row, and count
  once here). A windowed row reads its window and, on average, half a block more. Each block
  of `block_q` queries reads its row's keys once, for every head."""
  row = P * Z if window is None else min(P * Z, window + block_k // 2)
  live = min(B * row, N * Z)  # keys of all rows
  keys = live * -(-T // block_q)
  return pl.CostEstimate(  # K > 1: each kv head's matmul spans every head's rows (masked)
    flops=4 * T * live * H * D * K,
    transcendentals=T * live * H * K,
    bytes_accessed=itemsize * (2 * B * T * H * D + 2 * keys * K * D) + 4 * (B * (P + 2) + 1),
  )


def _paged_call(
  q, k_pages, v_pages, starts, kv_lens, page_indices, layer, *, block_q, sm_scale,
  sliding_window, pages_per_block, interpret,
):  # fmt: skip
  """q [B, T, H, D] (T a multiple of block_q) -> [B, T, H, D]: the kernel over a (B, T /
  block_q) grid."""
  B, T, H, D = q.shape
  N, Z, K, _ = k_pages.shape[-4:]
  P, G, Tq = page_indices.shape[1], H // K, block_q
  # A block holds at most KEY_ROWS key rows (tokens x kv heads): its scores stay in VMEM.
  ppb = max(1, min(pages_per_block, P, KEY_ROWS // (Z * K)))
  sm_scale = D**-0.5 if sm_scale is None else sm_scale
  # Rows of a query block, per kv head: its G query heads times Tq queries (g major).
  q5 = q.reshape(B, T // Tq, Tq, K, G, D).transpose(0, 1, 3, 4, 2, 5)
  q5 = q5.reshape(B, T // Tq, K, G * Tq, D)
  # [L, N, Z, K, D] -> [L, N, Z*K, D] keeps the tiled minor dim (D) whole: no copy of the pool
  # (a [.., Z, K*D] view would relayout it whenever K > 1). A one-layer pool has L = 1.
  k_flat = k_pages.reshape(-1, N, Z * K, D)
  v_flat = v_pages.reshape(-1, N, Z * K, D)
  layer = jnp.zeros(1, jnp.int32) if layer is None else jnp.reshape(layer, (1,)).astype(jnp.int32)
  kernel = functools.partial(
    _kernel, sm_scale=sm_scale, block_q=Tq, page_size=Z, pages_per_block=ppb,
    sliding_window=sliding_window,
  )  # fmt: skip
  block = pl.BlockSpec((None, None, K, G * Tq, D), lambda b, i, *_: (b, i, 0, 0, 0))
  out = pl.pallas_call(
    kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(B, T // Tq),
      in_specs=[
        # [B, 1, P]: a block's last two dims must be whole (or (8, 128) multiples).
        pl.BlockSpec((None, 1, P), lambda b, i, *_: (b, 0, 0), memory_space=pltpu.SMEM),
        block,
        pl.BlockSpec(memory_space=pl.ANY),
        pl.BlockSpec(memory_space=pl.ANY),
      ],
      out_specs=block,
      scratch_shapes=[
        pltpu.VMEM((2, ppb * Z * K, D), k_flat.dtype),
        pltpu.VMEM((2, ppb * Z * K, D), v_flat.dtype),
        pltpu.SemaphoreType.DMA((2, 2)),
        pltpu.VMEM((H * Tq, LANES), jnp.float32),
        pltpu.VMEM((H * Tq, LANES), jnp.float32),
        pltpu.VMEM((H * Tq, D), jnp.float32),
      ],
    ),
    out_shape=jax.ShapeDtypeStruct(q5.shape, q.dtype),
    cost_estimate=cost_estimate(
      B, T, H, D, N, Z, K, P, q.dtype.itemsize, sliding_window, Tq, ppb * Z
    ),
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
    interpret=interpret,
  )(layer, starts, kv_lens, page_indices[:, None, :], q5, k_flat, v_flat)
  out = out.reshape(B, T // Tq, K, G, Tq, D).transpose(0, 1, 4, 2, 3, 5)
  return out.reshape(B, T, H, D)


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
    pages_per_block: pages fetched per block, at most (fewer when P is smaller, or where a
      block would pass KEY_ROWS token x kv-head rows).
    interpret: run the kernel in interpret mode (True, or `pltpu.InterpretParams()`).

  Returns:
    [B, H, D] in q's dtype; zeros for a sequence of length 0.
  """
  _validate(q, k_pages, v_pages, kv_lens, page_indices, layer is not None, prefill=False)
  starts = jnp.maximum(kv_lens - 1, 0)
  out = _paged_call(
    q[:, None], k_pages, v_pages, starts, kv_lens, page_indices, layer, block_q=1,
    sm_scale=sm_scale, sliding_window=sliding_window, pages_per_block=pages_per_block,
    interpret=interpret,
  )  # fmt: skip
  return out[:, 0]


@functools.partial(
  jax.jit,
  static_argnames=("sm_scale", "sliding_window", "block_q", "pages_per_block", "interpret"),
)
def paged_prefill_attention(
  q: jax.Array,
  k_pages: jax.Array,
  v_pages: jax.Array,
  starts: jax.Array,
  kv_lens: jax.Array,
  page_indices: jax.Array,
  *,
  layer: jax.Array | int | None = None,
  sm_scale: float | None = None,
  sliding_window: int | None = None,
  block_q: int = BLOCK_Q,
  pages_per_block: int = PAGES_PER_BLOCK,
  interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
  """Causal attention of a chunk of each sequence's tokens to its cached KV, the chunk's own
  keys included (written to the pool before the call): a chunk after a cached prefix, or a
  prefix-cache hit. Each block of `block_q` queries (fewer where heads x queries would pass
  ROWS) fetches its row's live KV blocks once, for all heads.

  Args:
    q: [B, T, H, D]; query t of sequence b sits at position starts[b] + t.
    k_pages, v_pages, layer, page_indices, sm_scale, sliding_window, pages_per_block,
      interpret: as for `ragged_paged_attention`.
    starts: [B] int32, the position of each sequence's first query.
    kv_lens: [B] int32, tokens in each sequence's cache (the chunk included): queries at
      kv_lens[b] or past it are padding.

  Returns:
    [B, T, H, D] in q's dtype; zeros for padding queries.
  """
  _validate(q, k_pages, v_pages, kv_lens, page_indices, layer is not None, prefill=True)
  B, T = q.shape[:2]
  if starts.shape != (B,) or starts.dtype != jnp.int32:
    raise ValueError(f"starts: expected int32 [{B}], got {starts.dtype} {starts.shape}")
  # At most ROWS query rows (heads x queries) a block: their float32 accumulators stay in VMEM.
  Tq = min(block_q, T, max(8, ROWS // q.shape[2]))
  padded = -(-T // Tq) * Tq
  q = jnp.pad(q, ((0, 0), (0, padded - T), (0, 0), (0, 0)))
  out = _paged_call(
    q, k_pages, v_pages, starts, kv_lens, page_indices, layer, block_q=Tq, sm_scale=sm_scale,
    sliding_window=sliding_window, pages_per_block=pages_per_block, interpret=interpret,
  )  # fmt: skip
  return out[:, :T]
