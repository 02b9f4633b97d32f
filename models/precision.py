"""bfloat16 kept as its uint16 bits, where XLA:CPU would otherwise copy whole arrays.

XLA:CPU moves bfloat16 data (dynamic-slice, dynamic-update-slice, scatter) by converting the
whole operand to float32 and back. Two arrays meet those ops on every step: the stacked layer
weights, which the layer scan slices one layer at a time (XLA then hoists a float32 copy of
every weight out of the loop and runs the matmuls in float32), and the KV pool, which each
step updates in place (writing one token into a bfloat16 pool copies the pool twice). Stored
as uint16, both move as plain 16-bit data, and a bitcast back to bfloat16 at the point of use
is a no-op fused into the consumer. Elsewhere (TPU, GPU) bfloat16 is stored as bfloat16.

The choice is made once, when a model or a pool is created, from the platform it lives on:
model code never checks a platform, it only reads values through `values`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BITS = jnp.dtype(jnp.uint16)  # the storage of bfloat16 values kept as bits


def default_dtype(platform: str) -> jnp.dtype:
  """The dtype a model gets when none is asked for. On TPU and GPU, bfloat16: the MXU and tensor
  cores run it at full rate, and it halves the bytes of every decode step (a Llama-3-8B fits one
  16 GB chip only so). On CPU, float32: the reference precision, which gives the golden greedy
  tokens exactly; bfloat16 is 1.5-1.8x faster there and a flag away (README: Benchmarks)."""
  return jnp.dtype(jnp.float32 if platform == "cpu" else jnp.bfloat16)


def storage_dtype(dtype, platform: str) -> jnp.dtype:
  """How arrays of `dtype` values are stored on `platform`: bfloat16 as bits on CPU."""
  dtype = jnp.dtype(dtype)
  return BITS if platform == "cpu" and dtype == jnp.bfloat16 else dtype


def value_dtype(storage) -> jnp.dtype:
  """The dtype of the values an array of `storage` dtype holds."""
  return jnp.dtype(jnp.bfloat16) if jnp.dtype(storage) == BITS else jnp.dtype(storage)


def stored(x: jax.Array, storage) -> jax.Array:
  """Values `x` as an array of `storage` dtype (cast to the values' dtype first)."""
  x = x.astype(value_dtype(storage))
  return jax.lax.bitcast_convert_type(x, BITS) if jnp.dtype(storage) == BITS else x


def values(x: jax.Array) -> jax.Array:
  """The values a stored array holds: bits read back as bfloat16, anything else as it is."""
  return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == BITS else x
