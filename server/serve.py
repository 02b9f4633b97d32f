"""`meshserve serve`: one process that serves a model (colocated, both stages, or one stage
worker behind a router), or the router itself (meshserve.server.router).

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
import logging
import signal
import threading
import time

from grpc_health.v1 import health, health_pb2

from meshserve.engine import api
from meshserve.server.grpc_server import (
  SERVICE,
  ServeOptions,
  build_server,
  read_tokens,
  set_health,
)
from meshserve.server.metrics import Metrics
from meshserve.server.proto.meshserve.v1 import inference_pb2_grpc
from meshserve.server.servicer import InferenceServicer

log = logging.getLogger("meshserve.server")

ROLES = {"all": None, "prefill": api.Role.PREFILL, "decode": api.Role.DECODE}


def launch_spec(opts: ServeOptions) -> api.LaunchSpec:
  """The engine a model-serving process runs."""
  role = ROLES[opts.role]
  if role is None:
    role = api.Role.DISAGGREGATED if opts.mode == "disaggregated" else api.Role.COLOCATED
  return api.LaunchSpec(
    model=opts.model, role=role, dtype=opts.dtype, layout=opts.layout,
    prefill_layout=opts.prefill_layout, decode_layout=opts.decode_layout, engine=opts.engine,
    max_queue=opts.max_queue, warmup=opts.warmup, transfer_host=opts.internal_host,
  )  # fmt: skip


async def follow(opts: ServeOptions, stop: asyncio.Event) -> int:
  """Multi-host, every process but 0: no port, no metrics; it runs process 0's schedule until
  process 0 stops (its drain decides). A SIGTERM here waits for that, --drain-timeout + 30 s at
  most."""
  log.info("process %d of a multi-host mesh: following process 0", api.process_index())
  done = asyncio.get_running_loop().create_future()

  def run():
    try:
      api.follow(launch_spec(opts))
      outcome = 0
    except Exception:  # noqa: BLE001 - logged; the process exits 1
      log.exception("the follower failed")
      outcome = 1
    done.get_loop().call_soon_threadsafe(done.set_result, outcome)

  threading.Thread(target=run, name="meshserve-follower", daemon=True).start()
  await asyncio.wait([done, asyncio.ensure_future(stop.wait())], return_when="FIRST_COMPLETED")
  if not done.done():
    grace = opts.drain_timeout + 30
    log.info("signalled: following process 0 until it stops (at most %.0fs)", grace)
    try:
      return await asyncio.wait_for(done, grace)
    except TimeoutError:
      log.error("process 0 did not stop within %.0fs", grace)
      return 1
  return done.result()


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
  if opts.role == "router":
    from meshserve.server.router import serve_router  # holds no model: no JAX in its process

    return await serve_router(opts, stop, tokens, internal)
  if opts.compilation_cache != "":
    log.info(
      "persistent compilation cache: %s", api.enable_compilation_cache(opts.compilation_cache)
    )
  if api.process_index() > 0:
    return await follow(opts, stop)
  checks = health.aio.HealthServicer()

  def on_dead(error: Exception) -> None:  # on the engine core's thread
    if not loop.is_closed():
      not_serving = set_health(checks, health_pb2.HealthCheckResponse.NOT_SERVING)
      asyncio.run_coroutine_threadsafe(not_serving, loop)

  # Loads the model; the warm-up then runs on the engine cores' threads, and health says
  # SERVING once it is done.
  engine = await asyncio.to_thread(api.launch, launch_spec(opts), on_dead=on_dead)
  if stop.is_set():
    log.info("stopped while loading the model")
    await asyncio.to_thread(engine.shutdown, 60.0)
    return 0
  metrics = Metrics(engine.stages)
  public = InferenceServicer(engine, metrics, slow_reader_timeout=opts.slow_reader_timeout)
  services = [(SERVICE, inference_pb2_grpc.add_InferenceServicer_to_server, public)]
  if engine.role in (api.Role.PREFILL, api.Role.DECODE):
    from meshserve.server.stages import stage_service

    services.append(stage_service(engine, public, handoff_timeout=opts.handoff_timeout))
  server, port = build_server(opts, services, checks, tokens, internal)
  await set_health(checks, health_pb2.HealthCheckResponse.NOT_SERVING)
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
    await set_health(checks, health_pb2.HealthCheckResponse.SERVING)
    if engine.error is not None:  # it died while SERVING was being set: on_dead may have lost
      await set_health(checks, health_pb2.HealthCheckResponse.NOT_SERVING)
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
