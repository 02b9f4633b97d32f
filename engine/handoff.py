"""Disaggregated serving on the engine core's side: the events between a prefill core and a
decode one, the packed KV they move, and the two stages (`PrefillStage`, `DecodeStage`) that
own pinning, reserving, the hand-off and the landing. The front end's side (both stages in one
process, or one per process with KV tickets) is `meshserve.engine.disaggregated`.

A prefill core ends a request's stream with a `Handoff`: the request's state and its prompt's
KV, packed by `Runner.export_pages` (the copy is dispatched, not waited for). Its pages stay
pinned in the prefill pool until the stream's consumer releases them.

A decode core takes the state and a `KVFetch`: it first reserves pages, then calls the fetch
with the packed array's target sharding (its own layout) and shape. The fetch starts the copy
and returns at once: `jax.device_put` within a process, a `jax.experimental.transfer` pull
across processes. The core keeps stepping while the copy runs; once the array is ready it
writes it into the reserved pages, admits the request and reports `Landed`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax

from meshserve.engine.api import (  # noqa: F401 - re-exported
  Landed,
  RequestTiming,
  Role,
  TransferError,
)
from meshserve.engine.request import Request, RequestState, TokenDelta

if TYPE_CHECKING:
  from meshserve.engine.engine import Engine

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class PackedKV:
  """The layout of a request's KV between two stages: one array [2, L, n, Z, K, D] (keys and
  values, layers, n pages, page slots, kv heads, head dim), n a page bucket whose tail is
  padding. A stage packs it from its pool's pages and unpacks it into its own; across
  processes it travels cut along the kv heads, one piece per kv-head shard of the receiver."""

  AXES = ("kv", "layers", "pages", "page_slots", "kv_heads", "head_dim")
  KV_HEADS = AXES.index("kv_heads")

  num_layers: int
  page_size: int
  kv_heads: int
  head_dim: int

  def shape(self, num_pages: int) -> tuple[int, ...]:
    return (2, self.num_layers, num_pages, self.page_size, self.kv_heads, self.head_dim)

  def piece_shape(self, num_pages: int, pieces: int) -> tuple[int, ...]:
    """One of `pieces` equal cuts along the kv heads."""
    shape = list(self.shape(num_pages))
    shape[self.KV_HEADS] //= pieces
    return tuple(shape)


# (sharding, shape) -> the packed KV (PackedKV) in that sharding; may not be ready yet.
KVFetch = Callable[[jax.sharding.Sharding, tuple[int, ...]], jax.Array]


@dataclasses.dataclass(frozen=True)
class Handoff:
  """A prefill stream's last event: continue `state` on a decode stage with `kv`."""

  request_id: str  # the prefill core's id: what `release` takes
  state: RequestState
  kv: jax.Array  # PackedKV on the prefill mesh
  num_pages: int  # pages that hold the prompt (n >= num_pages; the rest is padding)
  timing: RequestTiming  # the prefill stage's queue and first-token times
  final = True

  def fetch(self, sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> jax.Array:
    """The in-process KVFetch: one device_put into the decode stage's sharding."""
    if shape != self.kv.shape:
      raise TransferError(f"kv: decode expects {shape}, prefill packed {self.kv.shape}")
    return jax.device_put(self.kv, sharding)


@dataclasses.dataclass(frozen=True)
class StageFailed:
  """A request's stream ends with an error of its own (the stage goes on serving)."""

  request_id: str
  error: Exception
  final = True


# Every event an engine core reports, handled in one place (AsyncEngine._on_deltas).
CoreEvent = TokenDelta | Handoff | Landed | StageFailed


class Stage:
  """What a core does besides stepping, by its role: nothing for a colocated engine. The
  prefill and decode roles below own the rest of disaggregation on the core's side, on top of
  the engine's primitives (detach a request with its pages; reserve pages; attach a request to
  them), so the Engine itself knows no hand-off."""

  def __init__(self, engine: Engine):
    self.engine = engine

  def after_step(self, deltas: list[TokenDelta]) -> list[CoreEvent]:
    return []

  def take(self, m: Import) -> None:
    raise ValueError(f"request_id: {m.request_id!r}: a {self.engine.role} engine imports no KV")

  def move(self, events: list[CoreEvent]) -> None:
    pass

  def release(self, request_id: str) -> None:
    pass

  def abort(self, request_id: str, events: list[CoreEvent]) -> bool:
    """Ends a request this stage holds; False when it holds none of that id."""
    return False

  def held(self) -> list[str]:
    return []

  def wait(self) -> float | None:
    """How long the core may sleep on its inbox for this stage (None: until a message)."""
    return None

  def stats(self) -> dict:
    return {"pinned": 0, "importing": 0}


class PrefillStage(Stage):
  """Prefill role: a request that reached its first token leaves the batch, its pages pinned,
  and its KV export is dispatched in the same turn (a `Handoff`). The pages go back on
  `release` (the KV has landed elsewhere) or abort."""

  def __init__(self, engine: Engine):
    super().__init__(engine)
    self.pinned: dict[str, Request] = {}

  def after_step(self, deltas: list[TokenDelta]) -> list[CoreEvent]:
    events: list[CoreEvent] = []
    for delta in deltas:
      if delta.finished:  # the first token finished it: nothing to hand off
        continue
      request, pages = self.engine.detach(delta.request_id)
      self.pinned[request.request_id] = request
      kv = self.engine.runner.export_pages(pages)
      state = RequestState.of(request)
      events.append(Handoff(request.request_id, state, kv, len(pages), request.timing()))
    return events

  def release(self, request_id: str) -> None:
    if self.pinned.pop(request_id, None) is not None:
      self.engine.free(request_id)

  def abort(self, request_id: str, events: list[CoreEvent]) -> bool:
    if request_id not in self.pinned:
      return False
    self.release(request_id)
    return True

  def held(self) -> list[str]:
    return list(self.pinned)

  def stats(self) -> dict:
    return super().stats() | {"pinned": len(self.pinned)}


@dataclasses.dataclass(slots=True)
class Import:
  """A request prefilled elsewhere, on its way into this decode stage."""

  request_id: str
  state: RequestState
  fetch: KVFetch
  arrival: float
  matcher: object = None  # a constrained request's, resumed past its tokens
  pages: list[int] | None = None  # once reserved
  kv: jax.Array | None = None  # once fetching
  started: float = 0.0  # when the fetch started


class DecodeStage(Stage):
  """Decode role: imports wait for pages in arrival order, as the pool allows; each then
  starts its KV fetch, and the core keeps stepping while the copy runs; a landed import joins
  the batch (`Landed`). An import that waits too long, or whose copy fails, fails alone."""

  def __init__(self, engine: Engine):
    super().__init__(engine)
    self.waiting: collections.deque[Import] = collections.deque()  # for pages
    self.moving: dict[str, Import] = {}  # reserved, KV on its way
    self.transfer_timeout = 60.0  # seconds a started KV fetch may take before it fails
    # Seconds an import may wait for pages before it fails: less than a prefill worker holds
    # its KV for (--handoff-timeout, 30 s), so the decode side gives up first, with a clear
    # error, rather than pull an offer already withdrawn.
    self.import_timeout = 20.0
    self.transfers = dict(
      kv_transfers=0, kv_transfer_bytes=0, kv_transfer_seconds=0.0, kv_transfers_cancelled=0
    )

  def take(self, m: Import) -> None:
    self.engine.validate_state(m.state)  # it came from another process
    self.waiting.append(m)

  def move(self, events: list[CoreEvent]) -> None:
    """Reserves pages for waiting imports (in order, while the pool allows), starts their
    fetches, and admits those whose KV has landed. Never waits for a copy."""
    engine, runner = self.engine, self.engine.runner
    now = time.perf_counter()
    for m in [m for m in self.waiting if now - m.arrival > self.import_timeout]:
      self.waiting.remove(m)  # the pool stayed full: the prefill side may be holding on
      self._fail(m.request_id, TimeoutError(f"no free pages in {self.import_timeout:g}s"), events)
    while self.waiting and engine.has_batch_slot():  # a landed import joins the batch at once
      m = self.waiting[0]
      m.pages = engine.reserve(m.request_id, len(m.state.prompt_ids))
      if m.pages is None:
        break  # the pool is full: the decode batch frees pages as it finishes
      self.waiting.popleft()
      m.started = time.perf_counter()
      try:
        m.kv = m.fetch(runner.kv_sharding, runner.kv_shape(len(runner.page_list(m.pages))))
      except Exception as e:  # noqa: BLE001 - the request fails, the stage goes on
        self._fail(m.request_id, e, events)
        continue
      self.moving[m.request_id] = m
    now = time.perf_counter()
    for m in list(self.moving.values()):
      if not m.kv.is_ready():
        if now - m.started > self.transfer_timeout:  # the sender died or hangs
          del self.moving[m.request_id]
          error = TimeoutError(f"no KV after {self.transfer_timeout:.0f}s")
          self._fail(m.request_id, error, events)
        continue
      del self.moving[m.request_id]
      try:
        jax.block_until_ready(m.kv)  # ready: raises at once if the copy failed
        runner.import_pages(m.kv, m.pages, m.state.prompt_ids)
      except Exception as e:  # noqa: BLE001
        self._fail(m.request_id, e, events)
        continue
      engine.admit(m.request_id, m.state, arrival=m.arrival, matcher=m.matcher)
      seconds, size = time.perf_counter() - m.arrival, m.kv.nbytes
      self.transfers["kv_transfers"] += 1
      self.transfers["kv_transfer_bytes"] += size
      self.transfers["kv_transfer_seconds"] += seconds
      events.append(Landed(m.request_id, seconds, size))

  def abort(self, request_id: str, events: list[CoreEvent]) -> bool:
    if self.moving.pop(request_id, None) is not None:  # a copy in flight lands nowhere
      self.transfers["kv_transfers_cancelled"] += 1
    for m in self.waiting:
      if m.request_id == request_id:
        self.waiting.remove(m)
        break
    return False  # the engine frees any reservation (Engine.abort)

  def held(self) -> list[str]:
    return [m.request_id for m in self.waiting]

  def wait(self) -> float | None:
    return 0.002 if self.moving else 0.5 if self.waiting else None  # their timeouts

  def stats(self) -> dict:
    return super().stats() | {"importing": len(self.waiting) + len(self.moving)} | self.transfers

  def _fail(self, request_id: str, error: Exception, events: list[CoreEvent]) -> None:
    log.warning("request %s: KV transfer failed: %s", request_id, error)
    self.engine.abort(request_id)
    message = f"the KV transfer failed: {type(error).__name__}: {error}"
    events.append(StageFailed(request_id, TransferError(message)))


STAGES = {Role.COLOCATED: Stage, Role.PREFILL: PrefillStage, Role.DECODE: DecodeStage}
