"""The runner: the only code that calls jitted device functions.

One jitted `model_step` serves prefill chunks ([R, T] tokens) and decode ([B, 1]): it writes
the new tokens' K/V into the donated page pool, computes logits at one token per row and
samples from them on device. `Runner.execute` runs a scheduled step as at most two calls, the
prefill chunks and the decode batch, and fetches both results in one device->host transfer.
Shapes come from a small bucket set; each new shape is compiled once and logged.
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

from engine.kv_manager import PageAllocator
from engine.sampling import MAX_LOGPROBS, Sampled, SamplingBatch, sample
from engine.scheduler import Chunk, Schedule
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
  """Memory, batching and shape budget of the engine."""

  page_size: int = 16  # tokens per KV page
  num_pages: int = 1024  # pages in the pool, shared by all running requests (page 0 reserved)
  max_model_len: int = 2048  # prompt + generated tokens of one request
  max_batch: int = 32  # requests running at once
  max_num_batched_tokens: int = 512  # token budget of one step (prefill chunks + decodes)
  max_prefill_seqs: int = 8  # prefill chunks in one step
  min_prefill: int = 16  # smallest prefill bucket
  prefix_caching: bool = True

  def __post_init__(self):
    for name in (
      "page_size", "num_pages", "max_model_len", "max_batch", "max_num_batched_tokens",
      "max_prefill_seqs", "min_prefill",
    ):  # fmt: skip
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.max_model_len % self.page_size:
      raise ValueError("max_model_len must be a multiple of page_size")
    if self.num_pages - 1 < self.max_model_len // self.page_size:
      raise ValueError(
        f"num_pages: {self.num_pages} pages (one reserved) cannot hold one request of "
        f"max_model_len {self.max_model_len} tokens"
      )

  @property
  def batch_buckets(self) -> tuple[int, ...]:
    return _powers_of_two(1, self.max_batch)

  @property
  def prefill_buckets(self) -> tuple[int, ...]:  # tokens per prefill chunk
    longest = min(self.max_num_batched_tokens, self.max_model_len)
    return _powers_of_two(min(self.min_prefill, longest), longest)

  @property
  def prefill_row_buckets(self) -> tuple[int, ...]:
    return _powers_of_two(1, self.max_prefill_seqs)

  @property
  def page_buckets(self) -> tuple[int, ...]:  # pages per sequence
    return _powers_of_two(1, self.max_model_len // self.page_size)


def bucket(n: int, buckets: tuple[int, ...]) -> int:
  for b in buckets:
    if n <= b:
      return b
  raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


@functools.partial(jax.jit, static_argnums=(0, 9), donate_argnames="cache")
def model_step(
  graphdef, state, cache, tokens, positions, page_table, logits_at, sampling, step, num_top
):
  """(Sampled rows, logits at `logits_at` [B, V] float32, updated cache)."""
  model = nnx.merge(graphdef, state)
  logits, cache = model(tokens, positions, cache, page_table, logits_at=logits_at)
  return sample(logits, sampling, step, num_top), logits, cache


class Runner:
  """Owns the device KV pool and runs steps on it."""

  def __init__(self, model: Model, config: EngineConfig):
    self.model, self.config = model, config
    self.cache = KVCache.zeros(model.config, config.num_pages, config.page_size)
    self.compiled: set[tuple] = set()  # shapes seen: (B, T, P, history width, num_top)

  def step(
    self,
    tokens: np.ndarray,  # [B, T] int32
    positions: np.ndarray,  # [B, T] int32, -1 = padding
    page_table: np.ndarray,  # [B, P] int32
    logits_at: np.ndarray,  # [B] int32
    sampling: SamplingBatch,
    sample_index: np.ndarray,  # [B] int32
    *,
    num_top: int = 0,
    return_logits: bool = False,
  ):
    """One device call, fetched at once: Sampled as numpy (and the logits [B, V] if asked)."""
    sampled, logits = self._dispatch(
      tokens, positions, page_table, logits_at, sampling, sample_index, num_top
    )
    return jax.device_get((sampled, logits)) if return_logits else jax.device_get(sampled)

  def execute(self, schedule: Schedule, allocator: PageAllocator) -> list[tuple[Chunk, Sampled]]:
    """Runs a scheduled step; returns each completing chunk with its sampled row (numpy)."""
    calls = []
    if schedule.prefills:
      calls.append((schedule.prefills, self._inputs(schedule.prefills, allocator, prefill=True)))
    if schedule.decodes:
      calls.append((schedule.decodes, self._inputs(schedule.decodes, allocator, prefill=False)))
    dispatched = [self._dispatch(*inputs)[0] for _, inputs in calls]
    results = []
    for (chunks, _), sampled in zip(calls, jax.device_get(dispatched), strict=True):
      for i, chunk in enumerate(chunks):
        if chunk.completes:
          row = Sampled(
            sampled.tokens[i], sampled.logprob[i], sampled.top_ids[i], sampled.top_logprobs[i]
          )
          results.append((chunk, row))
    return results

  def _inputs(self, chunks: list[Chunk], allocator: PageAllocator, *, prefill: bool):
    cfg = self.config
    B = bucket(len(chunks), cfg.prefill_row_buckets if prefill else cfg.batch_buckets)
    T = bucket(max(c.length for c in chunks), cfg.prefill_buckets) if prefill else 1
    tables = [allocator.table(c.request.request_id) for c in chunks]
    P = bucket(max(len(t) for t in tables), cfg.page_buckets)
    tokens = np.zeros((B, T), np.int32)
    positions = np.full((B, T), -1, np.int32)
    page_table = np.zeros((B, P), np.int32)  # unused entries point at the sink page
    logits_at = np.zeros(B, np.int32)
    sample_index = np.zeros(B, np.int32)
    for i, (c, table) in enumerate(zip(chunks, tables, strict=True)):
      tokens[i, : c.length] = c.request.token_ids[c.start : c.start + c.length]
      positions[i, : c.length] = np.arange(c.start, c.start + c.length)
      page_table[i, : len(table)] = table
      logits_at[i] = c.length - 1
      sample_index[i] = c.request.num_output
    sampling_rows = [c for c in chunks if c.completes]
    requests = [c.request for c in chunks]
    penalized = any(c.request.params.penalized for c in sampling_rows)
    sampling = SamplingBatch.build(
      [r.params for r in requests],
      [r.seed for r in requests],
      B,
      histories=[r.token_ids for r in requests],
      prompt_lens=[r.prompt_len for r in requests],
      history_width=cfg.max_model_len if penalized else 1,
    )
    wants_top = any(c.request.params.logprobs for c in sampling_rows)
    num_top = MAX_LOGPROBS if wants_top else 0
    return tokens, positions, page_table, logits_at, sampling, sample_index, num_top

  def _dispatch(self, tokens, positions, page_table, logits_at, sampling, sample_index, num_top):
    key = (*tokens.shape, page_table.shape[1], sampling.history.shape[1], num_top)
    first = key not in self.compiled
    start = time.perf_counter()
    sampled, logits, self.cache = model_step(
      self.model.graphdef, self.model.state, self.cache,
      jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(page_table),
      jnp.asarray(logits_at), sampling, jnp.asarray(sample_index), num_top,
    )  # fmt: skip
    if first:
      jax.block_until_ready(sampled)
      self.compiled.add(key)
      log.info(
        "compiled step B=%d T=%d P=%d history=%d top=%d in %.1fs",
        *key, time.perf_counter() - start,
      )  # fmt: skip
    return sampled, logits
