"""The streaming API the server uses: an `Engine` stepped by a background thread.

    engine = AsyncEngine(Engine(model, config))
    async for out in engine.generate("Hello", SamplingParams(max_tokens=16)):
      print(out.new_text, end="")

Each `generate` is an async iterator of `RequestOutput` updates; the last has a finish_reason.
Leaving the loop early (a cancelled task, a client that disconnected) aborts the request and
frees its pages at once. `add_request` validates synchronously and raises ValueError naming
the offending field.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Sequence

from engine.engine import Engine
from engine.output import RequestOutput
from engine.sampling import SamplingParams

log = logging.getLogger(__name__)


class AsyncEngine:
  def __init__(self, engine: Engine):
    self.engine = engine
    self._cv = threading.Condition()  # guards the engine and `_streams`
    self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
    self._stopping = False
    self._thread = threading.Thread(target=self._run, name="meshserve-engine", daemon=True)
    self._thread.start()

  def add_request(
    self,
    prompt: str | Sequence[int],
    params: SamplingParams | None = None,
    request_id: str | None = None,
    *,
    loop: asyncio.AbstractEventLoop | None = None,
  ) -> tuple[str, asyncio.Queue]:
    """Queues a request; its outputs arrive on the returned asyncio queue (of `loop`, by
    default the running one). Thread-safe; waits at most one engine step for the lock."""
    loop = loop or asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    with self._cv:
      if self._stopping:
        raise RuntimeError("the engine is shut down")
      request_id = self.engine.add_request(prompt, params, request_id)
      self._streams[request_id] = (loop, queue)
      self._cv.notify()
    return request_id, queue

  def abort(self, request_id: str) -> None:
    """Stops the request and returns its pages; its stream ends with finish_reason "abort"."""
    with self._cv:
      out = self.engine.abort(request_id)
    if out is not None:
      self._deliver(out)

  async def generate(
    self,
    prompt: str | Sequence[int],
    params: SamplingParams | None = None,
    request_id: str | None = None,
  ) -> AsyncIterator[RequestOutput]:
    loop = asyncio.get_running_loop()
    request_id, queue = await asyncio.to_thread(
      self.add_request, prompt, params, request_id, loop=loop
    )
    finished = False
    try:
      while not finished:
        out = await queue.get()
        if isinstance(out, BaseException):
          raise out
        finished = out.finished
        yield out
    finally:
      if not finished:  # the consumer left early: nobody wants the rest
        await asyncio.to_thread(self.abort, request_id)

  def stats(self) -> dict[str, int]:
    with self._cv:
      return self.engine.stats()

  def shutdown(self) -> None:
    """Stops the loop thread; unfinished requests are aborted."""
    with self._cv:
      self._stopping = True
      self._cv.notify()
    self._thread.join()
    with self._cv:
      outs = [self.engine.abort(rid) for rid in list(self.engine.requests)]
    for out in outs:
      self._deliver(out)

  def _run(self) -> None:
    while True:
      with self._cv:
        self._cv.wait_for(lambda: self._stopping or self.engine.has_unfinished())
        if self._stopping:
          return
        try:
          outputs = self.engine.step()
        except Exception as e:  # a bug in a step must not leave callers hanging
          log.exception("engine step failed; aborting its requests")
          failed = list(self.engine.requests)
          for request_id in failed:
            self.engine.abort(request_id)
          outputs = [(request_id, e) for request_id in failed]
      for out in outputs:
        self._deliver(out)

  def _deliver(self, out: RequestOutput | tuple[str, BaseException]) -> None:
    request_id, item = out if isinstance(out, tuple) else (out.request_id, out)
    done = isinstance(item, BaseException) or item.finished
    with self._cv:
      target = self._streams.pop(request_id, None) if done else self._streams.get(request_id)
    if target is not None:
      loop, queue = target
      loop.call_soon_threadsafe(queue.put_nowait, item)
