"""`meshserve serve --role prefill|decode`: a stage worker behind a router.

A worker serves the internal `meshserve.v1.StageWorker` service (stages.proto) beside the
public Inference service (Tokenize and GetModelInfo; Generate goes to the router):

- `Prefill` (prefill worker) validates the request exactly as Generate does, runs it to its
  first token, offers its KV on this process's transfer server and sends a Handoff naming the
  offer. The stream holds the request's pages pinned until the router sends `release` (the KV
  has landed) or the stream ends any other way; an offer nobody pulled is then withdrawn.
- `Decode` (decode worker) reserves pages, pulls the offer straight into its own layout,
  reports `landed` and streams the rest of the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

import grpc
import numpy as np

from meshserve.engine import AsyncEngine, EngineDeadError
from meshserve.engine.handoff import Handoff, Landed
from meshserve.engine.request import RequestState
from meshserve.engine.transfer import HEADS, Offer, TransferServer, kv_head_shards
from meshserve.server.proto.meshserve.v1 import stages_pb2 as spb
from meshserve.server.proto.meshserve.v1 import stages_pb2_grpc
from meshserve.server.servicer import (
  InferenceServicer,
  InvalidArgument,
  deadline_of,
  response_proto,
  sampling_of,
  sampling_proto,
  stage_stats,
  status_of,
)

log = logging.getLogger("meshserve.stages")

SERVICE = spb.DESCRIPTOR.services_by_name["StageWorker"].full_name


class HandoffTimeout(TimeoutError):
  """A prefill worker's hand-off was not taken in time."""


_ADDRESS = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})")  # host:port


class StageServicer(stages_pb2_grpc.StageWorkerServicer):
  def __init__(
    self,
    engine: AsyncEngine,
    public: InferenceServicer,
    transfers: TransferServer,
    *,
    handoff_timeout: float = 30.0,
  ):
    self.engine, self.public, self.transfers = engine, public, transfers
    self.handoff_timeout = handoff_timeout
    runner = engine.engine.runner
    self.kv_shards = kv_head_shards(runner.kv_sharding, runner.kv_shape(1))

  async def Prefill(self, request_iterator, context: grpc.aio.ServicerContext):
    if self.engine.role != "prefill":
      await context.abort(
        grpc.StatusCode.FAILED_PRECONDITION, f"this is a {self.engine.role} worker"
      )
    handoff = offer = None
    try:
      message = await anext(aiter(request_iterator), None)
      if message is None or not message.HasField("request"):
        raise InvalidArgument("request: the first message must carry the request")
      kv_shards = message.request.kv_shards
      if kv_shards < 1:
        raise InvalidArgument(f"kv_shards: must be positive, got {kv_shards}")
      request = message.request.request
      ids, params = await self.public.parse(request)
      stream = self.engine.generate(
        ids, params, request.request_id or None, deadline=deadline_of(context),
        cache_salt=request.cache_salt,
      )  # fmt: skip
      async with contextlib.aclosing(stream):
        async for event in stream:
          if isinstance(event, Handoff):
            handoff = event
          elif event.finish_reason == "abort":
            raise EngineDeadError("the request was aborted: the worker is shutting down")
          else:
            yield spb.PrefillEvent(first=response_proto(event))
      if handoff is None:  # the first token finished the request
        return
      offer = self.transfers.offer(handoff.kv, kv_shards)  # dispatches only: no await
      yield spb.PrefillEvent(handoff=self._handoff(handoff, offer))
      # The pages stay pinned until the router says the KV has landed, or leaves, or the
      # hand-off times out.
      try:
        async with asyncio.timeout(self.handoff_timeout):
          async for message in request_iterator:
            if message.HasField("release"):
              offer = None  # pulled
              break
      except TimeoutError:
        raise HandoffTimeout(
          f"the decode side did not take the KV within {self.handoff_timeout:g}s "
          "(--handoff-timeout); its pages are released"
        ) from None
    except (asyncio.CancelledError, GeneratorExit):
      raise
    except Exception as e:
      code, text = status_of(e)
      await context.abort(code, text)
    finally:
      if handoff is not None:
        self.engine.release(handoff)
      if offer is not None:  # never pulled: let the transfer server drop the pieces
        self.transfers.withdraw(offer)

  async def Decode(self, request: spb.DecodeRequest, context: grpc.aio.ServicerContext):
    if self.engine.role != "decode":
      await context.abort(
        grpc.StatusCode.FAILED_PRECONDITION, f"this is a {self.engine.role} worker"
      )
    try:
      if not self.engine.ready.is_set():
        raise EngineDeadError("the worker is warming up")
      state, offer = self._check(request.handoff)
      h = request.handoff
      # Connect here, not on the engine core's thread, which must never wait for a network.
      await asyncio.to_thread(self.transfers.connect, h.transfer_address)
      fetch = self.transfers.fetch(h.transfer_address, offer)
      stream = self.engine.resume(
        state, fetch, request.request_id or None, deadline=deadline_of(context)
      )
      async with contextlib.aclosing(stream):
        async for event in stream:
          if isinstance(event, Landed):
            yield spb.DecodeEvent(landed=spb.Landed(transfer_s=event.seconds, bytes=event.bytes))
          elif event.finish_reason == "abort":
            raise EngineDeadError("the request was aborted: the worker is shutting down")
          else:
            yield spb.DecodeEvent(response=response_proto(event))
    except (asyncio.CancelledError, GeneratorExit):
      raise
    except Exception as e:
      code, text = status_of(e)
      await context.abort(code, text)

  async def Describe(self, request: spb.DescribeRequest, context) -> spb.StageInfo:
    [(role, stats)] = self.engine.stages()
    return spb.StageInfo(
      role=role,
      layout=self.public.info.layout,
      num_devices=self.public.info.num_devices,
      kv_shards=self.kv_shards,
      transfer_address=self.transfers.address,
      stats=stage_stats(stats),
    )

  def _check(self, h: spb.Handoff) -> tuple[RequestState, Offer]:
    """The request state and KV offer of a hand-off, every field checked as strictly as the
    public API checks its own: the caller may be anyone who reached this port. Raises
    InvalidArgument naming the field."""
    try:
      params = sampling_of(h.sampling)
    except InvalidArgument as e:
      raise InvalidArgument(f"handoff.{e}") from None
    state = RequestState(
      prompt_ids=list(h.prompt_token_ids),
      output_ids=list(h.output_token_ids),
      params=params,
      seed=h.seed,
      num_cached_tokens=h.num_cached_tokens,
      cache_salt=h.cache_salt,
    )
    engine = self.engine.engine
    try:
      engine.validate_state(state)  # e.g. a smaller context than the prefill worker's
    except ValueError as e:
      raise InvalidArgument(f"handoff.{e}") from None
    runner = engine.runner
    pool_dtype = np.dtype(runner.cache.k.dtype).name
    if h.dtype != pool_dtype:
      raise InvalidArgument(f"handoff.dtype: {h.dtype!r}, this worker's KV pool holds {pool_dtype}")
    if h.num_pieces != self.kv_shards:
      raise InvalidArgument(
        f"handoff.num_pieces: {h.num_pieces}, this worker's layout has {self.kv_shards} "
        "kv-head shards (StageInfo.kv_shards)"
      )
    pages = -(-len(state.prompt_ids) // engine.config.page_size)
    shape = runner.kv_shape(len(runner.page_list([0] * pages)))
    want = (*shape[:HEADS], shape[HEADS] // self.kv_shards, *shape[HEADS + 1 :])
    if tuple(h.piece_shape) != want:
      raise InvalidArgument(
        f"handoff.piece_shape: {list(h.piece_shape)}, expected {list(want)} for "
        f"{len(state.prompt_ids)} prompt tokens"
      )
    match = _ADDRESS.fullmatch(h.transfer_address)
    if match is None or not 0 < int(match[1]) < 65536:
      raise InvalidArgument(
        f"handoff.transfer_address: {h.transfer_address[:100]!r} is not host:port"
      )
    return state, Offer(h.transfer_id, want, np.dtype(pool_dtype), h.num_pieces)

  def _handoff(self, handoff: Handoff, offer: Offer) -> spb.Handoff:
    state, t = handoff.state, handoff.timing
    return spb.Handoff(
      transfer_address=self.transfers.address,
      transfer_id=offer.transfer_id,
      piece_shape=offer.piece_shape,
      dtype=offer.dtype.name,
      num_pieces=offer.num_pieces,
      prompt_token_ids=state.prompt_ids,
      output_token_ids=state.output_ids,
      sampling=sampling_proto(state.params),
      seed=state.seed,
      num_cached_tokens=state.num_cached_tokens,
      cache_salt=state.cache_salt,
      queue_s=t.queued_s or 0.0,
      time_to_first_token_s=t.first_token_s or 0.0,
    )


def stage_service(
  engine: AsyncEngine, public: InferenceServicer, host: str, *, handoff_timeout: float = 30.0
):
  """(name, add function, servicer) of a worker's StageWorker service, its transfer server
  listening on `host`."""
  transfers = TransferServer(host)
  log.info("KV transfer server on %s", transfers.address)
  servicer = StageServicer(engine, public, transfers, handoff_timeout=handoff_timeout)
  return SERVICE, stages_pb2_grpc.add_StageWorkerServicer_to_server, servicer
