"""The KV page allocator: host-side bookkeeping of the device page pool (pure Python).

A request's KV lives in fixed-size pages listed by its page table. Pages are reference
counted so requests that share a prompt prefix share its full pages (prefix caching): a full
page is keyed by a hash chained over every token up to its end, so equal keys mean equal KV.
A page whose count drops to zero keeps its cached contents and joins the free queue; it is
only overwritten when it reaches the front of the queue again (least recently freed first).

Page 0 is never handed out: padding tokens write there.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np


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

  @property
  def num_free(self) -> int:
    return len(self.free_queue)

  def table(self, request_id: str) -> list[int]:
    return self.tables.get(request_id, [])

  def match_prefix(self, request_id: str, token_ids: Sequence[int]) -> int:
    """Adopts the cached pages holding a prefix of `token_ids` as the start of a new
    request's table; returns the number of tokens they hold. The last token is always left
    to compute, since its logits are needed."""
    assert request_id not in self.tables, request_id
    pages: list[int] = []
    keys: list[bytes] = []
    if self.prefix_caching:
      for key in page_hashes(token_ids, self.page_size, (len(token_ids) - 1) // self.page_size):
        page = self.cached.get(key)
        if page is None:
          break
        pages.append(page)
        keys.append(key)
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

  def commit(self, request_id: str, token_ids: Sequence[int], num_computed: int) -> None:
    """Registers the request's pages that are now full of computed KV in the prefix cache."""
    if not self.prefix_caching:
      return
    table, keys = self.tables[request_id], self.keys.setdefault(request_id, [])
    full = min(num_computed // self.page_size, len(table))
    parent = keys[-1] if keys else b""
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
