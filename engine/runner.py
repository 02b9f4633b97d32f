"""The runner: the only code that calls jitted device functions.

One jitted `step` serves prefill (T = a prefill bucket) and decode (T = 1): it writes the new
tokens' K/V into the donated page pool, computes logits at one token per row and samples from
them on device, so a step returns [B] token ids in a single device->host transfer. Shapes come
from a small bucket set; each new bucket is compiled once and logged.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engine.sampling import SamplingBatch, sample
from models import KVCache, Model

log = logging.getLogger(__name__)


def _powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
  out, b = [], lo
  while b < hi:
    out.append(b)
    b *= 2
  return (*out, hi)


@dataclasses.dataclass(frozen=True, slots=True)
class EngineConfig:
  """Memory and shape budget of the engine."""

  page_size: int = 16  # tokens per KV page
  num_pages: int = 1024  # pages in the pool, shared by all running requests
  max_model_len: int = 2048  # prompt + generated tokens of one request
  max_batch: int = 32  # sequences decoded together
  min_prefill: int = 16  # smallest prefill bucket

  def __post_init__(self):
    for name in ("page_size", "num_pages", "max_model_len", "max_batch", "min_prefill"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.max_model_len % self.page_size:
      raise ValueError("max_model_len must be a multiple of page_size")

  @property
  def batch_buckets(self) -> tuple[int, ...]:
    return _powers_of_two(1, self.max_batch)

  @property
  def prefill_buckets(self) -> tuple[int, ...]:
    return _powers_of_two(min(self.min_prefill, self.max_model_len), self.max_model_len)

  @property
  def page_buckets(self) -> tuple[int, ...]:  # pages per sequence
    return _powers_of_two(1, self.max_model_len // self.page_size)


def bucket(n: int, buckets: tuple[int, ...]) -> int:
  for b in buckets:
    if n <= b:
      return b
  raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


@functools.partial(jax.jit, static_argnums=0, donate_argnames="cache")
def model_step(graphdef, state, cache, tokens, positions, page_table, logits_at, sampling, step):
  """(next tokens [B] int32, logits at `logits_at` [B, V] float32, updated cache)."""
  model = nnx.merge(graphdef, state)
  logits, cache = model(tokens, positions, cache, page_table, logits_at=logits_at)
  return sample(logits, sampling, step), logits, cache


class Runner:
  """Owns the device KV pool and runs steps on it."""

  def __init__(self, model: Model, config: EngineConfig):
    self.model, self.config = model, config
    self.cache = KVCache.zeros(model.config, config.num_pages, config.page_size)
    self.compiled: set[tuple[int, int, int]] = set()  # (B, T, P) buckets seen

  def step(
    self,
    tokens: np.ndarray,  # [B, T] int32
    positions: np.ndarray,  # [B, T] int32, -1 = padding
    page_table: np.ndarray,  # [B, P] int32
    logits_at: np.ndarray,  # [B] int32
    sampling: SamplingBatch,
    sample_index: np.ndarray,  # [B] int32
    *,
    return_logits: bool = False,
  ):
    """Next token per row as numpy [B] (and the logits [B, V] when asked)."""
    key = (*tokens.shape, page_table.shape[1])
    first = key not in self.compiled
    start = time.perf_counter()
    next_tokens, logits, self.cache = model_step(
      self.model.graphdef, self.model.state, self.cache,
      jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(page_table),
      jnp.asarray(logits_at), sampling, jnp.asarray(sample_index),
    )  # fmt: skip
    next_tokens = np.asarray(next_tokens)  # the step's one device->host transfer
    if first:
      self.compiled.add(key)
      log.info("compiled step B=%d T=%d P=%d in %.1fs", *key, time.perf_counter() - start)
    return (next_tokens, np.asarray(logits)) if return_logits else next_tokens
