"""`meshserve serve --role router`: the public endpoint in front of prefill and decode workers.

It serves `meshserve.v1.Inference` exactly as a single server does (plus health and
reflection), holds no model and knows nothing of pages. For each Generate it picks the least
loaded healthy prefill worker and decode worker, then over the internal StageWorker service:

  1. Prefill (a bidirectional stream) on the prefill worker: the first token, streamed to the
     client at once, then a Handoff naming the KV offer;
  2. Decode on the decode worker: it reserves pages, pulls the KV straight onto its devices
     (jax.experimental.transfer) and reports `landed`;
  3. `release` to the prefill worker, which frees its pinned pages; the decode worker streams
     the rest of the tokens.

Leaving at any point (client cancel, deadline, disconnect, a failed worker) cancels both
worker calls, and each worker frees the request's pages when its call ends. Validation errors
come from the prefill worker and pass through unchanged, so the router's answers are the same
as a single server's.

Every worker's health is checked each second. One whose connection breaks, or that misses
`--worker-down-after` checks in a row (3 by default), is marked down: its in-flight requests
end with UNAVAILABLE and no new request goes to it. One late answer is not a death: a worker
that is merely slow keeps its streams. Once it answers SERVING again, routing resumes. The
router itself is SERVING while it has at least one healthy worker of each role.

The router calls workers with the internal token (`--internal-token-file`) when it has one,
else with the public token, and over TLS when given the CA to check them with (`--tls-ca`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from meshserve.engine.api import (
  RequestDelta,
  RequestIdInUseError,
  RequestTiming,
  StageStats,
  new_request_id,
)
from meshserve.server.grpc_server import MAX_MESSAGE_BYTES, SERVICE, build_server, set_health
from meshserve.server.metrics import Metrics
from meshserve.server.proto.meshserve.v1 import inference_pb2 as pb
from meshserve.server.proto.meshserve.v1 import inference_pb2_grpc, stages_pb2_grpc
from meshserve.server.proto.meshserve.v1 import stages_pb2 as spb
from meshserve.server.servicer import (
  CALLER,
  MAX_CACHE_SALT_BYTES,
  InvalidArgument,
  SlowReader,
  check_size,
  record,
  scoped,
  scoped_salt,
  send,
  stats_of,
  timing_proto,
)

log = logging.getLogger("meshserve.router")

CHECK_INTERVAL = 1.0  # seconds between health checks of each worker (and their timeout)
FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


class NoWorker(RuntimeError):
  pass


class Worker:
  """One stage worker as the router sees it: channel, health and the calls in flight on it."""

  def __init__(
    self,
    address: str,
    role: str,
    token: str | None,
    max_message_bytes: int,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    down_after: int = 3,
  ):
    self.address, self.role, self.down_after = address, role, down_after
    options = [
      ("grpc.max_receive_message_length", max_message_bytes),
      ("grpc.max_send_message_length", max_message_bytes),
    ]
    if credentials is None:
      self.channel = grpc.aio.insecure_channel(address, options=options)
    else:
      self.channel = grpc.aio.secure_channel(address, credentials, options=options)
    self.stage = stages_pb2_grpc.StageWorkerStub(self.channel)
    self.public = inference_pb2_grpc.InferenceStub(self.channel)
    self._health = health_pb2_grpc.HealthStub(self.channel)
    self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
    self.healthy = False
    self.missed = 0  # health checks in a row that got no answer
    self.info: spb.StageInfo | None = None  # from the last successful check
    self.calls: set[grpc.aio.Call] = set()  # in flight: the load, and what a failure cancels

  async def check(self, timeout: float) -> None:
    """Asks health and Describe. A worker whose connection is broken, or that has not answered
    `down_after` checks in a row, is down: its calls are cancelled. One that answers
    NOT_SERVING (warming up, or draining on SIGTERM) gets no new requests, but the ones it has
    may finish."""
    answering, broken = True, False
    try:
      answer = await self._health.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
      healthy = answer.status == health_pb2.HealthCheckResponse.SERVING
      if healthy:
        self.info = await self.stage.Describe(
          spb.DescribeRequest(), timeout=timeout, metadata=self.metadata
        )
        healthy = self.info.role == self.role
        if not healthy:
          log.error("worker %s is a %s worker, not %s", self.address, self.info.role, self.role)
    except grpc.RpcError as e:
      answering, broken = False, e.code() == grpc.StatusCode.UNAVAILABLE
    self.missed = 0 if answering else self.missed + 1
    down = broken or self.missed >= self.down_after
    if not answering:
      healthy = self.healthy and not down  # a late answer is not a death
      if down and self.calls:
        log.warning(
          "%s worker %s is down (%s): failing its %d requests", self.role, self.address,
          "connection broken" if broken else f"{self.missed} checks unanswered", len(self.calls),
        )  # fmt: skip
        for call in list(self.calls):
          call.cancel()
    if self.healthy and not healthy:
      log.warning("%s worker %s is out of rotation", self.role, self.address)
    elif healthy and not self.healthy:
      log.info("%s worker %s is serving (%s)", self.role, self.address, self.info.layout)
    self.healthy = healthy


class Router:
  def __init__(
    self,
    prefill: tuple[str, ...],
    decode: tuple[str, ...],
    token: str | None,
    max_message_bytes: int,
    **worker_kw,
  ):
    """token: what the workers take (the internal token, else the public one). worker_kw:
    credentials and down_after, as Worker takes them."""
    self.workers = [Worker(a, "prefill", token, max_message_bytes, **worker_kw) for a in prefill]
    self.workers += [Worker(a, "decode", token, max_message_bytes, **worker_kw) for a in decode]

  @property
  def serving(self) -> bool:
    return all(any(w.healthy for w in self.workers if w.role == r) for r in ("prefill", "decode"))

  def pick(self, role: str) -> Worker:
    """The healthy worker of `role` with the fewest calls in flight."""
    healthy = [w for w in self.workers if w.role == role and w.healthy]
    if not healthy:
      raise NoWorker(f"no healthy {role} worker")
    return min(healthy, key=lambda w: len(w.calls))

  async def watch(self, on_change: Callable[[bool], object]) -> None:
    """Checks every worker each CHECK_INTERVAL; awaits on_change(serving) when it flips."""
    serving = None
    while True:
      started = time.monotonic()
      await asyncio.gather(*(w.check(CHECK_INTERVAL) for w in self.workers))
      if self.serving != serving:
        serving = self.serving
        await on_change(serving)
      await asyncio.sleep(max(CHECK_INTERVAL - (time.monotonic() - started), 0.0))

  def stages(self) -> list[StageStats]:
    """Each worker's stats from its last check, for the metrics."""
    return [
      stats_of(f"{w.role} {w.address}", w.role, w.info.stats)
      for w in self.workers
      if w.info is not None
    ]

  async def close(self) -> None:
    for w in self.workers:
      await w.channel.close()


class RouterServicer(inference_pb2_grpc.InferenceServicer):
  def __init__(self, router: Router, metrics: Metrics, *, slow_reader_timeout: float = 30.0):
    self.slow_reader_timeout = slow_reader_timeout
    self.router, self.metrics = router, metrics
    self._client_ids: set[str] = set()  # in flight, across both stages

  async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
    start, status, message, last = time.perf_counter(), grpc.StatusCode.UNKNOWN, "", None
    calls: list[tuple[Worker, grpc.aio.Call]] = []

    def track(worker: Worker, call: grpc.aio.Call) -> grpc.aio.Call:
      worker.calls.add(call)
      calls.append((worker, call))
      return call

    client_id = None
    # The client sees its own id (or a random one); the workers see one the router reserved,
    # so no client id can collide with another request on a worker. Each caller has its own
    # id namespace and prefix-cache scope.
    reply_id = request.request_id or new_request_id()
    caller = CALLER.get()
    try:
      check_size(request.cache_salt, "cache_salt", MAX_CACHE_SALT_BYTES)
      request.cache_salt = scoped_salt(caller, request.cache_salt)
      if request.request_id and scoped(caller, request.request_id) in self._client_ids:
        raise RequestIdInUseError(f"request_id: {request.request_id!r} is already in flight")
      client_id = scoped(caller, request.request_id) if request.request_id else None
      if client_id:
        self._client_ids.add(client_id)
      prefill, decode = self.router.pick("prefill"), self.router.pick("decode")
      request.request_id = new_request_id()
      timeout = context.time_remaining()
      first = track(prefill, prefill.stage.Prefill(timeout=timeout, metadata=prefill.metadata))
      await first.write(
        spb.PrefillMessage(
          request=spb.PrefillRequest(request=request, kv_shards=decode.info.kv_shards)
        )
      )
      handoff = None
      while (event := await first.read()) != grpc.aio.EOF:
        if event.HasField("handoff"):
          handoff = event.handoff
          break
        first_token_at, last = time.perf_counter(), event.first
        event.first.request_id = reply_id
        await send(context, event.first, self.slow_reader_timeout)
      if handoff is not None:
        rest = track(
          decode,
          decode.stage.Decode(
            spb.DecodeRequest(request_id=request.request_id, handoff=handoff),
            timeout=context.time_remaining(),
            metadata=decode.metadata,
          ),
        )
        transfer = 0.0
        async for event in rest:
          if event.HasField("landed"):
            transfer = event.landed.transfer_s
            # The KV has landed: the prefill pages may go. Should the prefill call be over
            # already (its worker went down meanwhile), its pages went with it.
            with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
              await first.write(spb.PrefillMessage(release=spb.Release()))
              await first.done_writing()
            continue
          response = event.response
          response.request_id = reply_id
          if response.finish_reason:
            timing = RequestTiming(
              queued_s=handoff.queue_s,
              first_token_s=first_token_at - start,
              finished_s=time.perf_counter() - start,
              transfer_s=transfer,
            )
            response.timing.CopyFrom(timing_proto(timing))
          last = response
          await send(context, response, self.slow_reader_timeout)
      status = grpc.StatusCode.OK
    except NoWorker as e:
      status, message = grpc.StatusCode.UNAVAILABLE, str(e)
    except InvalidArgument as e:
      status, message = grpc.StatusCode.INVALID_ARGUMENT, str(e)
    except SlowReader as e:
      status, message = grpc.StatusCode.DEADLINE_EXCEEDED, str(e)
    except RequestIdInUseError as e:
      status, message = grpc.StatusCode.ALREADY_EXISTS, str(e)
    except grpc.aio.AioRpcError as e:  # a worker's answer, passed through
      status, message = e.code(), e.details()
      if status == grpc.StatusCode.CANCELLED:  # cancelled by the health check, not the client
        status, message = grpc.StatusCode.UNAVAILABLE, _down(calls)
    except asyncio.CancelledError:
      if asyncio.current_task().cancelling():  # the client left
        status = grpc.StatusCode.CANCELLED
        raise
      status, message = grpc.StatusCode.UNAVAILABLE, _down(calls)  # a worker went down
    except Exception as e:  # a defect here: say what it was, and serve on
      log.exception("request %r failed in the router", reply_id)
      status, message = grpc.StatusCode.INTERNAL, f"router: {type(e).__name__}: {e}"
    finally:
      if client_id:
        self._client_ids.discard(client_id)
      for worker, call in calls:
        call.cancel()  # a no-op on a finished call; otherwise the worker frees the pages
        worker.calls.discard(call)
      record(
        self.metrics, reply_id, _as_delta(reply_id, last), status,
        time.perf_counter() - start,
      )  # fmt: skip
    if status != grpc.StatusCode.OK:
      await context.abort(status, message)

  async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext):
    return await self._forward("Tokenize", request, context)

  async def GetModelInfo(self, request: pb.GetModelInfoRequest, context):
    info = await self._forward("GetModelInfo", request, context)
    workers = [w for w in self.router.workers if w.info is not None]
    del info.stages[:]
    for w in workers:
      info.stages.append(
        pb.Stage(role=w.role, stats=w.info.stats, address=w.address, healthy=w.healthy)
      )
    first = {w.role: w for w in reversed(workers)}
    info.layout = ", ".join(
      f"{r} {first[r].info.layout}" for r in ("prefill", "decode") if r in first
    )
    info.num_devices = sum(w.info.num_devices for w in workers)
    return info

  async def _forward(self, method: str, request, context: grpc.aio.ServicerContext):
    """A unary call answered by a healthy prefill worker, its errors passed through."""
    try:
      worker = self.router.pick("prefill")
      return await getattr(worker.public, method)(
        request, timeout=context.time_remaining(), metadata=worker.metadata
      )
    except NoWorker as e:
      await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
    except grpc.aio.AioRpcError as e:
      await context.abort(e.code(), e.details())


def _down(calls: list[tuple[Worker, grpc.aio.Call]]) -> str:
  down = [w.address for w, _ in calls if not w.healthy] or [w.address for w, _ in calls]
  return f"worker {', '.join(down)} stopped answering"


def _as_delta(request_id: str, last: pb.GenerateResponse | None) -> RequestDelta | None:
  """The last response as the metrics read it."""
  if last is None:
    return None
  t = last.timing
  return RequestDelta(
    request_id=request_id,
    new_token_ids=[],
    new_text="",
    new_logprobs=None,
    finish_reason=FINISH_REASONS.get(last.finish_reason),
    num_prompt_tokens=last.usage.prompt_tokens,
    num_output_tokens=last.usage.completion_tokens,
    num_cached_tokens=last.usage.cached_prompt_tokens,
    timing=RequestTiming(
      t.queue_s, t.time_to_first_token_s, t.total_s, t.transfer_s or None
    ) if last.finish_reason else RequestTiming(),
  )  # fmt: skip


async def serve_router(
  opts, stop: asyncio.Event, tokens: dict[str, str], internal: str | None = None
) -> int:
  """Runs the router until `stop`; returns the exit status. Clients call it with one of
  `tokens` (token -> caller name); it calls its workers with `internal`, or else with one of
  `tokens`."""
  credentials = None
  if opts.tls_ca is not None:
    credentials = grpc.ssl_channel_credentials(opts.tls_ca.read_bytes())
  router = Router(
    opts.prefill_workers, opts.decode_workers, internal or next(iter(tokens), None),
    MAX_MESSAGE_BYTES,
    credentials=credentials, down_after=opts.worker_down_after,
  )  # fmt: skip
  checks = health.aio.HealthServicer()
  metrics = Metrics(router.stages)
  servicer = RouterServicer(router, metrics, slow_reader_timeout=opts.slow_reader_timeout)
  add = inference_pb2_grpc.add_InferenceServicer_to_server
  server, port = build_server(opts, [(SERVICE, add, servicer)], checks, tokens)
  await set_health(checks, health_pb2.HealthCheckResponse.NOT_SERVING)
  await server.start()
  log.info(
    "router on %s:%d over prefill %s and decode %s; NOT_SERVING until both answer",
    opts.host, port, ",".join(opts.prefill_workers), ",".join(opts.decode_workers),
  )  # fmt: skip
  if opts.metrics_port is not None:
    metrics.serve(opts.metrics_port, opts.metrics_host)

  async def on_change(serving: bool) -> None:
    state = health_pb2.HealthCheckResponse
    await set_health(checks, state.SERVING if serving else state.NOT_SERVING)
    log.info("%s %s on port %d", "SERVING" if serving else "NOT_SERVING", SERVICE, port)

  watcher = asyncio.create_task(router.watch(on_change))
  await stop.wait()
  log.info("draining: in-flight streams get up to %.0fs", opts.drain_timeout)
  await checks.enter_graceful_shutdown()
  await server.stop(opts.drain_timeout)
  watcher.cancel()
  with contextlib.suppress(asyncio.CancelledError):
    await watcher
  await router.close()
  return 0
