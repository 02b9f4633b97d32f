"""The compiled CPU decode kernel against the XLA page walk; its fallback when it cannot build."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshserve.models import cpu_kernels
from meshserve.models.attention import AttentionBackend, KVCache, xla_paged_decode_attention

# Without a compiler the kernel cannot exist and the model keeps XLA (tested below). With one,
# the kernel must build: a build failure fails these tests instead of skipping them.
needs_kernel = pytest.mark.skipif(
  cpu_kernels.compiler() is None, reason="no C++ compiler on PATH or in $CXX to build the kernel"
)


def random_case(rng, *, B, H, K, D, Z, P, lengths, layers=2, pages=None):
  """Rows with `lengths` tokens each (0 = padding row) in shuffled pages of a random pool."""
  N = pages or B * P + 1
  k, v = (rng.standard_normal((layers, N, Z, K, D)).astype(np.float32) for _ in range(2))
  order = rng.permutation(np.arange(1, N))
  table = np.zeros((B, P), np.int32)
  for b in range(B):
    table[b] = order[b * P : (b + 1) * P]
  q = rng.standard_normal((B, 1, H, D)).astype(np.float32)
  positions = (np.asarray(lengths, np.int32) - 1)[:, None]  # the newest token's position
  cache = KVCache(jnp.asarray(k), jnp.asarray(v))
  return jnp.asarray(q), cache, jnp.asarray(positions), jnp.asarray(table)


@needs_kernel
@pytest.mark.parametrize(
  "H, K, D, Z",
  [
    (9, 3, 64, 16),  # SmolLM2: a specialized (D, G)
    (8, 8, 128, 32),  # G = 1
    (6, 1, 64, 16),  # G = 6: run-time group size
    (4, 2, 48, 16),  # run-time head dim
  ],
)
def test_native_decode_matches_the_xla_page_walk(H, K, D, Z):
  rng = np.random.default_rng(H * D + Z)
  P = 6
  lengths = [P * Z, 1, 0, Z, Z + 1, 3 * Z - 1, 2, 0]  # full, one token, padding, page edges
  q, cache, positions, table = random_case(rng, B=8, H=H, K=K, D=D, Z=Z, P=P, lengths=lengths)
  for layer in (0, 1):
    got = jax.jit(cpu_kernels.paged_decode_attention)(q, cache.k, cache.v, layer, positions, table)
    want = xla_paged_decode_attention(q, cache, layer, positions, table, groups=1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert not np.asarray(got)[[2, 7]].any()  # padding rows are zeros


@needs_kernel
def test_a_row_does_not_depend_on_the_rest_of_the_batch():
  """Threads split the rows; each row's bits must not depend on which rows share its call."""
  rng = np.random.default_rng(0)
  lengths = [90, 17, 64, 33, 5, 80, 48, 1, 77, 20, 64, 12]
  q, cache, positions, table = random_case(rng, B=12, H=9, K=3, D=64, Z=16, P=6, lengths=lengths)
  decode = jax.jit(cpu_kernels.paged_decode_attention)
  batch = np.asarray(decode(q, cache.k, cache.v, 0, positions, table))
  for b in (0, 5, 11):
    alone = decode(q[b : b + 1], cache.k, cache.v, 0, positions[b : b + 1], table[b : b + 1])
    np.testing.assert_array_equal(np.asarray(alone)[0], batch[b])


def test_without_a_compiler_the_model_keeps_xla(monkeypatch, tmp_path):
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  monkeypatch.setenv("MESHSERVE_CACHE", str(tmp_path))
  with pytest.raises(cpu_kernels.BuildError):
    cpu_kernels.build()
  cpu_kernels.available.cache_clear()
  try:
    assert not cpu_kernels.available()
    assert AttentionBackend.default_for("cpu").kind == "xla"
  finally:
    cpu_kernels.available.cache_clear()  # the next caller builds (or finds) the real one


@needs_kernel
def test_native_decode_reads_a_bfloat16_pool_kept_as_bits():
  """The pool a bfloat16 model gets on CPU (models.precision): the kernel widens each key and
  value, so it matches the XLA walk over the same values in float32."""
  from meshserve.models import precision

  rng = np.random.default_rng(7)
  lengths = [96, 1, 0, 17, 33, 64]
  q, cache, positions, table = random_case(rng, B=6, H=9, K=3, D=64, Z=16, P=6, lengths=lengths)
  bits = KVCache(*(precision.stored(x, precision.BITS) for x in (cache.k, cache.v)))
  rounded = KVCache(*(precision.values(x).astype(jnp.float32) for x in (bits.k, bits.v)))
  got = jax.jit(cpu_kernels.paged_decode_attention)(q, bits.k, bits.v, 1, positions, table)
  want = xla_paged_decode_attention(q, rounded, 1, positions, table, groups=1)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # The XLA walk reads the bits too (the native backend's fallback).
  walked = xla_paged_decode_attention(q, bits, 1, positions, table, groups=1)
  np.testing.assert_allclose(np.asarray(walked), np.asarray(want), rtol=1e-5, atol=1e-5)
