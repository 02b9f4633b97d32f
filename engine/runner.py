"""The runner: the only code that calls jitted device functions.

One jitted `model_step` serves prefill chunks ([R, T] tokens) and decode ([B, 1]): it writes
the new tokens' K/V into the donated page pool, and the tokens themselves beside it (the
pool's `page_tokens`, which the penalties read back: no history crosses from the host), then
computes logits at one token per row and samples from them on device. `Runner.execute` runs
a scheduled step as at most two calls, the prefill chunks and the decode batch, and fetches
both results in one device->host transfer.

A step's compiled shape is (B, T, P) from the config's buckets (`EngineConfig.step_shapes`);
sampling parameters are data, never shape. `Runner.warmup` compiles every shape ahead of time
(through the persistent compilation cache when it is on), so serving never compiles; a shape
met for the first time anyway is compiled then, logged and counted in `num_compiles`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from meshserve.engine import structured
from meshserve.engine.config import EngineConfig, bucket
from meshserve.engine.handoff import PackedKV
from meshserve.engine.sampling import Sampled, SamplingBatch, SamplingParams, sample
from meshserve.engine.scheduler import Chunk, Schedule
from meshserve.models import KVCache, Model, precision
from meshserve.sharding import batch_sharding, kv_cache_sharding, put

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StepShardings:
  """Where a sharded model's step keeps its results: the KV pool stays split as it came in,
  and the sampled rows the host reads back are replicated, so every process can read them.

  replicas > 1: the pool's pages are split over `replica_axis`, one slice per replica, and
  the step runs as `replicas` independent models (a shard_map over that axis; the others stay
  XLA's to partition): each replica's rows read and write only its own slice, with page
  numbers local to it, so no KV ever crosses between replicas."""

  cache: NamedSharding
  replicated: NamedSharding
  replicas: int = 1
  replica_axis: str | None = None  # the mesh axis the rules give `batch` (and `pages`)

  @property
  def page_tokens(self) -> NamedSharding:
    """The pool's token ids [N, Z], split over pages as the pool is."""
    return NamedSharding(self.cache.mesh, PartitionSpec(self.cache.spec[1], None))


@functools.partial(jax.jit, static_argnums=(0, 10), donate_argnames=("cache", "page_tokens"))
def model_step(
  graphdef, state, cache, page_tokens, tokens, positions, page_table, logits_at, sampling, step,
  shardings: StepShardings | None = None,
):  # fmt: skip
  """(Sampled rows, logits at `logits_at` [B, V] float32, updated cache and page_tokens)."""

  def run(state, cache, page_tokens, tokens, positions, page_table, logits_at, sampling, step):
    model = nnx.merge(graphdef, state)
    logits, cache = model(tokens, positions, cache, page_table, logits_at=logits_at)
    page_tokens, history = record_tokens(page_tokens, tokens, positions, page_table, logits_at)
    return sample(logits, sampling, step, history), logits, cache, page_tokens

  if shardings is not None and shardings.replicas > 1:
    axis = shardings.replica_axis
    rows, pages = PartitionSpec(axis), PartitionSpec(None, axis)
    run = jax.shard_map(
      run,
      in_specs=(PartitionSpec(), pages, rows, rows, rows, rows, rows, rows, rows),
      out_specs=(rows, rows, pages, rows),
      axis_names={axis},
      check_vma=False,
    )
  sampled, logits, cache, page_tokens = run(
    state, cache, page_tokens, tokens, positions, page_table, logits_at, sampling, step
  )
  if shardings is not None:
    # The sampled rows are small and every process reads them; the logits [B, V] stay where
    # their rows are (gathering them would cost a step an all-gather of B x V floats).
    sampled = jax.lax.with_sharding_constraint(sampled, shardings.replicated)
    cache = jax.lax.with_sharding_constraint(cache, shardings.cache)
    page_tokens = jax.lax.with_sharding_constraint(page_tokens, shardings.page_tokens)
  return sampled, logits, cache, page_tokens


def record_tokens(page_tokens, tokens, positions, page_table, logits_at):
  """Writes each row's tokens into `page_tokens` [N, Z] where their K/V went (padding, at
  position -1, is dropped), and reads back each row's history [B, P * Z]: its tokens at
  every position up to the one it samples after (`logits_at`), -1 beyond. A prefix-cache hit's
  pages hold their tokens already; a preempted request's recompute writes them again."""
  N, Z = page_tokens.shape
  B, P = page_table.shape
  at = jnp.maximum(positions, 0)
  pages = jnp.where(positions >= 0, jnp.take_along_axis(page_table, at // Z, axis=1), N)
  page_tokens = page_tokens.at[pages, at % Z].set(tokens, mode="drop")
  last = jnp.take_along_axis(positions, logits_at[:, None], axis=1)  # [B, 1]
  history = page_tokens[page_table].reshape(B, P * Z)
  return page_tokens, jnp.where(jnp.arange(P * Z)[None, :] <= last, history, -1)


@functools.partial(jax.jit, static_argnums=(2,))
def _gather_pages(cache: KVCache, pages: jax.Array, out_sharding) -> jax.Array:
  """The KV of `pages` [n], packed: [2 (k, v), L, n, Z, K, D], split as the pool is."""
  kv = jnp.stack([cache.k[:, pages], cache.v[:, pages]])
  return kv if out_sharding is None else jax.lax.with_sharding_constraint(kv, out_sharding)


@functools.partial(jax.jit, static_argnums=(3,), donate_argnums=(0,))
def _scatter_pages(cache: KVCache, kv: jax.Array, pages: jax.Array, out_sharding) -> KVCache:
  """Writes packed KV (PackedKV) into `pages` [n] of the (donated) pool."""
  cache = KVCache(k=cache.k.at[:, pages].set(kv[0]), v=cache.v.at[:, pages].set(kv[1]))
  return cache if out_sharding is None else jax.lax.with_sharding_constraint(cache, out_sharding)


@functools.partial(jax.jit, static_argnums=(3,), donate_argnums=(0,))
def _write_page_tokens(page_tokens, ids: jax.Array, pages: jax.Array, out_sharding):
  """Writes token ids [n, Z] into `pages` [n] of the (donated) page_tokens."""
  page_tokens = page_tokens.at[pages].set(ids)
  if out_sharding is None:
    return page_tokens
  return jax.lax.with_sharding_constraint(page_tokens, out_sharding)


class Runner:
  """Owns the device KV pool and runs steps on it. With a sharded model (`model.mesh`), the
  pool is split by the layout's rules and each step's rows are placed over `data`.

  `export_pages` and `import_pages` move a request's KV between two runners (the prefill and
  decode stages) as a PackedKV array [2, L, n, Z, K, D], n a page bucket: page numbers differ
  between the pools, and so may the layouts. Padding entries of the page list are page 0, the
  sink, on both sides."""

  def __init__(self, model: Model, config: EngineConfig, replicas: int = 1):
    """replicas > 1: a pool slice per `data` replica (see StepShardings); the allocator's
    tables then number pages within each replica's slice (engine.kv_manager)."""
    self.model, self.config, self.replicas = model, config, replicas
    cfg = model.config
    self.shardings = None
    storage = precision.storage_dtype(cfg.dtype, model.platform)
    tokens = functools.partial(jnp.full, (config.num_pages, config.page_size), -1, jnp.int32)
    if model.mesh is None:
      self.cache = KVCache.zeros(cfg, config.num_pages, config.page_size, storage)
      self.page_tokens = tokens()
    else:
      shape = (cfg.num_layers, config.num_pages, config.page_size, cfg.num_kv_heads, cfg.head_dim)
      cache = kv_cache_sharding(shape, model.layout, model.mesh)
      axis = model.layout.rules.batch
      if replicas > 1 and (axis is None or cache.spec[1] != axis):
        raise ValueError(f"dp={replicas} pools: the rules must split `batch` and `pages` alike")
      if replicas == 1 and cache.spec[1] is not None:
        # One pool for every row (a stage's page lists cross stages): its pages stay whole.
        cache = NamedSharding(model.mesh, PartitionSpec(cache.spec[0], None, *cache.spec[2:]))
      self.shardings = StepShardings(
        cache=cache, replicated=NamedSharding(model.mesh, PartitionSpec()), replicas=replicas,
        replica_axis=axis,
      )  # fmt: skip
      zeros = functools.partial(KVCache.zeros, cfg, config.num_pages, config.page_size, storage)
      self.cache = jax.jit(zeros, out_shardings=self.shardings.cache)()  # built in place
      self.page_tokens = jax.jit(tokens, out_shardings=self.shardings.page_tokens)()
    self.executables: dict[tuple[int, int, int], jax.stages.Compiled] = {}  # by (B, T, P)
    self.num_compiles = 0
    self.last_shapes: tuple[tuple[int, ...], ...] = ()  # dispatched by the last execute
    # Per B, a [B, ceil(V/32)] mask, all -1: the batches with no constrained row share it.
    self._unconstrained: dict[int, np.ndarray] = {}

  @functools.cached_property
  def kv_sharding(self) -> jax.sharding.Sharding:
    """Where packed KV (any number of pages) goes on this runner: split as the pool is."""
    if self.shardings is None:
      return jax.sharding.SingleDeviceSharding(self.cache.k.devices().pop())
    spec = self.shardings.cache.spec
    return NamedSharding(self.model.mesh, PartitionSpec(None, *spec))

  @property
  def packed(self) -> PackedKV:
    """The layout this pool's pages travel in between stages."""
    L, _, Z, K, D = self.cache.k.shape
    return PackedKV(num_layers=L, page_size=Z, kv_heads=K, head_dim=D)

  def kv_shape(self, num_pages: int) -> tuple[int, ...]:
    return self.packed.shape(num_pages)

  def page_list(self, pages: list[int]) -> np.ndarray:
    """`pages` padded with the sink page to their bucket (the packed array's n)."""
    out = np.zeros(bucket(len(pages), self.config.page_buckets), np.int32)
    out[: len(pages)] = pages
    return out

  def export_pages(self, pages: list[int]) -> jax.Array:
    """The KV of `pages` (in order), packed and padded to a page bucket. Dispatched, not
    waited for: the next step may donate the pool while the copy runs."""
    padded = self.page_list(pages)
    out = None if self.shardings is None else self.kv_sharding
    return _gather_pages(self.cache, self._replicated(padded), out)

  def import_pages(self, kv: jax.Array, pages: list[int], token_ids) -> None:
    """Writes packed KV (as export_pages gives it, already in `kv_sharding`) into `pages`,
    and `token_ids`, the tokens it is the KV of, beside it (what penalties read)."""
    padded = self.page_list(pages)
    if kv.shape != self.kv_shape(len(padded)):
      raise ValueError(f"kv: shape {kv.shape}, expected {self.kv_shape(len(padded))}")
    if kv.dtype != self.cache.k.dtype:  # e.g. stages loaded with different --dtype
      raise ValueError(f"kv: dtype {kv.dtype}, this pool holds {self.cache.k.dtype}")
    if len(token_ids) > len(pages) * self.config.page_size:
      raise ValueError(f"token_ids: {len(token_ids)} tokens do not fit {len(pages)} pages")
    ids = np.full((len(padded), self.config.page_size), -1, np.int32)
    ids.reshape(-1)[: len(token_ids)] = token_ids
    out = None if self.shardings is None else self.shardings.cache
    self.cache = _scatter_pages(self.cache, kv, self._replicated(padded), out)
    out = None if self.shardings is None else self.shardings.page_tokens
    self.page_tokens = _write_page_tokens(
      self.page_tokens, self._replicated(ids), self._replicated(padded), out
    )

  def warmup_transfers(self, *, export: bool, imports: bool) -> None:
    """Compiles the page mover of every page bucket, so no transfer compiles while serving."""
    for n in self.config.page_buckets:
      if export:
        self.export_pages([0] * n)
      if imports:
        kv = jax.device_put(jnp.zeros(self.kv_shape(n), self.cache.k.dtype), self.kv_sharding)
        self.import_pages(kv, [0] * n, [])
    jax.block_until_ready((self.cache, self.page_tokens))

  def _replicated(self, x: np.ndarray):
    return x if self.shardings is None else put(x, self.shardings.replicated)

  def warmup(
    self,
    shapes=None,
    *,
    threads: int | None = None,
    progress: bool = True,
    cancel: threading.Event | None = None,
  ) -> int:
    """Compiles every step shape the config can dispatch (or `shapes`) that is not compiled
    yet; returns how many. Tracing runs here, XLA compiles on `threads` worker threads. Once
    `cancel` is set, no new shape starts (the ones compiling finish)."""
    from tqdm import tqdm

    todo = [s for s in (shapes or self.step_shapes) if s not in self.executables]
    if not todo:
      return 0
    start = time.perf_counter()
    threads = threads or os.cpu_count() or 1
    bar = tqdm(total=len(todo), desc="compiling step shapes", unit="shape", disable=not progress)
    compiled = 0
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      in_flight = collections.deque()  # (shape, future): one more than the pool compiles
      for shape in todo:  # the next shape is traced while the last ones compile
        if cancel is not None and cancel.is_set():
          break
        if len(in_flight) > threads:
          done, future = in_flight.popleft()
          self.executables[done] = future.result()
        in_flight.append((shape, pool.submit(self._lower(self.dummy_inputs(shape)).compile)))
        in_flight[-1][1].add_done_callback(lambda _: bar.update())
        compiled += 1
      for done, future in in_flight:
        self.executables[done] = future.result()
    bar.close()
    self.num_compiles += compiled
    log.info(
      "compiled %d step shapes in %.1fs (%d in all)%s",
      compiled, time.perf_counter() - start, len(self.executables),
      "; cancelled" if compiled < len(todo) else "",
    )  # fmt: skip
    return compiled

  @property
  def step_shapes(self) -> tuple[tuple[int, int, int], ...]:
    """The config's step shapes this runner can dispatch: with replicas, rows split evenly."""
    return tuple(s for s in self.config.step_shapes if s[0] % self.replicas == 0)

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
    """One device call, fetched at once: Sampled as numpy (and the logits [B, V] if asked).

    Low level: it writes the pages in `page_table` without asking the engine's allocator, so
    use it on a runner of your own, never on one an Engine is using."""
    sampled, logits = self._dispatch(
      tokens, positions, page_table, logits_at, sampling, sample_index
    )
    return jax.device_get((sampled, logits)) if return_logits else jax.device_get(sampled)

  def execute(self, schedule: Schedule) -> list[tuple[Chunk, Sampled]]:
    """Runs a scheduled step (each chunk carries its page table); returns each completing
    chunk with its sampled row (numpy)."""
    calls = []
    if schedule.prefills:
      calls.append((schedule.prefills, True))
    if schedule.decodes:
      # Longest first: decode attention walks groups of rows only as far as they reach.
      calls.append((sorted(schedule.decodes, key=lambda c: -c.start), False))
    dispatched, shapes, sampling_rows = [], [], []
    for chunks, prefill in calls:
      # Each call is dispatched as soon as its inputs are ready: the device runs it while the
      # host builds the next call's (a decode call's constraint masks among them).
      inputs, rows = self._inputs(chunks, prefill=prefill)
      dispatched.append(self._dispatch(*inputs)[0])
      shapes.append((*inputs[0].shape, inputs[2].shape[1]))
      sampling_rows.append(rows)
    self.last_shapes = tuple(shapes)
    results = []
    for (chunks, _), rows, sampled in zip(
      calls, sampling_rows, jax.device_get(dispatched), strict=True
    ):
      for i, chunk in zip(rows, chunks, strict=True):
        if chunk.completes:
          row = Sampled(
            sampled.tokens[i], sampled.logprob[i], sampled.top_ids[i], sampled.top_logprobs[i]
          )
          results.append((chunk, row))
    return results

  def _pieces(self, chunk: Chunk, prefill: bool) -> list[tuple[int, int]]:
    """The (start, length) of each row `chunk` takes: one, or with segmented prefill one per
    `segment` tokens."""
    segment = self.config.segment if prefill else 0
    if not segment:
      return [(chunk.start, chunk.length)]
    end = chunk.start + chunk.length
    return [(s, min(segment, end - s)) for s in range(chunk.start, end, segment)]

  def _rows(self, pieces: list[list[tuple[int, int]]], chunks, prefill: bool):
    """The batch row of every piece, and how many rows the call needs: in order with one pool;
    with replicas, replica r's pieces fill rows from r * B / replicas on (B = replicas times
    the busiest replica's count, then bucketed)."""
    if self.replicas == 1:
      rows = itertools.count()
      return [[next(rows) for _ in p] for p in pieces], sum(map(len, pieces))
    replica = [c.replica for c in chunks]
    counts = collections.Counter()
    for r, p in zip(replica, pieces, strict=True):
      counts[r] += len(p)
    n = self.replicas * max(counts.values())
    if not prefill:
      buckets = self.config.batch_buckets
    else:
      buckets = (
        self.config.segment_row_buckets if self.config.segment else self.config.prefill_row_buckets
      )
    per_replica = bucket(n, buckets) // self.replicas
    seen = collections.Counter()
    rows = []
    for r, p in zip(replica, pieces, strict=True):
      rows.append([r * per_replica + seen[r] + i for i in range(len(p))])
      seen[r] += len(p)
    return rows, n

  def _inputs(self, chunks: list[Chunk], *, prefill: bool):
    """The host arrays of one call over `chunks`, and the row each chunk samples from (its
    last)."""
    tables = [c.pages for c in chunks]
    pieces = [self._pieces(c, prefill) for c in chunks]
    rows, n = self._rows(pieces, chunks, prefill)
    lengths, pages = [c.length for c in chunks], [len(t) for t in tables]
    B, T, P = self.config.step_shape(lengths, pages, prefill=prefill, rows=n)
    tokens = np.zeros((B, T), np.int32)
    positions = np.full((B, T), -1, np.int32)
    page_table = np.zeros((B, P), np.int32)  # unused entries point at the sink page
    logits_at = np.zeros(B, np.int32)
    sample_index = np.zeros(B, np.int32)
    requests = [None] * B  # the sampling rows in batch order; the rest get defaults
    constrained = []  # (matcher, row) of each constrained chunk whose next token is sampled
    for c, table, chunk_rows, chunk_pieces in zip(chunks, tables, rows, pieces, strict=True):
      for i, (start, length) in zip(chunk_rows, chunk_pieces, strict=True):
        tokens[i, :length] = c.request.token_ids[start : start + length]
        positions[i, :length] = np.arange(start, start + length)
        page_table[i, : len(table)] = table
      last = chunk_rows[-1]
      logits_at[last] = chunk_pieces[-1][1] - 1
      sample_index[last] = c.request.num_output
      requests[last] = c.request
      if c.completes and c.request.matcher is not None:
        constrained.append((c.request.matcher, last))
    padding = SamplingParams()
    sampling = self._sampling(
      [r.params if r else padding for r in requests],
      [r.seed if r else 0 for r in requests],
      B,
      [r.prompt_len if r else 0 for r in requests],
    )
    if constrained:  # structured output: each such row's allowed next tokens
      allowed = np.full_like(sampling.allowed, -1)
      structured.fill(allowed, constrained)
      sampling = dataclasses.replace(sampling, allowed=allowed)
    inputs = (tokens, positions, page_table, logits_at, sampling, sample_index)
    return inputs, [chunk_rows[-1] for chunk_rows in rows]

  def _sampling(self, params, seeds, B, prompt_lens=()) -> SamplingBatch:
    batch = SamplingBatch.build(params, seeds, B, prompt_lens)  # the mask: the shared one
    if B not in self._unconstrained:
      words = -(-self.model.config.vocab_size // 32)
      self._unconstrained[B] = np.full((B, words), -1, np.int32)
    return dataclasses.replace(batch, allowed=self._unconstrained[B])

  def dummy_inputs(self, shape: tuple[int, int, int]):
    """All-padding inputs of a step shape: every token writes to the sink page."""
    B, T, P = shape
    sampling = self._sampling([SamplingParams()] * B, [0] * B, B)
    zeros = np.zeros(B, np.int32)
    return (np.zeros((B, T), np.int32), np.full((B, T), -1, np.int32),
            np.zeros((B, P), np.int32), zeros, sampling, zeros)  # fmt: skip

  def _place(self, inputs):
    if self.model.mesh is None:
      # The host arrays go to the compiled call as they are: its C++ dispatch copies them in
      # ~0.5 ms a step, against ~1.9 ms for converting the 16 arrays one by one first.
      return inputs
    # Each row goes to its `data` replica; every process passes the same host arrays.
    rows = batch_sharding(inputs[0].shape[0], self.model.layout, self.model.mesh)
    return jax.tree.map(lambda x: put(x, rows), inputs)

  def _lower(self, inputs) -> jax.stages.Lowered:
    # Traced under the model's mesh: Pallas kernels, which XLA cannot partition, split
    # themselves over it (models/attention.py).
    with contextlib.nullcontext() if self.model.mesh is None else jax.set_mesh(self.model.mesh):
      return model_step.lower(
        self.model.graphdef, self.model.state, self.cache, self.page_tokens,
        *self._place(inputs), self.shardings,
      )  # fmt: skip

  def _dispatch(self, tokens, positions, page_table, logits_at, sampling, sample_index):
    inputs = (tokens, positions, page_table, logits_at, sampling, sample_index)
    shape = (*tokens.shape, page_table.shape[1])
    executable = self.executables.get(shape)
    if executable is None:  # not warmed up: compile now, and say so
      start = time.perf_counter()
      executable = self.executables[shape] = self._lower(inputs).compile()
      self.num_compiles += 1
      log.info("compiled step B=%d T=%d P=%d in %.1fs", *shape, time.perf_counter() - start)
    sampled, logits, self.cache, self.page_tokens = executable(
      self.model.state, self.cache, self.page_tokens, *self._place(inputs)
    )
    return sampled, logits
