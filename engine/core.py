"""The engine core: one thread that owns an `Engine` and is the only code that touches it.

Other threads talk to it through an inbox (add, abort) and hear from it through callbacks, so
nobody ever waits for a step, a compile or the warm-up (vLLM v1's EngineCore has this shape).
Each turn of the loop drains the inbox, runs one step and hands the step's deltas to
`on_deltas`. A failure anywhere in the loop is final: the core marks itself dead and calls
`on_dead` once, so the front end can fail every open stream; later adds raise EngineDeadError.
Shutdown ends the same way, after aborting every request.

A prefill-role core also hands each request off after its first token (a `Handoff` event, the
KV export dispatched in the same turn) and frees its pinned pages on `release`. A decode-role
core also takes `import_request`: it reserves pages (in arrival order, as the pool allows),
starts the KV fetch, keeps stepping while it runs, and admits the request once it has landed.
Both are the core's `stage` (meshserve.engine.handoff); the loop only calls it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
from collections.abc import Callable, Sequence

from meshserve.engine import lockstep
from meshserve.engine.api import EngineDeadError
from meshserve.engine.engine import Engine
from meshserve.engine.handoff import STAGES, CoreEvent, Import, KVFetch, StageFailed
from meshserve.engine.request import RequestState
from meshserve.engine.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class _Add:
  request_id: str
  token_ids: list[int]
  params: SamplingParams
  arrival: float  # time.perf_counter()
  cache_salt: str = ""
  matcher: object = None  # a constrained request's, compiled by the front end


@dataclasses.dataclass(frozen=True, slots=True)
class _Abort:
  request_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class _Release:
  request_id: str


_STOP = object()


def _turn_message(m) -> list:
  """An inbox message as a follower applies it (engine/lockstep.py)."""
  if m is _STOP:
    return ["stop"]
  if isinstance(m, _Add):
    return lockstep.add_message(m.request_id, m.token_ids, m.params, m.cache_salt)
  if isinstance(m, _Abort):
    return ["abort", m.request_id]
  raise ValueError(f"{type(m).__name__}: multi-host serving runs colocated engines only")


class EngineCore:
  """Runs `engine` on a thread of its own; `warmup` compiles every step shape first."""

  def __init__(
    self,
    engine: Engine,
    on_deltas: Callable[[list[CoreEvent]], None],
    on_dead: Callable[[EngineDeadError], None],
    *,
    warmup: bool = False,
    publish: lockstep.Publisher | None = None,
  ):
    """on_deltas (a list of TokenDelta, Handoff, Landed and StageFailed events) and on_dead
    run on the core thread and must not block. An exception from a step fails the core."""
    self.engine = engine
    self._on_deltas, self._on_dead = on_deltas, on_dead
    # Multi-host: every turn goes to the followers (engine/lockstep.py) before it is applied.
    self._publish = publish
    self._dying = threading.Lock()
    self._inbox: queue.SimpleQueue = queue.SimpleQueue()
    self.error: EngineDeadError | None = None
    self.ready = threading.Event()  # set once warm-up is done and the loop runs
    self._stopping = threading.Event()  # cuts a warm-up short
    self.stage = STAGES[engine.role](engine)  # what its role adds: hand-offs, imports
    self._stalled = False  # the last turn had requests but could schedule none of them
    self._stats = self._read_stats()  # replaced, never mutated: readers need no lock
    self._thread = threading.Thread(
      target=self._run, args=(warmup,), name="meshserve-engine-core", daemon=True
    )
    self._thread.start()

  def add(
    self,
    request_id: str,
    token_ids: Sequence[int],
    params: SamplingParams,
    arrival: float,
    cache_salt: str = "",
    matcher=None,
  ) -> None:
    """Queues a request that `engine.validate` accepted (a constrained one with the matcher
    from `engine.constrain`). Never blocks."""
    if self.error is not None:
      raise EngineDeadError(str(self.error))
    self._inbox.put(_Add(request_id, list(token_ids), params, arrival, cache_salt, matcher))

  def abort(self, request_id: str) -> None:
    """Stops a request wherever it is and frees its pages. Never blocks; unknown ids are
    ignored (the request may have just finished)."""
    self._inbox.put(_Abort(request_id))

  def release(self, request_id: str) -> None:
    """Prefill role: the request's KV has been copied out; its pinned pages are freed."""
    self._inbox.put(_Release(request_id))

  def import_request(
    self, request_id: str, state: RequestState, fetch: KVFetch, arrival: float, matcher=None
  ) -> None:
    """Decode role: continues a request prefilled elsewhere, its KV brought in by `fetch`
    (a constrained one with its matcher resumed past its tokens by the front end)."""
    if self.error is not None:
      raise EngineDeadError(str(self.error))
    self._inbox.put(Import(request_id, state, fetch, arrival, matcher))

  def stats(self) -> dict[str, int]:
    """The engine's counters after the last step."""
    return self._stats

  def shutdown(self, timeout: float | None = None) -> None:
    """Aborts every request (their streams end with finish_reason "abort") and stops."""
    self._stopping.set()
    self._inbox.put(_STOP)
    self._thread.join(timeout)

  def _run(self, warmup: bool) -> None:
    try:
      if warmup:
        self._warmup()
        self._stats = self._read_stats()
      if self._publish is not None:  # multi-host: ready once every follower is, too
        self._publish.wait_followers(self._stopping)
      self.ready.set()
      while self._turn():
        pass
      error = EngineDeadError("the engine is shut down")
    except BaseException as e:  # noqa: BLE001 - any failure is reported, never swallowed
      log.exception("engine core failed; failing every open request")
      error = EngineDeadError(f"the engine failed: {type(e).__name__}: {e}")
    self._die(error)

  def _warmup(self) -> None:
    runner, role = self.engine.runner, self.engine.role
    _ = self.engine.grammars  # structured output's tokenizer view, built once, before serving
    shapes = runner.step_shapes  # with dp replicas, only rows that split evenly
    if role == "decode":  # it only decodes (a preempted request's recompute compiles then)
      shapes = [s for s in shapes if s[1] == 1]
    runner.warmup(shapes, cancel=self._stopping)  # a prefill stage decodes 1-token prompts
    if role != "colocated" and not self._stopping.is_set():
      runner.warmup_transfers(export=role == "prefill", imports=role == "decode")

  def _turn(self) -> bool:
    """Drains the inbox, moves imports along and runs one step; False once told to stop."""
    # Block while nothing can move: a busy engine just looks at the inbox between steps; one
    # whose requests all wait (for pages that pinned or reserved requests hold) or that has
    # only KV on its way sleeps until a message comes, looking again soon for the KV.
    events: list = []
    messages = []
    if not self.engine.has_unfinished() or self._stalled:
      with contextlib.suppress(queue.Empty):
        messages.append(self._inbox.get(timeout=self.stage.wait()))
    while True:
      try:
        messages.append(self._inbox.get_nowait())
      except queue.Empty:
        break
    if self._publish is not None and (messages or self.engine.has_unfinished()):
      self._publish(list(map(_turn_message, messages)), self.engine)
    for m in messages:
      if m is _STOP:
        self._abort_all(events)
        self._on_deltas(events)
        return False
      self._take(m, events)
    self.stage.move(events)
    self._stalled = False
    if self.engine.has_unfinished():
      steps = self.engine.num_steps
      deltas = self.engine.step()
      self._stalled = self.engine.num_steps == steps  # nothing could be scheduled
      events += deltas
      events += self.stage.after_step(deltas)
    self._stats = self._read_stats()
    if events:
      self._on_deltas(events)
    return True

  def _take(self, m, events: list) -> None:
    """Acts on one inbox message. A request whose own data the engine refuses fails alone
    (its stream ends with the error); the core goes on."""
    try:
      if isinstance(m, _Add):
        self.engine.add_request(
          m.token_ids, m.params, m.request_id, arrival=m.arrival, cache_salt=m.cache_salt,
          matcher=m.matcher,
        )  # fmt: skip
      elif isinstance(m, Import):
        self.stage.take(m)
      elif isinstance(m, _Release):
        self.stage.release(m.request_id)
      else:
        self._abort(m.request_id, events)
    except ValueError as e:
      log.warning("request %s refused: %s", m.request_id, e)
      events.append(StageFailed(m.request_id, e))

  def _abort(self, request_id: str, events: list) -> None:
    if self.stage.abort(request_id, events):
      return
    if (delta := self.engine.abort(request_id)) is not None:
      events.append(delta)

  def _abort_all(self, events: list) -> None:
    engine = self.engine
    for request_id in [*engine.requests, *self.stage.held(), *engine.scheduler.reserved]:
      self._abort(request_id, events)

  def _read_stats(self) -> dict:
    return self.engine.stats() | self.stage.stats()

  def fail(self, error: EngineDeadError) -> None:
    """Fails the core from another thread (a multi-host follower died: the core's own thread
    may be waiting in a collective that never completes). Every open stream gets the error."""
    self._stopping.set()
    self._inbox.put(_STOP)  # should the core's thread still run, it aborts everything and stops
    self._die(error)

  def _die(self, error: EngineDeadError) -> None:
    with self._dying:
      if self.error is not None:  # failed already (fail, then the core thread's own end)
        return
      self.error = error
    if self._publish is not None:  # multi-host: the followers stop too (best effort)
      with contextlib.suppress(Exception):
        self._publish([["stop"]])
    self.ready.set()  # nobody waits forever for a warm-up that failed
    self._on_dead(error)  # fails whatever is still open, adds that raced the stop included
