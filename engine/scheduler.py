"""The scheduler: which requests run this step and how many of their tokens (pure Python).

Each step hands out a token budget. Running requests come first, oldest first: a decoding
request takes one token, a request still prefilling takes the next chunk of its prompt, so a
long prompt is prefilled over several steps while the others keep decoding. Waiting requests
are then admitted in arrival order while the budget, the batch and the page pool allow.

When the pool cannot grow a running request, the newest running request is preempted: its
pages are freed and it goes back to the front of the queue with its output kept, to be
recomputed (its full pages usually come straight back from the prefix cache).

Under data parallelism with a pool per replica (`ReplicaAllocator`) every request lives on one
replica, which holds its pages and its row: a replica takes at most max_batch / dp rows, a
step's calls are padded to dp times the busiest replica's rows, and only a request of the same
replica is preempted to make room.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import time

from meshserve.engine.config import EngineConfig, bucket
from meshserve.engine.kv_manager import PageAllocator
from meshserve.engine.request import Request

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class Chunk:
  """Tokens [start, start + length) of a request, computed this step, and where its KV lives:
  its page table and pool replica as the step leaves them (the runner reads nothing else)."""

  request: Request
  start: int
  length: int
  pages: tuple[int, ...] = ()
  replica: int = 0

  @property
  def completes(self) -> bool:
    """After this chunk the request's KV is complete and its next token is sampled."""
    return self.start + self.length == self.request.num_tokens


@dataclasses.dataclass
class Schedule:
  prefills: list[Chunk]  # multi-token chunks
  decodes: list[Chunk]  # one-token chunks
  preempted: list[Request]

  @property
  def empty(self) -> bool:
    return not (self.prefills or self.decodes)


class Scheduler:
  def __init__(self, allocator: PageAllocator, config: EngineConfig):
    self.allocator, self.config = allocator, config
    self.waiting: collections.deque[Request] = collections.deque()
    self.running: list[Request] = []  # in admission order: the newest is preempted first
    self.num_preemptions = 0
    self.num_cached_tokens = 0  # tokens admitted straight from the prefix cache, since start
    # Decode stage: request id -> prompt tokens, for requests whose KV is on its way into
    # reserved pages. Each keeps a batch slot, which waiting requests may not take.
    self.reserved: dict[str, int] = {}

  def add(self, request: Request) -> None:
    self.waiting.append(request)

  def update(self, schedule: Schedule) -> None:
    """Applies an executed step: each chunk's tokens now have their KV in the pool (full pages
    go to the prefix cache)."""
    for chunk in schedule.prefills + schedule.decodes:
      request = chunk.request
      request.num_computed += chunk.length
      self.allocator.commit(
        request.request_id, request.token_ids, request.num_computed, salt=request.cache_salt
      )

  def detach(self, request: Request) -> None:
    """Prefill stage: the request leaves the batch, its pages kept (pinned for a hand-off)."""
    self.running.remove(request)

  def reserve(self, request_id: str, num_tokens: int) -> list[int] | None:
    """Decode stage: pages for `num_tokens` tokens of KV coming from elsewhere, plus one more
    token's room for the first decode step; None while the pool has too few free. The
    request keeps a batch slot from here on."""
    pages = self.allocator.allocate(request_id, num_tokens + 1)
    if pages is None:
      self.allocator.free(request_id)  # allocate left an empty table behind
      return None
    self.reserved[request_id] = num_tokens
    return list(pages)

  def attach(self, request: Request) -> int:
    """Decode stage: a reserved request whose KV has landed joins the batch at once (a waiting
    request must hold no pages, or a preemption could leave the queue's head waiting forever
    for pages that requests behind it hold). Returns the tokens reserved for."""
    num_tokens = self.reserved.pop(request.request_id)
    self.running.append(request)
    return num_tokens

  def unreserve(self, request_id: str) -> bool:
    """Returns a reservation's pages (its import was aborted or failed)."""
    if self.reserved.pop(request_id, None) is None:
      return False
    self.allocator.free(request_id)
    return True

  def remove(self, request: Request) -> None:
    """Drops a finished or aborted request and returns its pages at once."""
    if request in self.running:
      self.running.remove(request)
    elif request in self.waiting:
      self.waiting.remove(request)
    self.allocator.free(request.request_id)

  def schedule(self) -> Schedule:
    cfg = self.config
    budget = cfg.max_num_batched_tokens
    out = Schedule([], [], [])
    replicas, replica_of = self.allocator.replicas, self.allocator.replica_of
    prefill_rows = [0] * replicas  # this step's prefill chunks, per replica

    segment = cfg.segment
    # A prefill call is [rows, width]: rows of `segment` tokens (a chunk takes as many as it
    # needs), or one row per chunk, all as wide as this step's width.
    width = segment or self._prefill_width()
    row_buckets = cfg.segment_row_buckets if segment else cfg.prefill_row_buckets

    def fits(replica: int, rows: int) -> bool:
      """Whether `rows` more prefill rows on `replica` keep the call inside the budget (each
      replica's block of rows is padded to the busiest)."""
      counts = list(prefill_rows)
      counts[replica] += rows
      total = replicas * max(counts)
      return (
        total <= row_buckets[-1]
        and bucket(total, row_buckets) * width <= cfg.max_num_batched_tokens
      )

    def chunk_length(request: Request) -> int:
      """Tokens of `request` to compute this step; 0 when it has to wait. Prefill chunks run
      as one [rows, width] call that must fit the token budget, padding included."""
      remaining = request.num_tokens - request.num_computed
      length = min(remaining, budget)
      if length == 1:
        return 1
      if len(out.prefills) >= cfg.prefill_row_buckets[-1]:  # max_prefill_seqs chunks a step
        return 0
      replica = replica_of(request.request_id)
      if not segment:
        return min(length, width) if fits(replica, 1) else 0
      rows = -(-length // segment)
      while rows and not fits(replica, rows):
        rows -= 1
      length = min(length, rows * segment)
      if segment < length < remaining:  # a chunk that leaves more for later ends on a row edge
        length -= length % segment
      return length

    def take(request: Request, length: int) -> None:
      nonlocal budget
      chunk = Chunk(request, request.num_computed, length)
      (out.decodes if length == 1 else out.prefills).append(chunk)
      if length > 1:
        prefill_rows[replica_of(request.request_id)] += -(-length // segment) if segment else 1
      budget -= length

    i = 0
    while i < len(self.running) and budget > 0:
      request = self.running[i]
      length = chunk_length(request)
      if length == 0:
        i += 1  # its next chunk waits a step
        continue
      while self.allocator.allocate(request.request_id, request.num_computed + length) is None:
        victim = self._newest_beside(request)
        self.running.remove(victim)
        self._preempt(victim)
        out.preempted.append(victim)
        if victim is request:
          break
      else:
        take(request, length)
        i += 1
        continue
      # The request itself was preempted (it was its replica's newest); the requests after
      # it, on other replicas, still run.

    rows_per_replica = cfg.max_batch // replicas
    while (
      self.waiting
      and budget > 0
      and len(self.running) + len(self.reserved) < cfg.max_batch
      and not out.preempted
    ):
      request, cached = self.waiting[0], 0
      if request.num_computed == 0:  # else its KV came from a prefill stage (disaggregated)
        rows = [0] * replicas
        for r in self.running:
          rows[replica_of(r.request_id)] += 1
        room = [r for r in range(replicas) if rows[r] < rows_per_replica]
        if not room:
          break
        cached = self.allocator.match_prefix(
          request.request_id, request.token_ids, room, salt=request.cache_salt
        )
        request.num_computed = cached
        if request.scheduled_at is None:
          request.num_cached_tokens = cached
      length = chunk_length(request)
      # With nothing running, only pinned or reserved pages (released from outside) can make
      # room: a prompt the pool cannot hold whole would start, run out and preempt itself over
      # and over. It waits instead, and the engine sleeps until a release.
      whole = -(-(request.num_tokens + 1) // cfg.page_size)
      starved = not self.running and (
        whole - len(self.allocator.table(request.request_id)) > self.allocator.num_free
      )
      if (
        length == 0
        or starved
        or self.allocator.allocate(request.request_id, request.num_computed + length) is None
      ):
        self.allocator.free(request.request_id)  # let go of the prefix pages it adopted
        request.num_computed = 0
        break
      self.waiting.popleft()
      self.running.append(request)
      self.num_cached_tokens += cached
      if request.scheduled_at is None:
        request.scheduled_at = time.perf_counter()
      take(request, length)
    table = self.allocator.table
    for chunks in (out.prefills, out.decodes):
      chunks[:] = [
        dataclasses.replace(c, pages=tuple(table(c.request.request_id)),
                            replica=replica_of(c.request.request_id))
        for c in chunks
      ]  # fmt: skip
    return out

  def _prefill_width(self) -> int:
    """The row length of this step's prefill call: the bucket that lets the next requests in
    line prefill the most tokens, given that rows x width must fit the token budget. Long
    prompts then move in full-width chunks, several at a time, and a short prompt tail does
    not hold a whole step to its own length."""
    cfg = self.config
    queue = itertools.chain(self.running, self.waiting)
    lengths = (r.num_tokens - r.num_computed for r in queue)
    pending = list(itertools.islice((n for n in lengths if n > 1), cfg.prefill_row_buckets[-1]))
    replicas = self.allocator.replicas

    def padded(rows: int) -> int:  # with dp, each replica's block padded alike (spread evenly)
      return bucket(replicas * -(-rows // replicas), cfg.prefill_row_buckets)

    best, best_tokens = cfg.prefill_buckets[0], 0
    for width in cfg.prefill_buckets:
      if padded(1) * width > cfg.max_num_batched_tokens:
        break
      rows = 1
      while rows < len(pending) and padded(rows + 1) * width <= cfg.max_num_batched_tokens:
        rows += 1
      tokens = sum(min(n, width) for n in pending[:rows])
      if tokens > best_tokens:
        best, best_tokens = width, tokens
    return best

  def _newest_beside(self, request: Request) -> Request:
    """The newest running request on `request`'s replica (with one pool, the newest)."""
    replica = self.allocator.replica_of(request.request_id)
    return next(
      r for r in reversed(self.running) if self.allocator.replica_of(r.request_id) == replica
    )

  def _preempt(self, request: Request) -> None:
    self.allocator.free(request.request_id)
    request.num_computed = 0
    request.num_preemptions += 1
    self.num_preemptions += 1
    self.waiting.appendleft(request)
    log.debug("preempted %s (%d tokens)", request.request_id, request.num_tokens)
