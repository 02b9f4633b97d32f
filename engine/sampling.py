"""Per-request sampling parameters and the batched, jitted sampler.

Every row of a batch carries its own temperature, top-k, top-p and PRNG key, so one compiled
sampler serves any mix of requests. A request's key is derived from its seed and the index of
the token being sampled, never from its batch slot: the same seed and prompt give the same
output whatever else shares the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, slots=True)
class SamplingParams:
  """How to pick tokens for one request. temperature 0 means greedy."""

  max_tokens: int = 64
  temperature: float = 0.0
  top_k: int = 0  # 0 = no limit
  top_p: float = 1.0
  seed: int | None = None  # None: a fresh random seed per request
  stop: tuple[str, ...] = ()
  ignore_eos: bool = False

  def __post_init__(self):
    if isinstance(self.stop, str):
      object.__setattr__(self, "stop", (self.stop,))
    else:
      object.__setattr__(self, "stop", tuple(self.stop))
    if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
      raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
    if not self.temperature >= 0.0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"top_k must be a non-negative integer, got {self.top_k!r}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
    if any(not s for s in self.stop):
      raise ValueError("stop: stop strings must be non-empty")


@dataclasses.dataclass(frozen=True)
class SamplingBatch:
  """SamplingParams of a batch as arrays, one row per slot (host side, numpy)."""

  temperature: np.ndarray  # [B] float32
  top_k: np.ndarray  # [B] int32, 0 = off
  top_p: np.ndarray  # [B] float32
  seed: np.ndarray  # [B] uint32

  @classmethod
  def build(cls, params: Sequence[SamplingParams], seeds: Sequence[int], batch: int):
    pad = batch - len(params)
    return cls(
      temperature=np.array([p.temperature for p in params] + [0.0] * pad, np.float32),
      top_k=np.array([p.top_k for p in params] + [0] * pad, np.int32),
      top_p=np.array([p.top_p for p in params] + [1.0] * pad, np.float32),
      seed=np.array(list(seeds) + [0] * pad, np.uint32),
    )


jax.tree_util.register_dataclass(
  SamplingBatch, data_fields=["temperature", "top_k", "top_p", "seed"], meta_fields=[]
)


def sample(
  logits: jax.Array,  # [B, V] float32
  params: SamplingBatch,
  step: jax.Array,  # [B] int32: index of the token being sampled within its request
) -> jax.Array:
  """Next token ids [B] int32. Traced inside the model step, so sampling costs no host sync.

  The batch takes the cheapest branch that serves all its rows: argmax only; a draw from the
  full distribution; or the sort that top-k / top-p need (costly on CPU: ~10 ms a row).
  """
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.maximum(params.temperature, 1e-6)[:, None]
  sampled = params.temperature > 0.0
  filtered = sampled & ((params.top_k > 0) | (params.top_p < 1.0))
  branch = jnp.where(jnp.any(filtered), 2, jnp.where(jnp.any(sampled), 1, 0))
  masked = jax.lax.switch(
    branch,
    [lambda x: x, lambda x: x, lambda x: _top_k_top_p(x, params.top_k, params.top_p)],
    scaled,
  )

  def draw(seed, index, row):
    key = jax.random.fold_in(jax.random.key(seed), index)
    return jax.random.categorical(key, row)

  drawn = jax.lax.cond(
    branch > 0,
    lambda: jax.vmap(draw)(params.seed, step, masked).astype(jnp.int32),
    lambda: greedy,
  )
  return jnp.where(sampled, drawn, greedy)


def _top_k_top_p(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """scaled [B, V] with every token outside the row's top-k and top-p set to -inf."""
  V = scaled.shape[-1]
  sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]  # [B, V] descending
  keep = jnp.arange(V)[None, :] < jnp.where(top_k > 0, top_k, V)[:, None]
  probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
  # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
  keep &= (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]
  threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(scaled >= threshold, scaled, -jnp.inf)
