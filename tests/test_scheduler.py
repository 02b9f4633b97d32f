"""The page allocator and the scheduler, on the host alone (no model).

The fuzz test drives them the way the engine does, with a fake device: a dict that records
which (request, position) token every pool slot holds. Reading a request's KV through its page
table must give back exactly its own tokens, whatever else happened to the pool.
"""

import collections
import random

import pytest

from meshserve.engine.config import EngineConfig, bucket
from meshserve.engine.kv_manager import PageAllocator, ReplicaAllocator, page_hashes
from meshserve.engine.request import Request
from meshserve.engine.sampling import SamplingParams
from meshserve.engine.scheduler import Scheduler


def _request(rid, tokens, max_tokens=8):
  params = SamplingParams(max_tokens=max_tokens)
  return Request(rid, list(tokens), len(tokens), params, 0)


def test_allocate_grows_tables_and_reports_exhaustion():
  alloc = PageAllocator(num_pages=5, page_size=4)  # pages 1..4 usable
  assert alloc.num_free == 4
  assert alloc.allocate("a", 5) == alloc.table("a") and len(alloc.table("a")) == 2
  assert len(alloc.allocate("a", 8)) == 2  # still fits in two pages
  assert alloc.allocate("b", 13) is None  # needs four, two are free
  assert alloc.table("b") == [] and alloc.num_free == 2
  alloc.allocate("b", 8)
  assert alloc.num_free == 0 and 0 not in alloc.table("a") + alloc.table("b")
  alloc.free("a")
  alloc.free("b")
  assert alloc.num_free == 4


def test_prefix_pages_are_shared_and_evicted_last():
  alloc = PageAllocator(num_pages=9, page_size=4)
  prompt = list(range(10))  # two full pages and a partial one
  alloc.allocate("a", len(prompt))
  alloc.commit("a", prompt, len(prompt))
  assert alloc.match_prefix("b", prompt) == 8  # both full pages, shared
  assert alloc.table("b") == alloc.table("a")[:2]
  assert alloc.refs[alloc.table("a")[0]] == 2
  # The last token is always left to compute, even when every page is cached.
  assert alloc.match_prefix("c", prompt[:8]) == 4
  for rid in "abc":
    alloc.free(rid)
  assert alloc.num_free == 8
  # Freed cached pages survive until the free queue reaches them.
  assert alloc.match_prefix("d", prompt) == 8
  alloc.free("d")
  alloc.allocate("e", 4 * 6)  # six fresh pages: the partial page and the unused ones go first
  assert alloc.match_prefix("f", prompt) == 8
  alloc.free("f")
  alloc.allocate("g", 4 * 2)  # now the cached prefix must be evicted
  assert alloc.match_prefix("h", prompt) == 0


def test_page_hashes_chain_over_the_whole_prefix():
  a = list(page_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, 2))
  b = list(page_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4, 2))
  assert a[0] != b[0] and a[1] != b[1]  # same second page, different prefix


def test_scheduler_chunks_long_prompts_under_the_budget():
  alloc = PageAllocator(num_pages=64, page_size=4)
  config = EngineConfig(page_size=4, num_pages=64, max_model_len=64, max_batch=8,
                        max_num_batched_tokens=16, max_prefill_seqs=4)  # fmt: skip
  sched = Scheduler(alloc, config)
  short = _request("short", range(3))
  sched.add(short)
  step = sched.schedule()
  assert [(c.request, c.length) for c in step.prefills] == [(short, 3)]
  short.num_computed += 3
  short.token_ids.append(7)
  long = _request("long", range(100, 140))  # 40 tokens, over the budget of 16
  sched.add(long)
  chunks = []
  while long.num_computed < long.num_tokens:
    step = sched.schedule()
    assert [c.request for c in step.decodes] == [short]  # the short one keeps decoding
    assert sum(c.length for c in step.prefills + step.decodes) <= 16
    for c in step.prefills + step.decodes:
      c.request.num_computed += c.length
      if c.completes and c.request is short:
        short.token_ids.append(7)
    chunks += [c.length for c in step.prefills]
  assert chunks == [15, 15, 10]


@pytest.mark.parametrize("budget", [16, 44, 100, 304, 512, 1000])
def test_segment_row_buckets_split_over_replicas(budget):
  """Every prefill row bucket from 8 up splits over up to 8 replicas, and none exceeds the
  rows the budget holds."""
  config = EngineConfig(max_num_batched_tokens=budget, max_model_len=1024, prefill_segment=16)
  buckets = config.segment_row_buckets
  assert buckets[0] == 1 and buckets[-1] * 16 <= budget
  assert all(b % 8 == 0 for b in buckets if b >= 8)
  assert all(s in config.step_shapes for s in [(b, 16, 1) for b in buckets])


def _simulate(
  seed: int, events: int, prefix_caching: bool, replicas: int = 1, segment: int = 4
) -> None:
  """Random adds, aborts and steps against a fake device that records which tokens each KV
  slot was computed from. With replicas, each data replica has its own slice of the pool.
  segment: tokens per prefill row (0: one row per chunk)."""
  rng = random.Random(seed)
  page_size, num_pages = 4, 18 * replicas
  if replicas == 1:
    alloc = PageAllocator(num_pages, page_size=page_size, prefix_caching=prefix_caching)
  else:
    alloc = ReplicaAllocator(num_pages, page_size, replicas=replicas, prefix_caching=prefix_caching)
  config = EngineConfig(page_size=page_size, num_pages=num_pages, max_model_len=64,
                        max_batch=6 * replicas, max_num_batched_tokens=24 * replicas,
                        max_prefill_seqs=3 * replicas, min_prefill=4,
                        prefill_segment=segment)  # fmt: skip
  sched = Scheduler(alloc, config)
  shapes = {s for s in config.step_shapes if s[0] % replicas == 0}
  parts = [alloc] if replicas == 1 else alloc.parts
  # The fake device: (replica, page, offset) -> the tokens its KV depends on (all of the
  # sequence up to it).
  pool: dict[tuple[int, int, int], tuple[int, ...]] = {}
  live: dict[str, Request] = {}
  prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 40))] for _ in range(6)]
  max_len = 64
  served = 0

  def next_token(tokens):  # a deterministic "model"
    return (sum(tokens) * 31 + len(tokens)) % 50

  for event in range(events):
    roll = rng.random()
    if roll < 0.15 and len(live) < 12:
      base = rng.choice(prefixes)
      prompt = base + [rng.randrange(50) for _ in range(rng.randrange(0, 3))]
      rid = f"r{event}"
      live[rid] = _request(rid, prompt[: max_len - 24], max_tokens=rng.randrange(1, 25))
      sched.add(live[rid])
    elif roll < 0.2 and live:
      victim = live.pop(rng.choice(sorted(live)))
      sched.remove(victim)
    else:
      step = sched.schedule()
      for calls, prefill in ((step.prefills, True), (step.decodes, False)):
        if calls:  # every shape the runner can be asked for is warmed up before serving
          pages = [len(alloc.table(c.request.request_id)) for c in calls]
          per_replica = collections.Counter()
          for c in calls:  # a segmented prefill chunk takes a row per `segment` tokens
            n = -(-c.length // segment) if prefill and segment else 1
            per_replica[alloc.replica_of(c.request.request_id)] += n
          rows = replicas * max(per_replica.values())  # each replica's rows padded alike
          assert len(calls) <= (config.max_batch if not prefill else config.max_prefill_seqs)
          if prefill and segment:
            assert rows <= config.segment_row_buckets[-1]
            assert (
              bucket(rows, config.segment_row_buckets) * segment <= config.max_num_batched_tokens
            )
          else:
            assert rows <= (config.max_batch if not prefill else config.prefill_row_buckets[-1])
          lengths = [c.length for c in calls]
          shape = config.step_shape(lengths, pages, prefill=prefill, rows=rows)
          assert shape in shapes, (shape, prefill)
      for c in step.prefills + step.decodes:
        r, table = c.request, alloc.table(c.request.request_id)
        replica = alloc.replica_of(r.request_id)
        assert 0 not in table
        # Every token this request already computed must read back as its own.
        for pos in range(c.start):
          slot = (replica, table[pos // page_size], pos % page_size)
          assert pool[slot] == tuple(r.token_ids[: pos + 1]), (r.request_id, pos)
        for pos in range(c.start, c.start + c.length):
          pool[(replica, table[pos // page_size], pos % page_size)] = tuple(r.token_ids[: pos + 1])
        r.num_computed += c.length
        alloc.commit(r.request_id, r.token_ids, r.num_computed)
        if c.completes:
          r.token_ids.append(next_token(r.token_ids))
          if r.num_output >= r.params.max_tokens:
            sched.remove(r)
            del live[r.request_id]
            served += 1
    # Invariants after every event, in each replica's slice.
    for part in parts:
      in_use = {}
      for table in part.tables.values():
        assert len(set(table)) == len(table)
        for page in table:
          in_use[page] = in_use.get(page, 0) + 1
      assert all(part.refs[p] == n for p, n in in_use.items())
      assert part.num_free + len(in_use) == part.num_pages - 1
      assert not set(in_use) & set(part.free_queue)
      if not prefix_caching:
        assert all(n == 1 for n in in_use.values())
    if replicas > 1:  # a replica never holds more rows than its share of the batch
      rows = collections.Counter(alloc.replica_of(r.request_id) for r in sched.running)
      assert max(rows.values(), default=0) <= config.max_batch // replicas
  for r in list(live.values()):
    sched.remove(r)
  assert alloc.num_free == alloc.num_pages - replicas and not alloc.tables
  assert served > 20 and sched.num_preemptions > 0
  assert (sched.num_cached_tokens > 0) == prefix_caching


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_fuzz_no_leaks_no_foreign_kv(prefix_caching):
  for seed in range(5):
    _simulate(seed, events=1000, prefix_caching=prefix_caching)
    _simulate(seed, events=1000, prefix_caching=prefix_caching, segment=0)  # a row per chunk


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_fuzz_with_a_pool_per_data_replica(prefix_caching):
  """dp=2: each request's pages and row stay on its replica, within the replica's share."""
  for seed in range(5):
    _simulate(seed, events=1000, prefix_caching=prefix_caching, replicas=2)
    _simulate(seed, events=1000, prefix_caching=prefix_caching, replicas=2, segment=0)


def test_a_long_prompt_starts_with_a_pool_per_replica():
  """dp=2 pads a prefill call to a row per replica: the chunk width must leave room for both
  rows in the token budget, or a lone long prompt would wait forever."""
  config = EngineConfig(page_size=16, num_pages=128, max_model_len=1024, max_batch=8)
  alloc = ReplicaAllocator(128, 16, replicas=2, prefix_caching=True)
  sched = Scheduler(alloc, config)
  sched.add(_request("long", range(700)))
  step = sched.schedule()
  [chunk] = step.prefills
  assert 2 * chunk.length <= config.max_num_batched_tokens


@pytest.mark.parametrize(
  "changes, message",
  [
    ({"max_batch": 6}, "max_batch .* must be a multiple of dp"),
    ({"max_prefill_seqs": 1}, "max_prefill_seqs .* must be at least dp"),
    ({"num_pages": 64}, r"each of the dp=4 slices holds 240 tokens, less than max_model_len"),
  ],
)
def test_what_a_pool_per_replica_needs_is_named(changes, message):
  from meshserve.engine.engine import _check_replicas

  base = dict(page_size=16, num_pages=256, max_model_len=256, max_batch=8)
  with pytest.raises(ValueError, match=message):
    _check_replicas(EngineConfig(**(base | changes)), 4)
  with pytest.raises(ValueError, match="dp a power of two"):
    _check_replicas(EngineConfig(**base), 3)


def test_requests_of_different_cache_salts_share_no_page():
  alloc = PageAllocator(num_pages=16, page_size=4)
  prompt = list(range(10))
  alloc.allocate("a", len(prompt))
  alloc.commit("a", prompt, len(prompt), salt="tenant-1")
  assert alloc.match_prefix("b", prompt) == 0  # unsalted
  assert alloc.match_prefix("c", prompt, salt="tenant-2") == 0
  assert alloc.match_prefix("d", prompt, salt="tenant-1") == 8
  assert set(alloc.table("d")) <= set(alloc.table("a"))
  assert not set(alloc.table("a")) & set(alloc.table("b") + alloc.table("c"))
