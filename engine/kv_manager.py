"""The KV page allocator: host-side bookkeeping of the device page pool (pure Python).

A request's KV lives in fixed-size pages listed by its page table. Pages are reference
counted so requests that share a prompt prefix share its full pages (prefix caching): a full
page is keyed by a hash chained over every token up to its end, so equal keys mean equal KV.
A page whose count drops to zero keeps its cached contents and joins the free queue; it is
only overwritten when it reaches the front of the queue again (least recently freed first).

Page 0 is never handed out: padding tokens write there.

Under data parallelism each replica holds only its own slice of the pool, so `ReplicaAllocator`
keeps one `PageAllocator` per replica, with page numbers local to the replica's slice, and
assigns each request to one replica for life.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np


def cache_root(salt: str) -> bytes:
  """The parent of a request's first page hash: requests of different salts never share a
  cached page (b"" without a salt)."""
  return hashlib.sha256(b"cache_salt\0" + salt.encode()).digest() if salt else b""


def page_hashes(
  token_ids: Sequence[int], page_size: int, stop: int, *, start: int = 0, parent: bytes = b""
) -> Iterator[bytes]:
  """Chained hashes of full pages start..stop-1 of `token_ids`; `parent` is the hash of page
  start-1 (b"" for the first page)."""
  for i in range(start, stop):
    chunk = np.asarray(token_ids[i * page_size : (i + 1) * page_size], np.int64).tobytes()
    parent = hashlib.sha256(parent + chunk).digest()
    yield parent


class PageAllocator:
  """Hands out pool pages to requests, shares cached prefix pages, reclaims on free."""

  def __init__(self, num_pages: int, page_size: int, *, prefix_caching: bool = True):
    if num_pages < 2:
      raise ValueError("num_pages must be at least 2 (page 0 is reserved)")
    self.num_pages, self.page_size, self.prefix_caching = num_pages, page_size, prefix_caching
    self.refs = [0] * num_pages
    self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_pages))
    self.cached: dict[bytes, int] = {}  # full-page hash -> page
    self.page_key: dict[int, bytes] = {}  # page -> its hash, for pages in `cached`
    self.tables: dict[str, list[int]] = {}  # request id -> page table
    self.keys: dict[str, list[bytes]] = {}  # request id -> hashes of its committed full pages

  replicas = 1

  @property
  def num_free(self) -> int:
    return len(self.free_queue)

  def table(self, request_id: str) -> list[int]:
    return self.tables.get(request_id, [])

  def replica_of(self, request_id: str) -> int:
    return 0

  def _cached_prefix(
    self, token_ids: Sequence[int], salt: str = ""
  ) -> tuple[list[int], list[bytes]]:
    """The cached pages holding a prefix of `token_ids` (never its last token), and keys."""
    pages: list[int] = []
    keys: list[bytes] = []
    if self.prefix_caching:
      stop = (len(token_ids) - 1) // self.page_size
      for key in page_hashes(token_ids, self.page_size, stop, parent=cache_root(salt)):
        page = self.cached.get(key)
        if page is None:
          break
        pages.append(page)
        keys.append(key)
    return pages, keys

  def match_prefix(
    self,
    request_id: str,
    token_ids: Sequence[int],
    replicas: Sequence[int] = (0,),
    *,
    salt: str = "",
  ) -> int:
    """Adopts the cached pages holding a prefix of `token_ids` (among those cached under the
    same `salt`) as the start of a new request's table; returns the number of tokens they
    hold. The last token is always left to compute, since its logits are needed.
    (`replicas`: see ReplicaAllocator.)"""
    assert request_id not in self.tables, request_id
    pages, keys = self._cached_prefix(token_ids, salt)
    for page in pages:
      self._ref(page)
    self.tables[request_id] = pages
    self.keys[request_id] = keys
    return len(pages) * self.page_size

  def allocate(self, request_id: str, num_tokens: int) -> list[int] | None:
    """Grows the request's table to hold `num_tokens` tokens; None (and no change) when the
    pool has too few free pages."""
    table = self.tables.setdefault(request_id, [])
    need = -(-num_tokens // self.page_size) - len(table)
    if need > self.num_free:
      return None
    for _ in range(need):
      page, _ = self.free_queue.popitem(last=False)
      key = self.page_key.pop(page, None)
      if key is not None:  # evict its cached contents
        del self.cached[key]
      self.refs[page] = 1
      table.append(page)
    return table

  def commit(
    self, request_id: str, token_ids: Sequence[int], num_computed: int, *, salt: str = ""
  ) -> None:
    """Registers the request's pages that are now full of computed KV in the prefix cache,
    under its `salt`."""
    if not self.prefix_caching:
      return
    table, keys = self.tables[request_id], self.keys.setdefault(request_id, [])
    full = min(num_computed // self.page_size, len(table))
    parent = keys[-1] if keys else cache_root(salt)
    for i, key in enumerate(
      page_hashes(token_ids, self.page_size, full, start=len(keys), parent=parent), len(keys)
    ):
      keys.append(key)
      # A page with the same contents may already be cached (computed by another request
      # at the same time); the first one stays the canonical copy.
      if key not in self.cached:
        self.cached[key] = table[i]
        self.page_key[table[i]] = key

  def free(self, request_id: str) -> None:
    """Releases the request's pages, tail first so its shared prefix is evicted last."""
    for page in reversed(self.tables.pop(request_id, [])):
      self.refs[page] -= 1
      if self.refs[page] == 0:
        self.free_queue[page] = None
    self.keys.pop(request_id, None)

  def _ref(self, page: int) -> None:
    if self.refs[page] == 0:
      del self.free_queue[page]
    self.refs[page] += 1


class ReplicaAllocator:
  """One PageAllocator per data replica, over its own slice of the pool: replica r holds pool
  pages [r * n, (r + 1) * n), numbered 0..n-1 in its tables (its page 0 is its sink). A request
  stays on the replica it was admitted to; the step places its row there."""

  def __init__(self, num_pages: int, page_size: int, *, replicas: int, prefix_caching: bool):
    if num_pages % replicas:
      raise ValueError(f"num_pages ({num_pages}) must be a multiple of dp ({replicas})")
    self.replicas, self.page_size = replicas, page_size
    self.num_pages = num_pages
    self.parts = [
      PageAllocator(num_pages // replicas, page_size, prefix_caching=prefix_caching)
      for _ in range(replicas)
    ]
    self.assigned: dict[str, int] = {}  # request id -> its replica

  @property
  def num_free(self) -> int:
    return sum(part.num_free for part in self.parts)

  @property
  def tables(self) -> dict[str, list[int]]:
    return {rid: t for part in self.parts for rid, t in part.tables.items()}

  def replica_of(self, request_id: str) -> int:
    return self.assigned[request_id]

  def table(self, request_id: str) -> list[int]:
    replica = self.assigned.get(request_id)
    return [] if replica is None else self.parts[replica].table(request_id)

  def match_prefix(
    self,
    request_id: str,
    token_ids: Sequence[int],
    replicas: Sequence[int] | None = None,
    *,
    salt: str = "",
  ) -> int:
    """Assigns the request to one of `replicas` (default: any): the one caching the longest
    prefix of it, then the one with the most free pages; then adopts that prefix."""
    candidates = range(self.replicas) if replicas is None else replicas

    def score(r: int) -> tuple[int, int]:
      return len(self.parts[r]._cached_prefix(token_ids, salt)[0]), self.parts[r].num_free

    replica = max(candidates, key=score)
    self.assigned[request_id] = replica
    return self.parts[replica].match_prefix(request_id, token_ids, salt=salt)

  def allocate(self, request_id: str, num_tokens: int) -> list[int] | None:
    if request_id not in self.assigned:
      self.assigned[request_id] = max(range(self.replicas), key=lambda r: self.parts[r].num_free)
    return self.parts[self.assigned[request_id]].allocate(request_id, num_tokens)

  def commit(
    self, request_id: str, token_ids: Sequence[int], num_computed: int, *, salt: str = ""
  ) -> None:
    self.parts[self.assigned[request_id]].commit(request_id, token_ids, num_computed, salt=salt)

  def free(self, request_id: str) -> None:
    replica = self.assigned.pop(request_id, None)
    if replica is not None:
      self.parts[replica].free(request_id)
