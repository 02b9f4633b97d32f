"""Prefill flash attention: tiled, online-softmax attention that never materializes [T, S].

Grid (B, H, T/bq, S/bk): step (b, h, i, j) folds key block j into query block i of head h,
with the running max, denominator and output in float32 VMEM scratch. Key blocks that lie
wholly above the causal diagonal or before the sliding window are skipped: their BlockSpec
index is clamped to a needed block (no new DMA) and their compute is predicated off.

Letters: B batch, T query tokens, S key tokens, H query heads, K kv heads, G = H // K,
D head dim. Query i sits at absolute position S - T + i, key j at position j.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from meshserve.pallas_kernels import online_softmax
from meshserve.pallas_kernels.online_softmax import LANES


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
  """Tile sizes; multiples of 16 so float32 and bfloat16 tiles both fit Mosaic's layout."""

  block_q: int = 128
  block_k: int = 128

  def __post_init__(self):
    if self.block_q % 16 or self.block_k % 16 or self.block_q <= 0 or self.block_k <= 0:
      raise ValueError(f"block sizes must be positive multiples of 16, got {self}")

  @classmethod
  def tpu(cls) -> BlockSizes:
    return cls(block_q=128, block_k=128)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _key_block_range(i, *, bq, bk, offset, kv_len, causal, window):
  """First and last key block that query block i needs (scalars, inclusive)."""
  if not causal:
    return 0, None
  q_first = i * bq + offset  # absolute position of the block's first query
  # Padded queries past T would otherwise point past the last real key block.
  last = jnp.minimum(jax.lax.div(q_first + bq - 1, bk), (kv_len - 1) // bk)
  first = 0 if window is None else jax.lax.div(jnp.maximum(q_first - window + 1, 0), bk)
  return first, last


def _kernel(
  q_ref,  # [bq, D]
  k_ref,  # [bk, D]
  v_ref,  # [bk, D]
  o_ref,  # [bq, D]
  m_ref,  # [bq, LANES] f32 scratch
  l_ref,  # [bq, LANES] f32 scratch
  acc_ref,  # [bq, D] f32 scratch
  *,
  sm_scale: float,
  causal: bool,
  window: int | None,
  offset: int,  # S - T
  kv_len: int,  # S before padding
):
  i, j = pl.program_id(2), pl.program_id(3)
  bq, bk = q_ref.shape[0], k_ref.shape[0]

  @pl.when(j == 0)
  def _init():
    online_softmax.init(m_ref, l_ref, acc_ref)

  first, last = _key_block_range(
    i, bq=bq, bk=bk, offset=offset, kv_len=kv_len, causal=causal, window=window
  )
  needed = j * bk < kv_len
  if causal:
    needed &= (j >= first) & (j <= last)

  @pl.when(needed)
  def _attend():
    # MXU operands in the KV's dtype (bfloat16 in serving), scores in float32.
    q, k = q_ref[...].astype(k_ref.dtype), k_ref[...]
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    s = s * sm_scale
    k_pos = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    visible = k_pos < kv_len
    if causal:
      q_pos = offset + i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
      visible &= k_pos <= q_pos
      if window is not None:
        visible &= k_pos > q_pos - window
    online_softmax.update(m_ref, l_ref, acc_ref, jnp.where(visible, s, -jnp.inf), v_ref[...])

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    o_ref[...] = online_softmax.finalize(l_ref, acc_ref, o_ref.dtype)


def _cost(B, H, T, S, D, bq, bk, itemsize, causal, window) -> pl.CostEstimate:
  """What the kernel does, counted exactly from the static shapes, for XLA's scheduler and
  cost model (a custom call is otherwise opaque to it)."""
  offset = S - T
  pairs = 0  # visible (query, key) pairs of one head
  for i in range(T):
    q_pos = offset + i
    lo = 0 if not causal or window is None else max(0, q_pos - window + 1)
    pairs += (q_pos + 1 - lo) if causal else S
  key_blocks = 0  # key blocks read per head, summed over query blocks
  for i in range(-(-T // bq)):
    q_first = offset + i * bq
    last = min((q_first + bq - 1) // bk, (S - 1) // bk) if causal else (S - 1) // bk
    first = 0 if not causal or window is None else max(0, q_first - window + 1) // bk
    key_blocks += last - first + 1
  return pl.CostEstimate(
    flops=4 * B * H * pairs * D,
    transcendentals=B * H * pairs,
    bytes_accessed=itemsize * B * H * D * (2 * T + 2 * key_blocks * bk),
  )


def _validate(q, k, v, sliding_window):
  if q.ndim != 4:
    raise ValueError(f"q: expected [B, T, H, D], got shape {q.shape}")
  if k.ndim != 4 or k.shape != v.shape:
    raise ValueError(f"k, v: expected equal [B, S, K, D] shapes, got {k.shape}, {v.shape}")
  B, T, H, D = q.shape
  if k.shape[0] != B or k.shape[3] != D:
    raise ValueError(f"k: batch and head dim must match q {q.shape}, got {k.shape}")
  if H % k.shape[2]:
    raise ValueError(f"q: {H} query heads are not a multiple of {k.shape[2]} kv heads")
  if k.shape[1] < T:
    raise ValueError(f"q: {T} query tokens but only {k.shape[1]} keys")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v: dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
  if sliding_window is not None and sliding_window <= 0:
    raise ValueError(f"sliding_window: must be positive, got {sliding_window}")


@functools.partial(
  jax.jit, static_argnames=("causal", "sliding_window", "sm_scale", "block_sizes", "interpret")
)
def flash_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  causal: bool = True,
  sliding_window: int | None = None,
  sm_scale: float | None = None,
  block_sizes: BlockSizes = BlockSizes(),
  interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
  """Multi-head attention with GQA, causal by absolute position.

  Args:
    q: [B, T, H, D]. Query i sits at absolute position S - T + i, so T < S is a prefill chunk
      attending to a cached prefix plus itself.
    k, v: [B, S, K, D] with H % K == 0.
    causal: mask keys after each query's position.
    sliding_window: with causal, attend only to the newest `sliding_window` positions.
    sm_scale: softmax scale, default D ** -0.5.
    block_sizes: query and key tile sizes (shrunk to fit short inputs).
    interpret: run the kernel in interpret mode (True, or `pltpu.InterpretParams()`).

  Returns:
    [B, T, H, D] in q's dtype.
  """
  _validate(q, k, v, sliding_window)
  B, T, H, D = q.shape
  S, K = k.shape[1], k.shape[2]
  G = H // K
  sm_scale = D**-0.5 if sm_scale is None else sm_scale
  bq = min(block_sizes.block_q, _round_up(T, 16))
  bk = min(block_sizes.block_k, _round_up(S, 16))
  Tp, Sp = _round_up(T, bq), _round_up(S, bk)
  # Heads-major layout so each tile's two minor dims are (tokens, D). Padded queries are cut
  # off the output; padded keys sit at positions >= S, which the kernel masks.
  qt = jnp.pad(q.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Tp - T), (0, 0)))
  kt = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
  vt = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
  block_range = functools.partial(
    _key_block_range, bq=bq, bk=bk, offset=S - T, kv_len=S, causal=causal, window=sliding_window
  )

  def kv_map(b, h, i, j):
    first, last = block_range(i)
    if causal:  # skipped blocks repeat a needed block's index: no DMA for them
      j = jnp.minimum(jnp.maximum(j, first), last)
    return b, jax.lax.div(h, G), j, 0

  kernel = functools.partial(
    _kernel, sm_scale=sm_scale, causal=causal, window=sliding_window, offset=S - T, kv_len=S
  )
  out = pl.pallas_call(
    kernel,
    grid=(B, H, Tp // bq, Sp // bk),
    in_specs=[
      pl.BlockSpec((None, None, bq, D), lambda b, h, i, j: (b, h, i, 0)),
      pl.BlockSpec((None, None, bk, D), kv_map),
      pl.BlockSpec((None, None, bk, D), kv_map),
    ],
    out_specs=pl.BlockSpec((None, None, bq, D), lambda b, h, i, j: (b, h, i, 0)),
    scratch_shapes=[
      pltpu.VMEM((bq, LANES), jnp.float32),
      pltpu.VMEM((bq, LANES), jnp.float32),
      pltpu.VMEM((bq, D), jnp.float32),
    ],
    out_shape=jax.ShapeDtypeStruct((B, H, Tp, D), q.dtype),
    cost_estimate=_cost(B, H, T, S, D, bq, bk, q.dtype.itemsize, causal, sliding_window),
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
    ),
    interpret=interpret,
  )(qt, kt, vt)
  return out[:, :, :T].transpose(0, 2, 1, 3)
