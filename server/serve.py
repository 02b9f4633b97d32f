"""`meshserve serve`: the gRPC server on one process (colocated prefill and decode).

Start-up, in order, each stage logged with its timing:
1. the port opens with health NOT_SERVING, so probes get an answer from the first second;
2. the model loads (progress bar);
3. the engine core compiles every step shape (progress bar; the persistent compilation cache
   makes a restart quick), then health turns SERVING.

SIGTERM or SIGINT turns health NOT_SERVING, lets in-flight streams finish (at most
`drain_timeout` seconds, after which they are cancelled), stops the engine and returns 0.
A failed engine turns health NOT_SERVING for good: its streams end with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import inspect
import logging
import os
import pathlib
import signal
import time

import grpc
import jax
import jax.numpy as jnp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from meshserve.engine import AsyncEngine, Engine, EngineConfig
from meshserve.engine.disaggregated import DisaggregatedEngine
from meshserve.engine.runner import enable_compilation_cache
from meshserve.server.metrics import Metrics
from meshserve.server.proto.meshserve.v1 import inference_pb2, inference_pb2_grpc
from meshserve.server.servicer import CALLER, InferenceServicer, ServingInfo
from meshserve.sharding import Layout, split_devices

log = logging.getLogger("meshserve.server")

SERVICE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
HEALTH_PREFIX = "/grpc.health.v1.Health/"
STAGES_PREFIX = "/meshserve.v1.StageWorker/"
MAX_MESSAGE_BYTES = 4 << 20  # gRPC's own limit, above the servicer's 1 MiB per text field


@dataclasses.dataclass(frozen=True)
class ServeOptions:
  model: str
  dtype: str = "float32"  # weights and KV cache: float32 or bfloat16
  layout: str | None = None
  host: str = "0.0.0.0"
  port: int = 50051
  metrics_port: int | None = None
  metrics_host: str = "127.0.0.1"  # /metrics has no auth: loopback unless the operator asks
  internal_host: str = "127.0.0.1"  # a stage worker's KV transfer server
  handoff_timeout: float = 30.0  # a prefill worker holds a hand-off's pages at most this long
  slow_reader_timeout: float = 30.0  # a stream whose client reads nothing this long ends
  engine: EngineConfig = EngineConfig()
  max_queue: int | None = 256
  tls_cert: pathlib.Path | None = None
  tls_key: pathlib.Path | None = None
  auth_token_file: pathlib.Path | None = None  # the public credential: clients hold it
  internal_token_file: pathlib.Path | None = None  # the router's credential on its workers
  tls_ca: pathlib.Path | None = None  # router: verify workers against this CA (TLS to them)
  max_concurrent_rpcs: int | None = 1024  # more in flight at once get RESOURCE_EXHAUSTED
  worker_down_after: int = 3  # router: consecutive unanswered health checks that mean down
  drain_timeout: float = 30.0
  warmup: bool = True
  compilation_cache: str | None = None  # a directory; "" turns the cache off
  role: str = "all"  # "all" (this process serves), "prefill" or "decode" (a worker), "router"
  mode: str = "colocated"  # role "all": "colocated" or "disaggregated" (two stages, one process)
  prefill_layout: str = "tp=1"  # disaggregated: each stage's layout, on devices of its own
  decode_layout: str = "tp=1"
  prefill_workers: tuple[str, ...] = ()  # router: the workers' addresses
  decode_workers: tuple[str, ...] = ()


class BearerTokenAuth(grpc.aio.ServerInterceptor):
  """Bearer tokens (metadata `authorization: Bearer <token>`) on every call but health checks.

  Two kinds of credential. Public tokens, which clients hold, each under a caller name, open
  the Inference service and reflection; the handler sees the caller's name in `CALLER`, and
  each name is its own prefix-cache scope and request-id namespace. The internal token, which
  only the router holds, opens everything, and it alone opens a worker's StageWorker service.
  Without an internal token, the public tokens open StageWorker too."""

  def __init__(self, public: dict[str, str], internal: str | None = None):
    """public: token -> caller name (one unnamed token: name "")."""
    self.public = [(f"Bearer {t}".encode(), name) for t, name in public.items()]
    self.internal = None if internal is None else f"Bearer {internal}".encode()

  async def intercept_service(self, continuation, details):
    handler = await continuation(details)
    if handler is None or details.method.startswith(HEALTH_PREFIX):
      return handler
    given = dict(details.invocation_metadata).get("authorization", "").encode()
    internal_only = details.method.startswith(STAGES_PREFIX) and self.internal is not None
    if self.internal is not None and hmac.compare_digest(given, self.internal):
      return handler
    # Every token is compared, so the time taken does not say which one nearly matched.
    names = [name for token, name in self.public if hmac.compare_digest(given, token)]
    if names:
      if internal_only:
        return _refusal(
          handler, grpc.StatusCode.PERMISSION_DENIED,
          "StageWorker takes the internal token (--internal-token-file), not a public one",
        )  # fmt: skip
      return _as_caller(handler, names[0])
    if not self.public and not internal_only:
      return handler  # no public credential: the public API is open
    return _refusal(
      handler, grpc.StatusCode.UNAUTHENTICATED,
      "missing or wrong bearer token (metadata 'authorization')",
    )  # fmt: skip


_KINDS = {
  (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
  (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
  (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
  (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def _as_caller(handler: grpc.RpcMethodHandler, name: str) -> grpc.RpcMethodHandler:
  """`handler`, run with CALLER set to `name`."""
  attribute, make = _KINDS[handler.request_streaming, handler.response_streaming]
  behavior = getattr(handler, attribute)

  if inspect.isasyncgenfunction(behavior):

    async def wrapped(request, context):
      CALLER.set(name)
      async for response in behavior(request, context):
        yield response

  else:

    async def wrapped(request, context):
      CALLER.set(name)
      return await behavior(request, context)

  return make(
    wrapped,
    request_deserializer=handler.request_deserializer,
    response_serializer=handler.response_serializer,
  )


def _refusal(
  handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
  """A handler of the same kind as `handler` that fails with `code`."""

  async def refuse(_request, context):
    await context.abort(code, message)

  async def refuse_stream(_request, context):
    await context.abort(code, message)
    yield  # makes this an async generator, as a streaming handler must be

  _, make = _KINDS[handler.request_streaming, handler.response_streaming]
  return make(
    refuse_stream if handler.response_streaming else refuse,
    request_deserializer=handler.request_deserializer,
    response_serializer=handler.response_serializer,
  )


def read_tokens(path: pathlib.Path | None, flag: str) -> dict[str, str]:
  """An auth file's tokens -> caller names. Each line is `NAME TOKEN`, or a lone `TOKEN` (whose
  caller has no name); blank lines and lines starting with # are skipped."""
  if path is None:
    return {}
  tokens: dict[str, str] = {}
  for number, line in enumerate(path.read_text().splitlines(), 1):
    fields = line.split()
    if not fields or fields[0].startswith("#"):
      continue
    if len(fields) > 2:
      raise ValueError(f"{flag}: {path}:{number}: expected NAME TOKEN or TOKEN")
    name, token = fields if len(fields) == 2 else ("", fields[0])
    if token in tokens:
      raise ValueError(f"{flag}: {path}:{number}: a token given twice")
    tokens[token] = name
  if not tokens:
    raise ValueError(f"{flag}: {path} holds no token")
  return tokens


def fault_hook():
  """Test-only: when $MESHSERVE_TEST_FAULT_FILE is set, a step fails once that file exists."""
  path = os.environ.get("MESHSERVE_TEST_FAULT_FILE")
  if not path:
    return None

  def hook():
    if os.path.exists(path):
      raise RuntimeError(f"fault injected through {path}")

  return hook


async def serve(opts: ServeOptions) -> int:
  """Runs the server until SIGTERM/SIGINT; returns the process exit status."""
  loop = asyncio.get_running_loop()
  start = time.perf_counter()
  tokens = read_tokens(opts.auth_token_file, "--auth-token-file")
  internal = read_tokens(opts.internal_token_file, "--internal-token-file")
  if len(internal) > 1:
    raise ValueError(f"--internal-token-file: {opts.internal_token_file} holds several tokens")
  internal = next(iter(internal), None)
  stop = asyncio.Event()
  for sig in (signal.SIGTERM, signal.SIGINT):
    loop.add_signal_handler(sig, stop.set)
  if opts.compilation_cache != "":
    log.info("persistent compilation cache: %s", enable_compilation_cache(opts.compilation_cache))
  if opts.role == "router":
    from meshserve.server.router import serve_router

    return await serve_router(opts, stop, tokens, internal)
  models = await asyncio.to_thread(_load, opts)
  if stop.is_set():
    log.info("stopped while loading the model")
    return 0

  checks = health.aio.HealthServicer()

  def on_dead(error: Exception) -> None:  # on the engine core's thread
    if not loop.is_closed():
      not_serving = _set_health(checks, health_pb2.HealthCheckResponse.NOT_SERVING)
      asyncio.run_coroutine_threadsafe(not_serving, loop)

  # The warm-up starts now, on the engine cores' threads; health says SERVING once it is done.
  kw = dict(max_queue=opts.max_queue, warmup=opts.warmup, step_hook=fault_hook(), on_dead=on_dead)
  if opts.role == "all" and opts.mode == "disaggregated":
    prefill, decode = models
    engine = DisaggregatedEngine(
      Engine(prefill, opts.engine, role="prefill"), Engine(decode, opts.engine, role="decode"), **kw
    )
  else:
    role = "colocated" if opts.role == "all" else opts.role
    engine = AsyncEngine(Engine(models[0], opts.engine, role=role), **kw)
  metrics = Metrics(engine.stages)
  info = ServingInfo(
    model=models[0].config.name,
    layout=_layouts(models),
    num_devices=sum(1 if m.mesh is None else m.mesh.size for m in models),
    platform=jax.default_backend(),
    attention=models[0].attention.kind,
    dtype=jnp.dtype(models[0].config.dtype).name,
  )
  public = InferenceServicer(engine, info, metrics, slow_reader_timeout=opts.slow_reader_timeout)
  services = [(SERVICE, inference_pb2_grpc.add_InferenceServicer_to_server, public)]
  if opts.role in ("prefill", "decode"):
    from meshserve.server.stages import stage_service

    services.append(
      stage_service(engine, public, opts.internal_host, handoff_timeout=opts.handoff_timeout)
    )
  server, port = _grpc_server(opts, services, checks, tokens, internal)
  await _set_health(checks, health_pb2.HealthCheckResponse.NOT_SERVING)
  await server.start()
  tls = " with TLS" if opts.tls_cert else ""
  log.info("listening on %s:%d%s; NOT_SERVING until warm", opts.host, port, tls)
  if opts.metrics_port is not None:
    metrics.serve(opts.metrics_port, opts.metrics_host)
    log.info("metrics on http://%s:%d/metrics", opts.metrics_host, opts.metrics_port)

  while not (engine.ready.is_set() or stop.is_set()):  # a signal may cut the warm-up short
    await asyncio.sleep(0.1)
  if engine.error is not None:
    log.error("the engine failed to start: %s", engine.error)
    await server.stop(0)
    return 1
  if not stop.is_set():
    await _set_health(checks, health_pb2.HealthCheckResponse.SERVING)
    if engine.error is not None:  # it died while SERVING was being set: on_dead may have lost
      await _set_health(checks, health_pb2.HealthCheckResponse.NOT_SERVING)
    log.info("SERVING %s on port %d, ready in %.1fs", SERVICE, port, time.perf_counter() - start)
    await stop.wait()

  log.info("draining: in-flight streams get up to %.0fs", opts.drain_timeout)
  drain = time.perf_counter()
  await checks.enter_graceful_shutdown()
  await server.stop(opts.drain_timeout)
  # Stops the core; a warm-up in progress stops after the shapes compiling now.
  await asyncio.to_thread(engine.shutdown, 60.0)
  log.info("stopped after draining for %.1fs", time.perf_counter() - drain)
  return 0


def _grpc_server(
  opts: ServeOptions,
  services,
  checks: health.aio.HealthServicer,
  tokens: dict[str, str],
  internal: str | None = None,
):
  """The server with every service registered and its port bound, not started yet.
  services: (full name, add_*Servicer_to_server, servicer) of each service besides health."""
  server = grpc.aio.server(
    interceptors=[BearerTokenAuth(tokens, internal)] if tokens or internal else [],
    maximum_concurrent_rpcs=opts.max_concurrent_rpcs,
    options=[
      ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ],
  )
  for _, add, servicer in services:
    add(servicer, server)
  health_pb2_grpc.add_HealthServicer_to_server(checks, server)
  names = [name for name, _, _ in services]
  names.append(health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
  reflection.enable_server_reflection((*names, reflection.SERVICE_NAME), server)
  address = f"{opts.host}:{opts.port}"
  if opts.tls_cert is None:
    return server, server.add_insecure_port(address)
  key_and_cert = (opts.tls_key.read_bytes(), opts.tls_cert.read_bytes())
  return server, server.add_secure_port(address, grpc.ssl_server_credentials([key_and_cert]))


async def _set_health(checks: health.aio.HealthServicer, status) -> None:
  await checks.set("", status)
  await checks.set(SERVICE, status)


def _load(opts: ServeOptions) -> list:
  """The model, or in disaggregated mode one per stage, each on its own devices."""
  from meshserve.models import load_model

  if opts.role == "all" and opts.mode == "disaggregated":
    layouts = [Layout.parse(opts.prefill_layout), Layout.parse(opts.decode_layout)]
    devices = split_devices(*layouts)
    return [
      load_model(opts.model, layout=lay, devices=d, dtype=opts.dtype)
      for lay, d in zip(layouts, devices, strict=True)
    ]
  return [load_model(opts.model, layout=opts.layout, dtype=opts.dtype)]


def _layouts(models: list) -> str:
  """ "tp=4", "single device", or per stage: "prefill tp=2, decode tp=4"."""
  names = [str(m.layout) if m.layout is not None else "single device" for m in models]
  if len(models) == 1:
    return names[0]
  return ", ".join(
    f"{role} {name}" for role, name in zip(("prefill", "decode"), names, strict=True)
  )
