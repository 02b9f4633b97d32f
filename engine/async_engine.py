"""The streaming front end the server uses, over an `EngineCore` thread.

    engine = AsyncEngine(Engine(model, config))
    async for delta in engine.generate("Hello", SamplingParams(max_tokens=16)):
      print(delta.new_text, end="")

The front end tokenizes and validates on the caller's side, gives each request an internal id
(so a client's id can be reused the moment its stream ends), and routes the core's deltas to
per-request asyncio queues, one loop wake-up per step. Nothing here waits for a step.

`generate` raises, before or while streaming:
- ValueError, naming the field, for input the engine cannot serve;
- RequestIdInUseError when the client's request id is already streaming;
- QueueFullError when `max_queue` requests already wait beyond the batch;
- TimeoutError at the deadline;
- EngineDeadError when the core has failed or shut down.
Leaving the loop early (a cancelled task, a client that disconnected, a deadline) aborts the
request wherever it is and frees its pages.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence

import numpy as np

from meshserve.engine import lockstep
from meshserve.engine.api import (  # noqa: F401 - re-exported
  ConstraintError,
  EngineInfo,
  QueueFullError,
  RequestIdInUseError,
  RequestTiming,
  Role,
  StageStats,
  new_request_id,
)
from meshserve.engine.config import EngineConfig
from meshserve.engine.core import EngineCore, EngineDeadError
from meshserve.engine.engine import Engine
from meshserve.engine.handoff import CoreEvent, Handoff, KVFetch, Landed, StageFailed
from meshserve.engine.output import OutputProcessor, RequestDelta
from meshserve.engine.request import RequestState, TokenDelta
from meshserve.engine.sampling import SamplingParams
from meshserve.models import Model, ModelConfig


@dataclasses.dataclass(frozen=True, slots=True)
class _Stream:
  client_id: str
  loop: asyncio.AbstractEventLoop
  queue: asyncio.Queue  # TokenDelta and core events, then nothing; or an exception
  num_prompt_tokens: int


CONSTRAINT_COMPILE_TIMEOUT = 10.0  # seconds a request's constraint may take to compile
_ABORTED = object()  # put in a stream's queue by `abort`: the stream ends there


class AsyncEngine:
  def __init__(
    self,
    engine: Engine,
    *,
    max_queue: int | None = None,
    warmup: bool = False,
    on_dead: Callable[[EngineDeadError], None] | None = None,
    publish: lockstep.Publisher | None = None,
  ):
    """max_queue: how many requests may wait beyond the engine's max_batch before new ones get
    QueueFullError (None: no limit). warmup: compile every step shape before the first step
    (`ready` is set when done). on_dead: called (on the core's
    thread) once the engine has failed or shut down, after every open stream has been told.
    publish: multi-host, process 0: each core turn goes to the followers (engine/lockstep.py)."""
    self.engine, self.tokenizer = engine, engine.tokenizer
    self.max_queue = max_queue
    self._notify_dead = on_dead
    self._lock = threading.Lock()  # guards the two maps below; never held across a step
    self._streams: dict[str, _Stream] = {}  # internal id -> stream, until its last delta
    self._client_ids: set[str] = set()  # streaming now, until the consumer is done
    self._ids = itertools.count()
    self.core = EngineCore(engine, self._on_deltas, self._on_dead, warmup=warmup, publish=publish)

  @property
  def ready(self) -> threading.Event:
    """Set once the warm-up is done (or has failed: check `error`)."""
    return self.core.ready

  @property
  def error(self) -> EngineDeadError | None:
    return self.core.error

  @property
  def role(self) -> Role:
    return self.engine.role

  @property
  def config(self) -> EngineConfig:
    return self.engine.config

  @property
  def model_config(self) -> ModelConfig:
    return self.engine.model.config

  @property
  def info(self) -> EngineInfo:
    return engine_info([self.engine.model], self.engine.config, self.max_queue)

  def stages(self) -> list[StageStats]:
    """Each stage's stats: here the one engine's."""
    return [StageStats.of(self.role, self.role, self.stats())]

  async def abort(self, request_id: str) -> bool:
    """Ends the request streaming under the client id `request_id`: its stream's last delta
    has finish_reason "abort" and its pages are freed. False when no such request streams."""
    with self._lock:
      found = next(((i, s) for i, s in self._streams.items() if s.client_id == request_id), None)
    if found is None or self.core.error is not None:
      return False
    internal, stream = found
    self.core.abort(internal)  # its pages go back at the core's next turn, wherever it is
    # The stream ends here whatever the core reports (a request whose KV is still on its way
    # reports nothing), and the consumer's loop hears it at once.
    with contextlib.suppress(RuntimeError):  # its loop is closed: nobody is listening
      stream.loop.call_soon_threadsafe(stream.queue.put_nowait, _ABORTED)
    return True

  def encode(self, text: str) -> list[int]:
    """A text prompt's ids: BOS first where the tokenizer's metadata asks for it."""
    return self.tokenizer.encode(text, add_special_tokens=True)

  def encode_chat(self, messages: Sequence[dict[str, str]]) -> tuple[str, list[int]]:
    """(templated text, its token ids) of a conversation, generation prompt added."""
    text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return text, self.tokenizer.encode(text)

  async def generate(
    self,
    prompt: str | Sequence[int],
    params: SamplingParams | None = None,
    request_id: str | None = None,
    *,
    deadline: float | None = None,
    cache_salt: str = "",
  ) -> AsyncIterator[RequestDelta | Handoff]:
    """Streams the request's deltas; the last has a finish_reason. deadline: the running
    loop's `time()` by which the request must be done. Without a request_id the request gets
    a random one (`new_request_id`). cache_salt: the request shares prefix-cache pages only
    with requests of the same salt.

    On a prefill-role engine the stream stops after the first token's delta with a `Handoff`
    (unless that token finished the request). The request's pages stay pinned until the
    caller passes the Handoff to `release`, which it must do however it goes on."""
    params = params or SamplingParams()
    arrival = time.perf_counter()
    ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    self.engine.validate(ids, params)
    matcher = None if params.constraint is None else await self._constrain(params)
    request_id = request_id or new_request_id()
    internal = f"{request_id}#{next(self._ids)}"
    submit = functools.partial(self.core.add, internal, ids, params, arrival, cache_salt, matcher)
    output = OutputProcessor(self.tokenizer, params, arrival=arrival)
    async for event in self._stream(internal, request_id, len(ids), submit, output, deadline):
      yield event

  async def _constrain(self, params: SamplingParams, output_ids: Sequence[int] = ()):
    """The request's constraint compiled on an executor thread, never the engine's, within
    CONSTRAINT_COMPILE_TIMEOUT seconds (else ConstraintError; the compile runs out on its
    thread), its matcher advanced past `output_ids` (a request continued from another stage)."""
    loop = asyncio.get_running_loop()
    # The model's tokenizer view, built once (untimed: a second or more for a large vocabulary).
    await loop.run_in_executor(None, lambda: self.engine.grammars)
    compiling = loop.run_in_executor(None, self.engine.constrain, params, tuple(output_ids))
    try:
      return await asyncio.wait_for(compiling, CONSTRAINT_COMPILE_TIMEOUT)
    except TimeoutError:
      raise ConstraintError(
        f"constraint.{params.constraint.kind}: did not compile within "
        f"{CONSTRAINT_COMPILE_TIMEOUT:g}s"
      ) from None

  async def resume(
    self,
    state: RequestState,
    fetch: KVFetch,
    request_id: str | None = None,
    *,
    deadline: float | None = None,
  ) -> AsyncIterator[RequestDelta | Landed]:
    """Decode role: continues a request a prefill stage took to its first token. Streams
    `Landed` once its KV is in the pool, then its deltas from the second token on."""
    arrival = time.perf_counter()
    matcher = None
    if state.params.constraint is not None:  # rebuilt from the tokens the prefill stage chose
      matcher = await self._constrain(state.params, state.output_ids)
    request_id = request_id or new_request_id()
    internal = f"{request_id}#{next(self._ids)}"
    submit = functools.partial(self.core.import_request, internal, state, fetch, arrival, matcher)
    # The first token's text was shown by the prefill stage: it primes the detokenizer here.
    output = OutputProcessor(self.tokenizer, state.params, arrival=arrival,
                             output_ids=state.output_ids)  # fmt: skip
    prompt = len(state.prompt_ids)
    async for event in self._stream(internal, request_id, prompt, submit, output, deadline):
      yield event

  def release(self, handoff: Handoff) -> None:
    """Frees the pages a prefill stream's Handoff pinned (once the KV is copied out, or the
    request is dropped). Calling it twice is harmless."""
    if self.core.error is None:
      self.core.release(handoff.request_id)

  async def _stream(
    self, internal: str, request_id: str, num_prompt_tokens: int, submit,
    output: OutputProcessor, deadline,
  ):  # fmt: skip
    """The request's events as the consumer sees them: deltas with their text (made here, on
    the consumer's loop), ending at a stop string, whereupon the core aborts the request."""
    stream = _Stream(request_id, asyncio.get_running_loop(), asyncio.Queue(), num_prompt_tokens)
    self._open(internal, stream)
    finished = False
    try:
      submit()
      while not finished:
        # The deadline covers the waits only: a timeout scope must not span a `yield`, where
        # the consumer's own awaits run (and might run in another task).
        async with asyncio.timeout_at(deadline):
          item = await stream.queue.get()
        if isinstance(item, BaseException):
          raise item
        if isinstance(item, StageFailed):
          raise item.error
        if item is _ABORTED:
          item = TokenDelta(
            request_id=stream.client_id, new_token_ids=[], new_logprobs=None,
            finish_reason="abort", num_prompt_tokens=num_prompt_tokens, num_output_tokens=0,
            num_cached_tokens=0, timing=RequestTiming(),
          )  # fmt: skip
        if isinstance(item, TokenDelta):
          item = output.process(dataclasses.replace(item, request_id=stream.client_id))
          if item is None:  # the core ran past a stop string, and its abort is on the way
            continue
        finished = item.final
        if isinstance(item, Handoff):
          # The pinned pages become the consumer's to release, before it can be interrupted.
          with self._lock:
            self._streams.pop(internal, None)
        yield item
    finally:
      with self._lock:
        open_in_core = self._streams.pop(internal, None) is not None
        self._client_ids.discard(stream.client_id)
      if open_in_core and self.core.error is None:
        self.core.abort(internal)  # a stop string, or the consumer left: nobody wants the rest

  def stats(self) -> dict[str, int]:
    """The engine's counters after its last step, plus `open`: requests accepted and not yet
    finished, and `waiting`: those of them not running."""
    stats = dict(self.core.stats())
    with self._lock:
      stats["open"] = len(self._streams)
    stats["waiting"] = max(stats["open"] - stats["running"], 0)
    return stats

  def shutdown(self, timeout: float | None = None) -> None:
    """Stops the core; open streams end with finish_reason "abort"."""
    self.core.shutdown(timeout)

  def check_queue(self) -> None:
    """Raises QueueFullError (or EngineDeadError) if a request arriving now would be refused:
    a caller checks before the costly work of tokenizing it."""
    with self._lock:
      self._check_queue()

  def _check_queue(self) -> None:
    if self.core.error is not None:
      raise EngineDeadError(str(self.core.error))
    limit = None if self.max_queue is None else self.engine.config.max_batch + self.max_queue
    # Handed-off requests whose pages are still pinned count too: they hold pages as a running
    # request does, however long the decode side takes.
    held = len(self._streams) + self.core.stats().get("pinned", 0)
    if limit is not None and held >= limit:
      raise QueueFullError(
        f"the queue is full: {held} requests in flight, at most "
        f"{self.engine.config.max_batch} running and {self.max_queue} waiting"
      )

  def _open(self, internal: str, stream: _Stream) -> None:
    with self._lock:
      if stream.client_id in self._client_ids:
        raise RequestIdInUseError(f"request_id: {stream.client_id!r} is already in flight")
      self._check_queue()
      self._streams[internal] = stream
      self._client_ids.add(stream.client_id)

  def _on_deltas(self, deltas: list[CoreEvent]) -> None:
    """Core thread: every event the core reports, routed to its stream; one
    call_soon_threadsafe per event loop, whatever the batch size."""
    by_loop = collections.defaultdict(list)
    with self._lock:
      for event in deltas:
        # A Handoff's stream stays open until its consumer has it: should the consumer leave
        # first, the abort on its way out frees the pinned pages.
        last = event.final and not isinstance(event, Handoff)
        get = self._streams.pop if last else self._streams.get
        stream = get(event.request_id, None)
        if stream is not None:
          by_loop[stream.loop].append((stream, event))
    for loop, items in by_loop.items():
      self._post(loop, items)

  def _on_dead(self, error: EngineDeadError) -> None:
    """Core thread: every open stream ends with the error, after `on_dead` has heard of it (so
    a caller who sees the error and asks health already hears NOT_SERVING)."""
    if self._notify_dead is not None:
      self._notify_dead(error)
    by_loop = collections.defaultdict(list)
    with self._lock:
      for stream in self._streams.values():
        by_loop[stream.loop].append((stream, error))
      self._streams.clear()
    for loop, items in by_loop.items():
      self._post(loop, items)

  def _post(self, loop: asyncio.AbstractEventLoop, items: list) -> None:
    def put_all():
      for stream, item in items:
        stream.queue.put_nowait(item)

    try:
      loop.call_soon_threadsafe(put_all)
    except RuntimeError:  # the consumer's event loop is closed: nobody is listening
      for stream, item in items:
        with self._lock:
          self._client_ids.discard(stream.client_id)
          if not isinstance(item, BaseException):
            self._streams.pop(item.request_id, None)
        if isinstance(item, Handoff):
          self.release(item)
        elif not isinstance(item, BaseException) and not item.final:
          self.core.abort(item.request_id)


def engine_info(models: Sequence[Model], config: EngineConfig, max_queue: int | None) -> EngineInfo:
  """What a server reports of an engine over `models` (one, or one per stage)."""
  layouts = [str(m.layout) if m.layout is not None else "single device" for m in models]
  if len(models) > 1:
    layouts = [f"{role} {name}" for role, name in zip(("prefill", "decode"), layouts, strict=True)]
  first = models[0]
  return EngineInfo(
    model=first.config.name,
    vocab_size=first.config.vocab_size,
    eos_token_ids=tuple(sorted(first.config.eos_token_ids)),
    config=config,
    max_queue=max_queue,
    layout=", ".join(layouts),
    num_devices=sum(1 if m.mesh is None else m.mesh.size for m in models),
    platform=first.platform,
    attention=first.attention.kind,
    dtype=np.dtype(first.config.dtype).name,
  )
