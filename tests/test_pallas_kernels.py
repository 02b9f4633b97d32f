"""Pallas kernels: references on hand-worked cases, kernels (interpret mode) against the
references over a sweep, block skipping, argument checks, and AOT compilation for real TPU
topologies through libtpu (Mosaic lowering + the TPU compiler, no TPU needed)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from meshserve.pallas_kernels import (
  BlockSizes,
  flash_attention,
  flash_attention_reference,
  paged_prefill_attention,
  paged_prefill_attention_reference,
  ragged_paged_attention,
  ragged_paged_attention_reference,
)

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def _rand(rng, shape, dtype):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)


def _close(out, ref, dtype):
  np.testing.assert_allclose(
    np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=TOL[dtype], rtol=TOL[dtype]
  )


# --- references on cases worked by hand --------------------------------------------------


def test_flash_reference_by_hand():
  q = jnp.array([[[[1.0, 0.0]], [[0.0, 2.0]]]])  # [B=1, T=2, H=1, D=2]
  k = jnp.array([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # [B=1, S=2, K=1, D=2]
  v = jnp.array([[[[1.0, 2.0]], [[3.0, 4.0]]]])
  out = flash_attention_reference(q, k, v, sm_scale=1.0)
  # Query 0 sees key 0 only; query 1 has scores (0, 2) over keys (0, 1).
  w = math.exp(2) / (1 + math.exp(2))
  expected = [[1.0, 2.0], [(1 - w) * 1 + w * 3, (1 - w) * 2 + w * 4]]
  np.testing.assert_allclose(out[0, :, 0], expected, rtol=1e-6)
  # Not causal: query 0 has scores (1, 0).
  w0 = 1 / (1 + math.e)
  out = flash_attention_reference(q, k, v, causal=False, sm_scale=1.0)
  np.testing.assert_allclose(out[0, 0, 0], [(1 - w0) * 1 + w0 * 3, (1 - w0) * 2 + w0 * 4], 1e-6)
  # A window of 1: each query sees only itself.
  out = flash_attention_reference(q, k, v, sliding_window=1, sm_scale=1.0)
  np.testing.assert_allclose(out[0, :, 0], [[1.0, 2.0], [3.0, 4.0]], rtol=1e-6)


def test_ragged_reference_by_hand():
  k_pages = jnp.zeros((3, 2, 1, 2)).at[2, 0, 0].set([1.0, 0.0]).at[1, 0, 0].set([0.0, 1.0])
  v_pages = jnp.zeros((3, 2, 1, 2)).at[2, 0, 0].set([1.0, 2.0]).at[1, 0, 0].set([3.0, 4.0])
  # Sequence 0 lives in pages (2, 1): token 0 at page 2 slot 0, token 2 at page 1 slot 0.
  page_indices = jnp.array([[2, 1], [2, 1], [2, 1]], jnp.int32)
  kv_lens = jnp.array([3, 1, 0], jnp.int32)
  q = jnp.array([[[0.0, 1.0]], [[5.0, 5.0]], [[1.0, 1.0]]])
  out = ragged_paged_attention_reference(q, k_pages, v_pages, kv_lens, page_indices, sm_scale=1.0)
  # Seq 0: keys (1,0), (0,0), (0,1) -> scores (0, 0, 1).
  e = math.e
  w = np.array([1, 1, e]) / (2 + e)
  np.testing.assert_allclose(out[0, 0], w @ np.array([[1, 2], [0, 0], [3, 4]]), rtol=1e-6)
  np.testing.assert_allclose(out[1, 0], [1.0, 2.0], rtol=1e-6)  # one token: its value
  np.testing.assert_array_equal(out[2], 0.0)  # empty sequence: zeros


# --- kernels against references -----------------------------------------------------------

INTERPRET = {"interpret": True, "tpu_interpret": pltpu.InterpretParams()}


@pytest.mark.parametrize("mode", INTERPRET)
@pytest.mark.parametrize(
  ("D", "H", "K", "T", "S", "window", "causal", "dtype"),
  [
    (64, 9, 3, 37, 37, None, True, jnp.float32),  # SmolLM2 heads, T not a block multiple
    (128, 8, 1, 20, 70, None, True, jnp.float32),  # MQA, a chunk after a cached prefix
    (64, 8, 8, 50, 50, 16, True, jnp.float32),  # MHA, sliding window
    (128, 24, 8, 33, 65, 24, True, jnp.bfloat16),  # GQA 3, window, prefix
    (64, 6, 2, 30, 45, None, False, jnp.float32),  # not causal
    (64, 16, 2, 64, 64, None, True, jnp.bfloat16),  # GQA 8, exact blocks
  ],
)
def test_flash_attention_matches_reference(mode, D, H, K, T, S, window, causal, dtype):
  rng = np.random.default_rng(D + H + T)
  q, k, v = (_rand(rng, (2, n, h, D), dtype) for n, h in ((T, H), (S, K), (S, K)))
  out = flash_attention(
    q, k, v, causal=causal, sliding_window=window, block_sizes=BlockSizes(16, 16),
    interpret=INTERPRET[mode],
  )  # fmt: skip
  ref = flash_attention_reference(q, k, v, causal=causal, sliding_window=window)
  assert out.shape == q.shape and out.dtype == dtype
  _close(out, ref, dtype)


@pytest.mark.parametrize(
  "mode",  # default: TPU interpret mode, which runs the DMAs and semaphores as a TPU would
  [pytest.param("interpret", marks=pytest.mark.slow), "tpu_interpret"],
)
@pytest.mark.parametrize(
  ("D", "H", "K", "Z", "window", "dtype"),
  [
    (64, 9, 3, 16, None, jnp.float32),
    (128, 8, 1, 32, None, jnp.float32),
    (64, 8, 8, 16, 20, jnp.float32),
    (128, 24, 8, 32, None, jnp.bfloat16),
    (64, 16, 2, 16, 7, jnp.bfloat16),
  ],
)
def test_ragged_paged_attention_matches_reference(mode, D, H, K, Z, window, dtype):
  rng = np.random.default_rng(D + H + Z)
  P, N = 4, 24
  kv_lens = jnp.array([0, 1, Z, P * Z, Z + 3], jnp.int32)  # empty, one, one page, full, ragged
  B = kv_lens.shape[0]
  page_indices = jnp.asarray(rng.permutation(np.arange(1, N))[: B * P].reshape(B, P), jnp.int32)
  q = _rand(rng, (B, H, D), dtype)
  k_pages, v_pages = _rand(rng, (N, Z, K, D), dtype), _rand(rng, (N, Z, K, D), dtype)
  args = (q, k_pages, v_pages, kv_lens, page_indices)
  out = ragged_paged_attention(*args, sliding_window=window, interpret=INTERPRET[mode])
  ref = ragged_paged_attention_reference(*args, sliding_window=window)
  assert out.shape == q.shape and out.dtype == dtype
  assert not np.isnan(np.asarray(out, np.float32)).any()
  np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0)
  _close(out, ref, dtype)


@pytest.mark.parametrize(
  "mode",  # default: TPU interpret mode, which runs the DMAs and semaphores as a TPU would
  [pytest.param("interpret", marks=pytest.mark.slow), "tpu_interpret"],
)
@pytest.mark.parametrize(
  ("D", "H", "K", "Z", "T", "window", "dtype"),
  [
    (64, 9, 3, 16, 20, None, jnp.float32),  # SmolLM2 heads
    (128, 8, 1, 32, 37, None, jnp.float32),  # MQA, T not a block multiple
    (64, 8, 8, 16, 24, 20, jnp.float32),  # MHA, sliding window
    (128, 24, 8, 32, 16, None, jnp.bfloat16),  # GQA 3
    (64, 16, 2, 16, 40, 7, jnp.bfloat16),  # GQA 8, a window shorter than a block
  ],
)
def test_paged_prefill_attention_matches_reference(mode, D, H, K, Z, T, window, dtype):
  """Chunks of T queries over the pool, in blocks of 16: a fresh prompt, a chunk after a
  cached prefix (not page-aligned), a short chunk padded to T, and an empty row."""
  rng = np.random.default_rng(D + H + T)
  P, N = 6, 40
  starts = jnp.array([0, Z + 3, 5, 0], jnp.int32)
  kv_lens = starts + jnp.array([T, T, 3, 0], jnp.int32)
  B = starts.shape[0]
  page_indices = jnp.asarray(rng.permutation(np.arange(1, N))[: B * P].reshape(B, P), jnp.int32)
  q = _rand(rng, (B, T, H, D), dtype)
  k_pages, v_pages = _rand(rng, (N, Z, K, D), dtype), _rand(rng, (N, Z, K, D), dtype)
  args = (q, k_pages, v_pages, starts, kv_lens, page_indices)
  out = paged_prefill_attention(
    *args, sliding_window=window, block_q=16, pages_per_block=2, interpret=INTERPRET[mode]
  )
  ref = paged_prefill_attention_reference(*args, sliding_window=window)
  assert out.shape == q.shape and out.dtype == dtype
  assert not np.isnan(np.asarray(out, np.float32)).any()
  _close(out, ref, dtype)


# --- skipped means never read: NaN in blocks that must be skipped stays out of the output ---


def test_flash_attention_skips_blocks_above_the_diagonal_and_outside_the_window():
  rng = np.random.default_rng(0)
  q, k, v = (_rand(rng, (1, 64, 2, 64), jnp.float32) for _ in range(3))
  poisoned = v.at[:, 16:].set(jnp.nan)  # query block 0 (rows 0..15) needs key block 0 only
  out = flash_attention(q, k, poisoned, block_sizes=BlockSizes(16, 16), interpret=True)
  _close(out[:, :16], flash_attention_reference(q, k, v)[:, :16], jnp.float32)
  # Window 16: rows 48..63 need keys 33..63, so key blocks 0 and 1 are never touched.
  poisoned = v.at[:, :32].set(jnp.nan)
  out = flash_attention(
    q, k, poisoned, sliding_window=16, block_sizes=BlockSizes(16, 16), interpret=True
  )
  ref = flash_attention_reference(q, k, v, sliding_window=16)
  _close(out[:, 48:], ref[:, 48:], jnp.float32)


def test_ragged_paged_attention_reads_only_used_pages():
  rng = np.random.default_rng(1)
  N, Z, K, D = 8, 16, 2, 64
  k_pages, v_pages = _rand(rng, (N, Z, K, D), jnp.float32), _rand(rng, (N, Z, K, D), jnp.float32)
  v_poisoned = v_pages.at[0].set(jnp.nan)  # page 0: listed after each sequence's last page
  page_indices = jnp.array([[3, 5, 0, 0], [0, 0, 0, 0]], jnp.int32)
  kv_lens = jnp.array([20, 0], jnp.int32)
  q = _rand(rng, (2, 4, D), jnp.float32)
  out = ragged_paged_attention(q, k_pages, v_poisoned, kv_lens, page_indices, interpret=True)
  ref = ragged_paged_attention_reference(q, k_pages, v_pages, kv_lens, page_indices)
  _close(out, ref, jnp.float32)


def test_ragged_paged_attention_reads_a_layer_of_the_whole_pool():
  """With `layer`, the kernel reads pool[layer]'s pages in place: the same output as handing it
  that layer, whatever the other layers hold."""
  rng = np.random.default_rng(2)
  L, N, Z, K, D = 3, 8, 16, 2, 64
  k_pool, v_pool = (_rand(rng, (L, N, Z, K, D), jnp.float32) for _ in range(2))
  page_indices = jnp.array([[3, 5, 0, 0], [1, 2, 4, 6]], jnp.int32)
  kv_lens = jnp.array([20, 64], jnp.int32)
  q = _rand(rng, (2, 4, D), jnp.float32)
  for layer in range(L):
    poisoned = v_pool.at[jnp.arange(L) != layer].set(jnp.nan)  # the other layers
    out = ragged_paged_attention(
      q, k_pool, poisoned, kv_lens, page_indices, layer=jnp.int32(layer), interpret=True
    )
    ref = ragged_paged_attention_reference(q, k_pool[layer], v_pool[layer], kv_lens, page_indices)
    _close(out, ref, jnp.float32)


def test_ragged_paged_attention_starts_a_sliding_window_at_its_first_block():
  """Pages wholly before a sliding window's first block are never fetched: NaN there stays out
  of the output (blocks of two pages here: the window of 20 over 128 tokens starts in the
  fourth block, tokens 96-127)."""
  rng = np.random.default_rng(3)
  N, Z, K, D, P = 10, 16, 2, 64, 8
  k_pages, v_pages = (_rand(rng, (N, Z, K, D), jnp.float32) for _ in range(2))
  table = jnp.array([[9, 8, 7, 6, 5, 4, 3, 2]], jnp.int32)
  before = jnp.array([9, 8, 7, 6, 5, 4])  # tokens 0-95
  poisoned = [x.at[before].set(jnp.nan) for x in (k_pages, v_pages)]
  lens, q = jnp.array([P * Z], jnp.int32), _rand(rng, (1, 4, D), jnp.float32)
  out = ragged_paged_attention(
    q, *poisoned, lens, table, sliding_window=20, pages_per_block=2, interpret=True
  )
  ref = ragged_paged_attention_reference(q, k_pages, v_pages, lens, table, sliding_window=20)
  _close(out, ref, jnp.float32)


# --- argument checks ------------------------------------------------------------------------


def test_flash_attention_rejects_bad_arguments():
  q, k = jnp.zeros((1, 8, 4, 64)), jnp.zeros((1, 8, 3, 64))
  with pytest.raises(ValueError, match="q: 4 query heads"):
    flash_attention(q, k, k, interpret=True)
  with pytest.raises(ValueError, match="q: expected"):
    flash_attention(q[0], k, k, interpret=True)
  with pytest.raises(ValueError, match="k, v"):
    flash_attention(q, jnp.zeros((1, 8, 2, 64)), jnp.zeros((1, 9, 2, 64)), interpret=True)
  with pytest.raises(ValueError, match="dtypes"):
    kb = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    flash_attention(q, kb, kb, interpret=True)
  with pytest.raises(ValueError, match="sliding_window"):
    flash_attention(q, jnp.zeros((1, 8, 2, 64)), jnp.zeros((1, 8, 2, 64)), sliding_window=0)
  with pytest.raises(ValueError, match="block sizes"):
    BlockSizes(block_q=10)


def test_ragged_paged_attention_rejects_bad_arguments():
  q, pages = jnp.zeros((2, 4, 64)), jnp.zeros((8, 16, 2, 64))
  lens, table = jnp.zeros((2,), jnp.int32), jnp.zeros((2, 3), jnp.int32)
  with pytest.raises(ValueError, match="kv_lens"):
    ragged_paged_attention(q, pages, pages, lens.astype(jnp.float32), table, interpret=True)
  with pytest.raises(ValueError, match="page_indices"):
    ragged_paged_attention(q, pages, pages, lens, table[:1], interpret=True)
  with pytest.raises(ValueError, match="k_pages"):
    ragged_paged_attention(q, pages, pages[..., :32], lens, table, interpret=True)
  with pytest.raises(ValueError, match="q: 3 query heads"):
    ragged_paged_attention(q[:, :3], pages, pages, lens, table, interpret=True)


# --- AOT compilation for real TPU topologies ------------------------------------------------


@pytest.fixture(scope="module", params=["v5e:2x4", "v6e:2x4"])
def tpu_device(request):
  from jax.experimental import topologies

  topology = topologies.get_topology_desc(platform="tpu", topology_name=request.param)
  return topology.devices[0]


@pytest.fixture(scope="module")
def v5e_device():
  """The cost checks' one topology (the issue's): v6e compiles the same kernel."""
  from jax.experimental import topologies

  return topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x4").devices[0]


def _abstract(device, *shapes_dtypes):
  sharding = jax.sharding.SingleDeviceSharding(device)
  return [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes_dtypes]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_flash_attention_compiles_for_tpu(tpu_device, dtype):
  q, k, v = _abstract(tpu_device, ((1, 300, 32, 128), dtype), *[((1, 300, 8, 128), dtype)] * 2)
  compiled = flash_attention.lower(q, k, v, sliding_window=128).compile()
  assert "tpu_custom_call" in compiled.as_text()  # the Mosaic kernel, not an XLA fallback


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ragged_paged_attention_compiles_for_tpu(tpu_device, dtype):
  args = _abstract(
    tpu_device,
    ((64, 32, 128), dtype),
    ((512, 16, 8, 128), dtype),
    ((512, 16, 8, 128), dtype),
    ((64,), jnp.int32),
    ((64, 8), jnp.int32),
  )
  compiled = ragged_paged_attention.lower(*args).compile()
  assert "tpu_custom_call" in compiled.as_text()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_paged_prefill_attention_compiles_for_tpu(tpu_device, dtype):
  args = _abstract(
    tpu_device, ((4, 256, 32, 128), dtype), ((512, 16, 8, 128), dtype),
    ((512, 16, 8, 128), dtype), ((4,), jnp.int32), ((4,), jnp.int32), ((4, 64), jnp.int32),
  )  # fmt: skip
  compiled = paged_prefill_attention.lower(*args, sliding_window=512).compile()
  assert "tpu_custom_call" in compiled.as_text()


def _kernel_cost(device, B, P, N, window=None, H=4, K=1, D=128):
  """XLA's cost analysis of the decode kernel alone, compiled for `device`."""
  args = _abstract(
    device, ((B, H, D), jnp.bfloat16), ((N, 16, K, D), jnp.bfloat16),
    ((N, 16, K, D), jnp.bfloat16), ((B,), jnp.int32), ((B, P), jnp.int32),
  )  # fmt: skip
  compiled = ragged_paged_attention.lower(*args, sliding_window=window).compile()
  assert "tpu_custom_call" in compiled.as_text()
  cost = compiled.cost_analysis()
  return cost["bytes accessed"], cost["flops"]


def test_ragged_paged_attention_costs_follow_the_live_kv_not_the_page_table(v5e_device):
  """The kernel's work follows each row's live pages, so its cost estimate does not follow the
  page table's width: it reads at most the pool (sized for the live context), once. Twice the
  table at the same pool costs the same; twice the context (table and pool) costs twice; a
  window of 1024 over 8k tokens costs about an eighth (its blocks, rounded to whole ones)."""
  B, P = 64, 128  # 2048 tokens a row at page size 16
  base = _kernel_cost(v5e_device, B, P, B * P)
  wide = _kernel_cost(v5e_device, B, 2 * P, B * P)
  longer = _kernel_cost(v5e_device, B, 2 * P, 2 * B * P)
  for a, b, c in zip(base, wide, longer, strict=True):
    assert b <= 1.05 * a and 1.9 < c / a < 2.05
  full = _kernel_cost(v5e_device, B, 4 * P, 4 * B * P)
  window = _kernel_cost(v5e_device, B, 4 * P, 4 * B * P, window=1024)
  assert 0.1 < window[0] / full[0] < 0.16 and 0.1 < window[1] / full[1] < 0.16


def test_ragged_paged_attention_compiles_for_256_rows_of_32k_tokens(v5e_device):
  """The page table reaches SMEM a row at a time: 256 rows x 2048 pages (32k tokens at page
  size 16), over a pool that fits one chip, compile (the whole table in SMEM did not)."""
  _kernel_cost(v5e_device, 256, 2048, 16384)


def test_model_decode_reads_the_pool_in_place_on_tpu(tpu_device):
  """The layer loop of a decode step hands the kernel the pool it carries: the compiled TPU
  program holds no copy of a pool layer (it once held a dynamic-slice of one per layer)."""
  L, N, Z, K, D, B, H = 4, 512, 16, 8, 128, 8, 32
  pool = ((L, N, Z, K, D), jnp.bfloat16)
  q, k, v, lens, table = _abstract(
    tpu_device, ((B, H, D), jnp.bfloat16), pool, pool, ((B,), jnp.int32), ((B, 8), jnp.int32)
  )

  def decode(q, k_pool, v_pool, lens, table):
    def layer_step(x, layer):
      out = ragged_paged_attention(x, k_pool, v_pool, lens, table, layer=layer)
      return out, None

    return jax.lax.scan(layer_step, q, jnp.arange(L, dtype=jnp.int32))[0]

  hlo = jax.jit(decode).lower(q, k, v, lens, table).compile().as_text()
  assert "tpu_custom_call" in hlo
  # Slices (fused or not) whose result is a whole layer of the pool, in any layout.
  results = (re.match(r"\s*%(\S+) = bf16\[([\d,]+)\]", line) for line in hlo.splitlines())
  copies = [
    m.group(1) for m in results
    if m and "slice" in m.group(1) and math.prod(map(int, m.group(2).split(","))) == N * Z * K * D
  ]  # fmt: skip
  assert not copies


def test_flash_cost_estimate_counts_visible_pairs():
  from meshserve.pallas_kernels.prefill import _cost

  # T = S = 4, causal: 1 + 2 + 3 + 4 visible pairs; window 2: 1 + 2 + 2 + 2.
  assert _cost(1, 1, 4, 4, 1, 16, 16, 4, True, None).flops == 4 * 10
  assert _cost(1, 1, 4, 4, 1, 16, 16, 4, True, 2).transcendentals == 7
  assert _cost(1, 1, 4, 4, 1, 16, 16, 4, False, None).flops == 4 * 16
  # A 2-query chunk after 3 cached keys sees 4 + 5 keys.
  assert _cost(2, 3, 2, 5, 8, 16, 16, 2, True, None).flops == 4 * 2 * 3 * 9 * 8
