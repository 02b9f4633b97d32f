"""`meshserve serve` subprocesses, for the tests and the benchmarks alike: free loopback ports,
bounded waits, and each stopped by its own PID only; and a few gRPC client helpers."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.server.proto.meshserve.v1 import inference_pb2 as pb
from meshserve.server.proto.meshserve.v1 import inference_pb2_grpc

# The engine shape every server test uses: small, so a cold warm-up compiles 18 step shapes.
ENGINE_FLAGS = (
  "--max-model-len", "256", "--max-batch", "8", "--num-pages", "128",
  "--max-num-batched-tokens", "32",
)  # fmt: skip
ROOT = pathlib.Path(__file__).resolve().parents[1]


async def read_all(call: grpc.aio.UnaryStreamCall):
  """The rest of a stream already read from with read() (gRPC forbids mixing in `async for`)."""
  while (response := await call.read()) != grpc.aio.EOF:
    yield response


def collect(stub, request: pb.GenerateRequest, **kw) -> tuple[list[int], str, pb.GenerateResponse]:
  """(token ids, text, last response) of a whole Generate stream."""
  ids, text, last = [], "", None
  for r in stub.Generate(request, timeout=120, **kw):
    ids += r.token_ids
    text += r.text
    last = r
  return ids, text, last


def model_info(stub) -> pb.ModelInfo:
  return stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)


def self_signed_cert(d: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """(cert.pem, key.pem): a certificate for 127.0.0.1 and localhost, made here with openssl."""
  subprocess.run(
    ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
     "-keyout", d / "key.pem", "-out", d / "cert.pem", "-subj", "/CN=localhost",
     "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
    check=True, capture_output=True,
  )  # fmt: skip
  return d / "cert.pem", d / "key.pem"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Server:
  def __init__(
    self,
    *flags: str,
    log: pathlib.Path,
    cache: pathlib.Path | None,
    env: dict[str, str] | None = None,
    port: int | None = None,
    engine_flags: tuple[str, ...] = ENGINE_FLAGS,
    entry: tuple[str, ...] = ("-m", "meshserve.server.cli"),
    platform: str | None = "cpu",
  ):
    """cache: the JAX compilation cache directory (a test run's own, never the user's; None:
    the server's default). engine_flags: the engine's shape (a benchmark passes its own).
    entry: what the interpreter runs, with the CLI's arguments after it. platform: the
    server's JAX_PLATFORMS (None: this process's environment decides, as for a benchmark)."""
    self.port, self.metrics_port = port or free_port(), free_port()
    self.address = f"127.0.0.1:{self.port}"
    self.log = log
    argv = [
      sys.executable, *entry, "serve", "--host", "127.0.0.1",
      "--port", str(self.port), "--metrics-port", str(self.metrics_port),
      *(() if cache is None else ("--compilation-cache", str(cache))), *engine_flags, *flags,
    ]  # fmt: skip
    environment = dict(os.environ, **({} if platform is None else {"JAX_PLATFORMS": platform}))
    environment.update(env or {})
    self._log_file = open(log, "w")  # noqa: SIM115 - closed in stop()
    self.proc = subprocess.Popen(
      argv, cwd=ROOT, stdout=self._log_file, stderr=subprocess.STDOUT, env=environment
    )

  def channel(self, credentials: grpc.ChannelCredentials | None = None, **kw) -> grpc.Channel:
    if credentials is None:
      return grpc.insecure_channel(self.address, **kw)
    return grpc.secure_channel(self.address, credentials, **kw)

  def stub(self, channel: grpc.Channel) -> inference_pb2_grpc.InferenceStub:
    return inference_pb2_grpc.InferenceStub(channel)

  def health(self, channel: grpc.Channel, service: str = "") -> str:
    request = health_pb2.HealthCheckRequest(service=service)
    status = health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)

  def wait_serving(self, timeout: float = 600.0, **channel_kw) -> list[str]:
    """Polls health (bounded) until SERVING; returns the statuses seen on the way."""
    seen, deadline = [], time.monotonic() + timeout
    # Reconnect at the polling pace: gRPC's default backoff grows past a second while the
    # port is still closed, and could skip the whole NOT_SERVING window of a quick warm-up.
    options = channel_kw.pop("options", []) + [
      ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 500),
    ]  # fmt: skip
    with self.channel(**channel_kw, options=options) as channel:
      while time.monotonic() < deadline:
        if self.proc.poll() is not None:
          raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
        try:
          seen.append(self.health(channel))
        except grpc.RpcError:
          seen.append("NO_ANSWER")
        if seen[-1] == "SERVING":
          return seen
        time.sleep(0.25)
    raise TimeoutError(f"not SERVING after {timeout}s:\n{self.output()}")

  def output(self) -> str:
    self._log_file.flush()
    return self.log.read_text()

  def terminate(self, timeout: float = 60.0) -> int:
    """SIGTERM to this server's PID; its exit status."""
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
    return self.proc.wait(timeout)

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait(30)
    self._log_file.close()
