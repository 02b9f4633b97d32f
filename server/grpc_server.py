"""The gRPC plumbing every meshserve process shares, model server and router alike: options,
bearer-token auth, the server with health and reflection, and its health status."""

from __future__ import annotations

import dataclasses
import hmac
import inspect
import pathlib

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from meshserve.engine.api import EngineConfig
from meshserve.server.proto.meshserve.v1 import inference_pb2
from meshserve.server.servicer import CALLER

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


def build_server(
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


async def set_health(checks: health.aio.HealthServicer, status) -> None:
  await checks.set("", status)
  await checks.set(SERVICE, status)
