"""The online-softmax accumulator both kernels keep in VMEM scratch (float32).

m and l are stored lane-broadcast ([rows, 128]), the layout Mosaic keeps row statistics in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LANES = 128


def init(m_ref, l_ref, acc_ref) -> None:
  m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
  l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
  acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)


def update(m_ref, l_ref, acc_ref, scores: jax.Array, v: jax.Array, rows=slice(None)) -> None:
  """Folds one key block into `rows`: scores [R, S] float32 with -inf where masked, v [S, D]."""
  m_prev = m_ref[rows, :1]  # [R, 1]
  m_new = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row that has seen nothing yet
  alpha = jnp.exp(m_prev - m_safe)  # rescales what was accumulated so far
  probs = jnp.exp(scores - m_safe)  # [R, S]
  denom = alpha * l_ref[rows, :1] + jnp.sum(probs, axis=1, keepdims=True)
  l_ref[rows, :] = jnp.broadcast_to(denom, (denom.shape[0], LANES))
  m_ref[rows, :] = jnp.broadcast_to(m_new, (m_new.shape[0], LANES))
  # MXU operands in the values' dtype (bfloat16 in serving), accumulated in float32.
  pv = jnp.dot(probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  acc_ref[rows, :] = alpha * acc_ref[rows, :] + pv


def finalize(l_ref, acc_ref, dtype) -> jax.Array:
  """acc / l, with zeros for rows that saw no key."""
  denom = l_ref[:, :1]
  return jnp.where(denom > 0, acc_ref[...] / jnp.where(denom > 0, denom, 1.0), 0.0).astype(dtype)
