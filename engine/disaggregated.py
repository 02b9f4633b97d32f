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
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence

import numpy as np

from meshserve.engine.api import (
  EngineDeadError,
  EngineInfo,
  KVTicket,
  Landed,
  RequestDelta,
  RequestIdInUseError,
  RequestTiming,
  Role,
  SamplingParams,
  StageStats,
  new_request_id,
)
from meshserve.engine.async_engine import AsyncEngine, engine_info
from meshserve.engine.config import EngineConfig
from meshserve.engine.engine import Engine
from meshserve.engine.handoff import Handoff
from meshserve.engine.request import RequestState
from meshserve.engine.transfer import Offer, TransferServer, kv_head_shards
from meshserve.models import ModelConfig

_END = object()
_ABORTED = object()  # put in a request's queue by `abort`


def _aborted(request_id: str, last: RequestDelta | None) -> RequestDelta:
  """The last delta of an aborted request, counting what its stream has shown."""
  return RequestDelta(
    request_id=request_id, new_token_ids=[], new_text="", new_logprobs=None,
    finish_reason="abort", num_prompt_tokens=last.num_prompt_tokens if last else 0,
    num_output_tokens=last.num_output_tokens if last else 0,
    num_cached_tokens=last.num_cached_tokens if last else 0, timing=RequestTiming(),
  )  # fmt: skip


class DisaggregatedEngine:
  def __init__(
    self,
    prefill: Engine,
    decode: Engine,
    *,
    max_queue: int | None = None,
    warmup: bool = False,
    on_dead: Callable[[EngineDeadError], None] | None = None,
  ):
    """max_queue bounds the prefill stage's queue; warmup and on_dead are as for
    AsyncEngine, for both stages (on_dead fires once, for the first stage that fails)."""
    if (prefill.role, decode.role) != ("prefill", "decode"):
      raise ValueError(f"roles: expected prefill and decode, got {prefill.role}, {decode.role}")
    for name in ("page_size", "max_model_len"):
      if getattr(prefill.config, name) != getattr(decode.config, name):
        raise ValueError(f"{name}: the prefill and decode stages must agree")
    self._notify_dead, self._dead_once = on_dead, threading.Lock()
    self._told = False
    kw = dict(warmup=warmup, on_dead=self._on_dead)
    self.prefill = AsyncEngine(prefill, max_queue=max_queue, **kw)
    self.decode = AsyncEngine(decode, **kw)
    self.tokenizer = self.prefill.tokenizer
    # In flight in either stage, by client id: its task (both stages) and its stream's queue.
    self._pumps: dict[str, tuple[asyncio.Task, asyncio.Queue]] = {}
    self.ready = threading.Event()  # set once both stages are warm (or one has failed)
    threading.Thread(target=self._wait_ready, name="meshserve-stages-ready", daemon=True).start()

  @property
  def error(self) -> EngineDeadError | None:
    return self.prefill.error or self.decode.error

  role = Role.DISAGGREGATED

  @property
  def config(self) -> EngineConfig:
    return self.prefill.config

  @property
  def info(self) -> EngineInfo:
    models = [stage.engine.model for stage in (self.prefill, self.decode)]
    return engine_info(models, self.config, self.max_queue)

  async def abort(self, request_id: str) -> bool:
    """Ends the request streaming under `request_id`, in whichever stage it is (or between
    them): its stream's last delta has finish_reason "abort"; both stages free its pages."""
    pump = self._pumps.get(request_id)
    if pump is None:
      return False
    task, queue = pump
    loop = task.get_loop()
    with contextlib.suppress(RuntimeError):  # its loop is closed: nobody is listening
      loop.call_soon_threadsafe(queue.put_nowait, _ABORTED)
      loop.call_soon_threadsafe(task.cancel)  # closes whichever stage streams: pages freed
    return True

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
    if request_id in self._pumps:
      raise RequestIdInUseError(f"request_id: {request_id!r} is already in flight")
    request_id = request_id or new_request_id()  # one id across both stages
    # The stages run in a task of their own, so the KV moves on as soon as the first token is
    # out, however slowly the caller reads.
    queue: asyncio.Queue = asyncio.Queue()
    task = asyncio.create_task(self._pump(prompt, params, request_id, deadline, cache_salt, queue))
    self._pumps[request_id] = (task, queue)
    last = None
    try:
      while (item := await queue.get()) is not _END:
        if isinstance(item, BaseException):
          raise item
        if item is _ABORTED:
          yield _aborted(request_id, last)
          return
        last = item
        yield item
    finally:
      self._pumps.pop(request_id, None)
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
    for stage in (self.prefill, self.decode):
      for key, value in stage.stats().items():
        out[key] = out.get(key, 0) + value
    return out

  def check_queue(self) -> None:
    """As AsyncEngine.check_queue, for the prefill stage's queue."""
    if self.decode.error is not None:
      raise EngineDeadError(str(self.decode.error))
    self.prefill.check_queue()

  def stages(self) -> list[StageStats]:
    return [*self.prefill.stages(), *self.decode.stages()]

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


_ADDRESS = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})")  # host:port


class StageWorkerEngine(AsyncEngine):
  """One stage of a disaggregated pair in a process of its own (`StageWorker`): the KV crosses
  processes through this process's `TransferServer`, named by a `KVTicket`.

  - `prefill` (prefill role) runs a request to its first token, offers its KV for one pull and
    yields the ticket. The pages stay pinned until `release_kv`, or until the stream is closed;
    an offer nobody pulled is then withdrawn.
  - `decode` (decode role) checks a ticket as strictly as the public API checks a request (it
    may come from anyone who reached the port), reserves pages, pulls the KV straight into its
    own layout, then streams `Landed` and the rest of the request.
  """

  def __init__(self, engine: Engine, *, transfer_host: str = "127.0.0.1", **kw):
    super().__init__(engine, **kw)
    self.transfers = TransferServer(transfer_host)
    self.transfer_address = self.transfers.address
    runner = engine.runner
    self.kv_shards = kv_head_shards(runner.kv_sharding, runner.kv_shape(1))
    self._held: dict[int, list] = {}  # transfer id -> [handoff, offer or None once pulled]

  async def prefill(
    self,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    request_id: str | None,
    *,
    kv_shards: int,
    deadline: float | None = None,
    cache_salt: str = "",
  ) -> AsyncIterator[RequestDelta | KVTicket]:
    if kv_shards < 1:
      raise ValueError(f"kv_shards: must be positive, got {kv_shards}")
    handoff = key = None
    stream = self.generate(prompt_ids, params, request_id, deadline=deadline, cache_salt=cache_salt)
    try:
      async with contextlib.aclosing(stream):
        async for event in stream:
          if isinstance(event, Handoff):
            handoff = event  # from here on, its pages are ours to release
          else:
            yield event
      if handoff is None:  # the first token finished the request
        return
      offer = self.transfers.offer(handoff.kv, kv_shards)  # dispatches only: no wait
      key = offer.transfer_id
      self._held[key] = [handoff, offer]  # from here on, an offer to withdraw unless pulled
      yield self._ticket(handoff, offer)
    finally:
      held = None if key is None else self._held.pop(key, None)
      if handoff is not None:
        self.release(handoff)
      if held is not None and held[1] is not None:  # never pulled: let the pieces go
        self.transfers.withdraw(held[1])

  def release_kv(self, ticket: KVTicket) -> None:
    """The decode side has pulled the ticket's KV: the prefill pages go back now."""
    held = self._held.get(ticket.transfer_id)
    if held is not None:
      held[1] = None  # pulled: nothing to withdraw
      self.release(held[0])

  async def decode(
    self, ticket: KVTicket, request_id: str | None, *, deadline: float | None = None
  ) -> AsyncIterator[RequestDelta | Landed]:
    if not self.ready.is_set():
      raise EngineDeadError("the worker is warming up")
    state, offer = self._check(ticket)
    # Connect here, not on the engine core's thread, which must never wait for a network.
    await asyncio.to_thread(self.transfers.connect, ticket.transfer_address)
    fetch = self.transfers.fetch(ticket.transfer_address, offer)
    stream = self.resume(state, fetch, request_id, deadline=deadline)
    async with contextlib.aclosing(stream):
      async for event in stream:
        yield event

  def _check(self, ticket: KVTicket) -> tuple[RequestState, Offer]:
    """The request state and KV offer of a ticket, every field checked; ValueError names the
    field as the hand-off message (stages.proto) does."""
    state = RequestState(
      prompt_ids=list(ticket.prompt_token_ids),
      output_ids=list(ticket.output_token_ids),
      params=ticket.params,
      seed=ticket.seed,
      num_cached_tokens=ticket.num_cached_tokens,
      cache_salt=ticket.cache_salt,
    )
    try:
      self.engine.validate_state(state)  # e.g. a smaller context than the prefill worker's
    except ValueError as e:
      raise ValueError(f"handoff.{e}") from None
    runner = self.engine.runner
    pool_dtype = np.dtype(runner.cache.k.dtype).name
    if ticket.dtype != pool_dtype:
      raise ValueError(f"handoff.dtype: {ticket.dtype!r}, this worker's KV pool holds {pool_dtype}")
    if ticket.num_pieces != self.kv_shards:
      raise ValueError(
        f"handoff.num_pieces: {ticket.num_pieces}, this worker's layout has {self.kv_shards} "
        "kv-head shards (StageInfo.kv_shards)"
      )
    pages = -(-len(state.prompt_ids) // self.engine.config.page_size)
    want = runner.packed.piece_shape(len(runner.page_list([0] * pages)), self.kv_shards)
    if tuple(ticket.piece_shape) != want:
      raise ValueError(
        f"handoff.piece_shape: {list(ticket.piece_shape)}, expected {list(want)} for "
        f"{len(state.prompt_ids)} prompt tokens"
      )
    match = _ADDRESS.fullmatch(ticket.transfer_address)
    if match is None or not 0 < int(match[1]) < 65536:
      raise ValueError(
        f"handoff.transfer_address: {ticket.transfer_address[:100]!r} is not host:port"
      )
    return state, Offer(ticket.transfer_id, want, np.dtype(pool_dtype), ticket.num_pieces)

  def _ticket(self, handoff: Handoff, offer: Offer) -> KVTicket:
    state, t = handoff.state, handoff.timing
    return KVTicket(
      transfer_address=self.transfers.address,
      transfer_id=offer.transfer_id,
      piece_shape=tuple(offer.piece_shape),
      dtype=offer.dtype.name,
      num_pieces=offer.num_pieces,
      prompt_token_ids=tuple(state.prompt_ids),
      output_token_ids=tuple(state.output_ids),
      params=state.params,
      seed=state.seed,
      num_cached_tokens=state.num_cached_tokens,
      cache_salt=state.cache_salt,
      queued_s=t.queued_s or 0.0,
      first_token_s=t.first_token_s or 0.0,
    )
