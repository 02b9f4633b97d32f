"""Prefill and decode as separate stages in one process, each on its own mesh.

    engine = DisaggregatedEngine(Engine(prefill_model, cfg, role="prefill"),
                                 Engine(decode_model, cfg, role="decode"))
    async for delta in engine.generate("Hello", SamplingParams(max_tokens=16)): ...

It has the streaming API of `AsyncEngine`, so the server serves either. Each request runs on
the prefill core to its first token (streamed at once), then its state and KV go to the
decode core: the decode core reserves pages, the KV crosses by `jax.device_put` from the
prefill layout into the decode layout, and the prefill pages are released once it has landed.
A long prompt therefore never holds up a decode step, and each stage runs its own layout.
Leaving the stream at any point (cancel, deadline, disconnect) frees the pages on both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence

from meshserve.engine.async_engine import AsyncEngine, RequestIdInUseError, new_request_id
from meshserve.engine.config import EngineConfig
from meshserve.engine.core import EngineDeadError
from meshserve.engine.engine import Engine
from meshserve.engine.handoff import Handoff, Landed
from meshserve.engine.output import RequestDelta, RequestTiming
from meshserve.engine.sampling import SamplingParams
from meshserve.models import ModelConfig

_END = object()


class DisaggregatedEngine:
  def __init__(
    self,
    prefill: Engine,
    decode: Engine,
    *,
    max_queue: int | None = None,
    warmup: bool = False,
    step_hook: Callable[[], None] | None = None,
    on_dead: Callable[[EngineDeadError], None] | None = None,
  ):
    """max_queue bounds the prefill stage's queue; warmup, step_hook and on_dead are as for
    AsyncEngine, for both stages (on_dead fires once, for the first stage that fails)."""
    if (prefill.role, decode.role) != ("prefill", "decode"):
      raise ValueError(f"roles: expected prefill and decode, got {prefill.role}, {decode.role}")
    for name in ("page_size", "max_model_len"):
      if getattr(prefill.config, name) != getattr(decode.config, name):
        raise ValueError(f"{name}: the prefill and decode stages must agree")
    self._notify_dead, self._dead_once = on_dead, threading.Lock()
    self._told = False
    kw = dict(warmup=warmup, step_hook=step_hook, on_dead=self._on_dead)
    self.prefill = AsyncEngine(prefill, max_queue=max_queue, **kw)
    self.decode = AsyncEngine(decode, **kw)
    self.tokenizer = self.prefill.tokenizer
    self._client_ids: set[str] = set()  # in flight in either stage
    self.ready = threading.Event()  # set once both stages are warm (or one has failed)
    threading.Thread(target=self._wait_ready, name="meshserve-stages-ready", daemon=True).start()

  @property
  def error(self) -> EngineDeadError | None:
    return self.prefill.error or self.decode.error

  role = "disaggregated"

  @property
  def config(self) -> EngineConfig:
    return self.prefill.config

  @property
  def model_config(self) -> ModelConfig:
    return self.prefill.model_config

  @property
  def max_queue(self) -> int | None:
    return self.prefill.max_queue

  def encode(self, text: str) -> list[int]:
    return self.prefill.encode(text)

  def encode_chat(self, messages: Sequence[dict[str, str]]) -> tuple[str, list[int]]:
    return self.prefill.encode_chat(messages)

  async def generate(
    self,
    prompt: str | Sequence[int],
    params: SamplingParams | None = None,
    request_id: str | None = None,
    *,
    deadline: float | None = None,
    cache_salt: str = "",
  ) -> AsyncIterator[RequestDelta]:
    """As AsyncEngine.generate; the last delta's timing has the KV's transfer time."""
    if request_id in self._client_ids:
      raise RequestIdInUseError(f"request_id: {request_id!r} is already in flight")
    request_id = request_id or new_request_id()  # one id across both stages
    self._client_ids.add(request_id)
    # The stages run in a task of their own, so the KV moves on as soon as the first token is
    # out, however slowly the caller reads.
    queue: asyncio.Queue = asyncio.Queue()
    task = asyncio.create_task(self._pump(prompt, params, request_id, deadline, cache_salt, queue))
    try:
      while (item := await queue.get()) is not _END:
        if isinstance(item, BaseException):
          raise item
        yield item
    finally:
      self._client_ids.discard(request_id)
      task.cancel()  # a no-op once it is done; else its stages abort and free their pages
      with contextlib.suppress(asyncio.CancelledError):
        await task

  async def _pump(self, prompt, params, request_id, deadline, salt, queue) -> None:
    try:
      async for delta in self._generate(prompt, params, request_id, deadline, salt):
        queue.put_nowait(delta)
      queue.put_nowait(_END)
    except Exception as e:  # noqa: BLE001 - the caller raises it
      queue.put_nowait(e)

  async def _generate(self, prompt, params, request_id, deadline, salt):
    arrival, first, handoff = time.perf_counter(), None, None
    try:
      prefill = self.prefill.generate(
        prompt, params, request_id, deadline=deadline, cache_salt=salt
      )
      async with contextlib.aclosing(prefill):
        async for event in prefill:
          if isinstance(event, Handoff):
            handoff = event  # from here on, its pages are ours to release
          else:
            first = event
            yield event
      if handoff is None:  # the first token finished it
        return
      transfer = None
      decode = self.decode.resume(handoff.state, handoff.fetch, request_id, deadline=deadline)
      async with contextlib.aclosing(decode):
        async for event in decode:
          if isinstance(event, Landed):
            self.prefill.release(handoff)  # the decode pool has the KV now
            transfer = event.seconds
            continue
          if event.finished:
            timing = RequestTiming(
              queued_s=first.timing.queued_s,
              first_token_s=first.timing.first_token_s,
              finished_s=time.perf_counter() - arrival,
              transfer_s=transfer,
            )
            event = dataclasses.replace(event, timing=timing)
          yield event
    finally:
      if handoff is not None:  # whatever happened, the prefill pages go back
        self.prefill.release(handoff)

  def stats(self) -> dict[str, int]:
    """The two stages' counters added up (per stage: `stages`)."""
    out: dict = {}
    for _, stats in self.stages():
      for key, value in stats.items():
        out[key] = out.get(key, 0) + value
    return out

  def check_queue(self) -> None:
    """As AsyncEngine.check_queue, for the prefill stage's queue."""
    if self.decode.error is not None:
      raise EngineDeadError(str(self.decode.error))
    self.prefill.check_queue()

  def stages(self) -> list[tuple[str, dict]]:
    return [("prefill", self.prefill.stats()), ("decode", self.decode.stats())]

  def shutdown(self, timeout: float | None = None) -> None:
    self.prefill.shutdown(timeout)
    self.decode.shutdown(timeout)

  def _wait_ready(self) -> None:
    for stage in (self.prefill, self.decode):
      stage.ready.wait()
      if stage.error is not None:
        break
    self.ready.set()

  def _on_dead(self, error: EngineDeadError) -> None:
    """Either stage failing fails the engine: the other stage is shut down too."""
    with self._dead_once:
      told, self._told = self._told, True
    if told:
      return
    if self._notify_dead is not None:
      self._notify_dead(error)
    self.ready.set()
    for stage in (self.prefill, self.decode):
      if stage.error is None:
        threading.Thread(target=stage.shutdown, daemon=True).start()
