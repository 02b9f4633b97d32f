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

import grpc

from meshserve.engine.api import EngineDeadError, KVTicket, Landed, Role, StageWorker
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


class StageServicer(stages_pb2_grpc.StageWorkerServicer):
  def __init__(
    self, engine: StageWorker, public: InferenceServicer, *, handoff_timeout: float = 30.0
  ):
    self.engine, self.public = engine, public
    self.handoff_timeout = handoff_timeout

  async def Prefill(self, request_iterator, context: grpc.aio.ServicerContext):
    if self.engine.role != Role.PREFILL:
      await context.abort(
        grpc.StatusCode.FAILED_PRECONDITION, f"this is a {self.engine.role} worker"
      )
    try:
      message = await anext(aiter(request_iterator), None)
      if message is None or not message.HasField("request"):
        raise InvalidArgument("request: the first message must carry the request")
      request = message.request.request
      ids, params = await self.public.parse(request)
      stream = self.engine.prefill(
        ids, params, request.request_id or None, kv_shards=message.request.kv_shards,
        deadline=deadline_of(context), cache_salt=request.cache_salt,
      )  # fmt: skip
      async with contextlib.aclosing(stream):
        async for event in stream:
          if isinstance(event, KVTicket):
            yield spb.PrefillEvent(handoff=handoff_proto(event))
            if await self._released(request_iterator):
              self.engine.release_kv(event)
            return  # closing the stream frees the pages, and withdraws an offer not pulled
          elif event.finish_reason == "abort":
            raise EngineDeadError("the request was aborted: the worker is shutting down")
          else:
            yield spb.PrefillEvent(first=response_proto(event))
    except (asyncio.CancelledError, GeneratorExit):
      raise
    except Exception as e:
      code, text = status_of(e)
      await context.abort(code, text)

  async def _released(self, request_iterator) -> bool:
    """Waits for the router's word that the KV has landed (True). The pages stay pinned until
    then, or until the router closes its side (False) or the hand-off times out."""
    try:
      async with asyncio.timeout(self.handoff_timeout):
        async for message in request_iterator:
          if message.HasField("release"):
            return True
    except TimeoutError:
      raise HandoffTimeout(
        f"the decode side did not take the KV within {self.handoff_timeout:g}s "
        "(--handoff-timeout); its pages are released"
      ) from None
    return False

  async def Decode(self, request: spb.DecodeRequest, context: grpc.aio.ServicerContext):
    if self.engine.role != Role.DECODE:
      await context.abort(
        grpc.StatusCode.FAILED_PRECONDITION, f"this is a {self.engine.role} worker"
      )
    try:
      stream = self.engine.decode(
        ticket_of(request.handoff), request.request_id or None, deadline=deadline_of(context)
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
    [stats] = self.engine.stages()
    info = self.engine.info
    return spb.StageInfo(
      role=stats.role,
      layout=info.layout,
      num_devices=info.num_devices,
      kv_shards=self.engine.kv_shards,
      transfer_address=self.engine.transfer_address,
      stats=stage_stats(stats),
    )


def handoff_proto(t: KVTicket) -> spb.Handoff:
  return spb.Handoff(
    transfer_address=t.transfer_address,
    transfer_id=t.transfer_id,
    piece_shape=t.piece_shape,
    dtype=t.dtype,
    num_pieces=t.num_pieces,
    prompt_token_ids=t.prompt_token_ids,
    output_token_ids=t.output_token_ids,
    sampling=sampling_proto(t.params),
    seed=t.seed,
    num_cached_tokens=t.num_cached_tokens,
    cache_salt=t.cache_salt,
    queue_s=t.queued_s,
    time_to_first_token_s=t.first_token_s,
  )


def ticket_of(h: spb.Handoff) -> KVTicket:
  """The ticket a hand-off message names; the engine checks the rest of its fields."""
  try:
    params = sampling_of(h.sampling)
  except InvalidArgument as e:
    raise InvalidArgument(f"handoff.{e}") from None
  return KVTicket(
    transfer_address=h.transfer_address,
    transfer_id=h.transfer_id,
    piece_shape=tuple(h.piece_shape),
    dtype=h.dtype,
    num_pieces=h.num_pieces,
    prompt_token_ids=tuple(h.prompt_token_ids),
    output_token_ids=tuple(h.output_token_ids),
    params=params,
    seed=h.seed,
    num_cached_tokens=h.num_cached_tokens,
    cache_salt=h.cache_salt,
    queued_s=h.queue_s,
    first_token_s=h.time_to_first_token_s,
  )


def stage_service(engine: StageWorker, public: InferenceServicer, *, handoff_timeout: float):
  """(name, add function, servicer) of a worker's StageWorker service."""
  log.info("KV transfer server on %s", engine.transfer_address)
  servicer = StageServicer(engine, public, handoff_timeout=handoff_timeout)
  return SERVICE, stages_pb2_grpc.add_StageWorkerServicer_to_server, servicer
