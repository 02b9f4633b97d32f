"""The engine core: one thread that owns an `Engine` and is the only code that touches it.

Other threads talk to it through an inbox (add, abort) and hear from it through callbacks, so
nobody ever waits for a step, a compile or the warm-up (vLLM v1's EngineCore has this shape).
Each turn of the loop drains the inbox, runs one step and hands the step's deltas to
`on_deltas`. A failure anywhere in the loop is final: the core marks itself dead and calls
`on_dead` once, so the front end can fail every open stream; later adds raise EngineDeadError.
Shutdown ends the same way, after aborting every request.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Callable, Sequence

from engine.engine import Engine
from engine.output import RequestDelta
from engine.sampling import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
  """The engine core has stopped (a failed step, or shutdown); no request can be served."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Add:
  request_id: str
  token_ids: list[int]
  params: SamplingParams
  arrival: float  # time.perf_counter()


@dataclasses.dataclass(frozen=True, slots=True)
class _Abort:
  request_id: str


_STOP = object()


class EngineCore:
  """Runs `engine` on a thread of its own; `warmup` compiles every step shape first."""

  def __init__(
    self,
    engine: Engine,
    on_deltas: Callable[[list[RequestDelta]], None],
    on_dead: Callable[[EngineDeadError], None],
    *,
    warmup: bool = False,
    step_hook: Callable[[], None] | None = None,
  ):
    """on_deltas and on_dead run on the core thread and must not block. step_hook runs before
    every step; an exception from it fails the core as a failed step would (tests inject
    faults through it)."""
    self.engine = engine
    self._on_deltas, self._on_dead, self._step_hook = on_deltas, on_dead, step_hook
    self._inbox: queue.SimpleQueue = queue.SimpleQueue()
    self.error: EngineDeadError | None = None
    self.ready = threading.Event()  # set once warm-up is done and the loop runs
    self._stopping = threading.Event()  # cuts a warm-up short
    self._stats = engine.stats()  # replaced, never mutated: readers need no lock
    self._thread = threading.Thread(
      target=self._run, args=(warmup,), name="meshserve-engine-core", daemon=True
    )
    self._thread.start()

  def add(
    self, request_id: str, token_ids: Sequence[int], params: SamplingParams, arrival: float
  ) -> None:
    """Queues a request that `engine.validate` accepted. Never blocks."""
    if self.error is not None:
      raise EngineDeadError(str(self.error))
    self._inbox.put(_Add(request_id, list(token_ids), params, arrival))

  def abort(self, request_id: str) -> None:
    """Stops a request wherever it is and frees its pages. Never blocks; unknown ids are
    ignored (the request may have just finished)."""
    self._inbox.put(_Abort(request_id))

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
        self.engine.runner.warmup(cancel=self._stopping)
        self._stats = self.engine.stats()
      self.ready.set()
      while self._turn():
        pass
      error = EngineDeadError("the engine is shut down")
    except BaseException as e:  # noqa: BLE001 - any failure is reported, never swallowed
      log.exception("engine core failed; failing every open request")
      error = EngineDeadError(f"the engine failed: {type(e).__name__}: {e}")
    self._die(error)

  def _turn(self) -> bool:
    """Drains the inbox and runs one step; False once told to stop."""
    # Block only while idle: a busy engine just looks at the inbox between steps.
    messages = [] if self.engine.has_unfinished() else [self._inbox.get()]
    while True:
      try:
        messages.append(self._inbox.get_nowait())
      except queue.Empty:
        break
    deltas = []
    for m in messages:
      if m is _STOP:
        deltas += [self.engine.abort(rid) for rid in list(self.engine.requests)]
        self._on_deltas(deltas)
        return False
      if isinstance(m, _Add):
        self.engine.add_request(m.token_ids, m.params, m.request_id, arrival=m.arrival)
      elif (delta := self.engine.abort(m.request_id)) is not None:
        deltas.append(delta)
    if self.engine.has_unfinished():
      if self._step_hook is not None:
        self._step_hook()
      deltas += self.engine.step()
    self._stats = self.engine.stats()
    if deltas:
      self._on_deltas(deltas)
    return True

  def _die(self, error: EngineDeadError) -> None:
    self.error = error
    self.ready.set()  # nobody waits forever for a warm-up that failed
    self._on_dead(error)  # fails whatever is still open, adds that raced the stop included
