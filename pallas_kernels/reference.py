"""Plain-JAX float32 references for the Pallas kernels: the definitions the kernels must match.

Letters: B batch, T query tokens, S key tokens, H query heads, K kv heads, G = H // K,
D head dim, N pool pages, Z page size, P pages per sequence.
"""

from __future__ import annotations

import jax.numpy as jnp


def _softmax_attend(q, k, v, visible, sm_scale):
  """q [B, T, H, D], k/v [B, S, K, D], visible [B, T, S] -> [B, T, H, D] float32."""
  B, T, H, D = q.shape
  K = k.shape[2]
  qg = q.astype(jnp.float32).reshape(B, T, K, H // K, D)
  s = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32)) * sm_scale
  s = jnp.where(visible[:, None, None], s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)  # a query that sees no key gets zeros
  out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32))
  return out.reshape(B, T, H, D)


def _window_mask(q_pos, k_pos, sliding_window):
  """[.., T, S]: causal, and within the window if one is given."""
  visible = k_pos[..., None, :] <= q_pos[..., :, None]
  if sliding_window is not None:
    visible &= k_pos[..., None, :] > q_pos[..., :, None] - sliding_window
  return visible


def flash_attention_reference(q, k, v, *, causal=True, sliding_window=None, sm_scale=None):
  """q [B, T, H, D], k/v [B, S, K, D] -> [B, T, H, D] float32. Query i sits at absolute
  position S - T + i (a prefill chunk after a cached prefix); key j at position j."""
  T, S, D = q.shape[1], k.shape[1], q.shape[3]
  sm_scale = D**-0.5 if sm_scale is None else sm_scale
  q_pos = jnp.arange(T) + (S - T)
  k_pos = jnp.arange(S)
  visible = _window_mask(q_pos, k_pos, sliding_window) if causal else jnp.ones((T, S), bool)
  return _softmax_attend(q, k, v, jnp.broadcast_to(visible, (q.shape[0], T, S)), sm_scale)


def ragged_paged_attention_reference(
  q, k_pages, v_pages, kv_lens, page_indices, *, sm_scale=None, sliding_window=None
):
  """q [B, H, D] (each sequence's newest token), pages [N, Z, K, D], kv_lens [B],
  page_indices [B, P] -> [B, H, D] float32. Sequence b's tokens are the first kv_lens[b]
  slots of its pages, the newest token last; a sequence of length 0 gets zeros."""
  starts = jnp.maximum(kv_lens - 1, 0)  # the newest token's position
  return paged_prefill_attention_reference(
    q[:, None], k_pages, v_pages, starts, kv_lens, page_indices, sm_scale=sm_scale,
    sliding_window=sliding_window,
  )[:, 0]  # fmt: skip


def paged_prefill_attention_reference(
  q, k_pages, v_pages, starts, kv_lens, page_indices, *, sm_scale=None, sliding_window=None
):
  """q [B, T, H, D] (query t of sequence b at position starts[b] + t), pages [N, Z, K, D],
  starts and kv_lens [B], page_indices [B, P] -> [B, T, H, D] float32. Causal over each
  sequence's first kv_lens[b] tokens; a query at kv_lens[b] or past it is padding (zeros)."""
  B, T, H, D = q.shape
  N, Z, K, _ = k_pages.shape
  P = page_indices.shape[1]
  sm_scale = D**-0.5 if sm_scale is None else sm_scale
  k = k_pages[page_indices].reshape(B, P * Z, K, D)
  v = v_pages[page_indices].reshape(B, P * Z, K, D)
  k_pos = jnp.arange(P * Z)[None, :]  # [1, S]
  q_pos = starts[:, None] + jnp.arange(T)[None, :]  # [B, T]
  visible = _window_mask(q_pos, k_pos, sliding_window) & (k_pos < kv_lens[:, None])[:, None]
  visible &= (q_pos < kv_lens[:, None])[:, :, None]
  return _softmax_attend(q, k, v, visible, sm_scale)
