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
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from engine.config import EngineConfig, bucket
from engine.kv_manager import PageAllocator
from engine.sampling import MAX_LOGPROBS, Sampled, SamplingBatch, sample
from engine.scheduler import Chunk, Schedule
from models import KVCache, Model
from sharding import batch_sharding, kv_cache_sharding, put

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StepShardings:
  """Where a sharded model's step keeps its results: the KV pool stays split as it came in,
  and what the host reads back is replicated, so every process can read all of it."""

  cache: NamedSharding
  replicated: NamedSharding


@functools.partial(jax.jit, static_argnums=(0, 9, 10), donate_argnames="cache")
def model_step(
  graphdef, state, cache, tokens, positions, page_table, logits_at, sampling, step, num_top,
  shardings: StepShardings | None = None,
):  # fmt: skip
  """(Sampled rows, logits at `logits_at` [B, V] float32, updated cache)."""
  model = nnx.merge(graphdef, state)
  logits, cache = model(tokens, positions, cache, page_table, logits_at=logits_at)
  sampled = sample(logits, sampling, step, num_top)
  if shardings is not None:
    sampled, logits = jax.lax.with_sharding_constraint((sampled, logits), shardings.replicated)
    cache = jax.lax.with_sharding_constraint(cache, shardings.cache)
  return sampled, logits, cache


class Runner:
  """Owns the device KV pool and runs steps on it. With a sharded model (`model.mesh`), the
  pool is split by the layout's rules and each step's rows are placed over `data`."""

  def __init__(self, model: Model, config: EngineConfig):
    self.model, self.config = model, config
    cfg = model.config
    self.shardings = None
    if model.mesh is None:
      self.cache = KVCache.zeros(cfg, config.num_pages, config.page_size)
    else:
      shape = (cfg.num_layers, config.num_pages, config.page_size, cfg.num_kv_heads, cfg.head_dim)
      self.shardings = StepShardings(
        cache=kv_cache_sharding(shape, model.layout, model.mesh),
        replicated=NamedSharding(model.mesh, PartitionSpec()),
      )
      zeros = functools.partial(KVCache.zeros, cfg, config.num_pages, config.page_size)
      self.cache = jax.jit(zeros, out_shardings=self.shardings.cache)()  # built in place
    self.compiled: set[tuple] = set()  # shapes seen: (B, T, P, history width, num_top)
    self.last_shapes: tuple[tuple[int, ...], ...] = ()  # dispatched by the last execute

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
    """One device call, fetched at once: Sampled as numpy (and the logits [B, V] if asked).

    Low level: it writes the pages in `page_table` without asking the engine's allocator, so
    use it on a runner of your own, never on one an Engine is using."""
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
      # Longest first: decode attention walks groups of rows only as far as they reach.
      decodes = sorted(schedule.decodes, key=lambda c: -c.start)
      calls.append((decodes, self._inputs(decodes, allocator, prefill=False)))
    dispatched = [self._dispatch(*inputs)[0] for _, inputs in calls]
    self.last_shapes = tuple(self._key(*inputs) for _, inputs in calls)
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

  @staticmethod
  def _key(tokens, positions, page_table, logits_at, sampling, sample_index, num_top):
    return (*tokens.shape, page_table.shape[1], sampling.history.shape[1], num_top)

  def _dispatch(self, tokens, positions, page_table, logits_at, sampling, sample_index, num_top):
    key = self._key(tokens, positions, page_table, logits_at, sampling, sample_index, num_top)
    first = key not in self.compiled
    start = time.perf_counter()
    inputs = (tokens, positions, page_table, logits_at, sampling, sample_index)
    if self.model.mesh is not None:
      # Each row goes to its `data` replica; every process passes the same host arrays.
      rows = batch_sharding(tokens.shape[0], self.model.layout, self.model.mesh)
      inputs = jax.tree.map(lambda x: put(x, rows), inputs)
    # Unsharded, the host arrays go to the jitted call as they are: its C++ dispatch copies them
    # in ~0.5 ms a step, against ~1.9 ms for converting the 16 arrays one by one first.
    sampled, logits, self.cache = model_step(
      self.model.graphdef, self.model.state, self.cache, *inputs, num_top, self.shardings
    )
    if first:
      jax.block_until_ready(sampled)
      self.compiled.add(key)
      log.info(
        "compiled step B=%d T=%d P=%d history=%d top=%d in %.1fs",
        *key, time.perf_counter() - start,
      )  # fmt: skip
    return sampled, logits
