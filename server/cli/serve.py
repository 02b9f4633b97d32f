"""`meshserve serve`: the gRPC server, or one stage worker, or the router in front of workers.
Its flags are the fields of ServeOptions and EngineConfig, with their defaults."""

from __future__ import annotations

import argparse
import pathlib

from meshserve.engine.api import EngineConfig
from meshserve.server.cli.common import (
  MODEL_HELP,
  add_cache_flag,
  add_device_flags,
  add_dtype_flag,
  field_flags,
  model_name,
  values,
)
from meshserve.server.grpc_server import ServeOptions

SERVER_FLAGS = {
  "host": "address the gRPC server binds",
  "port": "gRPC port (0: any free port)",
  "metrics_host": "address /metrics binds (it has no auth; 0.0.0.0 opens it on every interface)",
  "max_queue": "requests that may wait beyond --max-batch; more get RESOURCE_EXHAUSTED",
  "slow_reader_timeout": "seconds a Generate stream may wait for its client to read; then it "
  "is cancelled",
  "max_concurrent_rpcs": "calls in flight at once; more get RESOURCE_EXHAUSTED",
  "drain_timeout": "seconds, on SIGTERM",
}
ENGINE_FLAGS = {
  "max_model_len": "prompt + output tokens",
  "max_batch": "requests decoded together",
  "num_pages": "KV cache pages",
  "page_size": "tokens per KV page",
  "max_num_batched_tokens": "step token budget",
  "seed": "seeds the seeds of unseeded requests",
}
WORKER_FLAGS = {
  "internal_host": "prefill/decode: address the KV transfer server binds (and peers dial)",
  "handoff_timeout": "prefill: seconds a hand-off's pages stay pinned waiting for the decode side",
  "worker_down_after": "router: unanswered health checks in a row (1 s each) before a worker "
  "is down",
}
FILES = {
  "tls_cert": "PEM certificate chain",
  "tls_key": "PEM private key",
  "auth_token_file": "require 'authorization: Bearer <token>' (health checks stay open)",
  "internal_token_file": "router and workers: the token the router calls workers with; a "
  "worker's StageWorker API takes it alone (the public token gets PERMISSION_DENIED there)",
  "tls_ca": "router: call workers over TLS, checking their certificates against this CA (PEM)",
}


def add_parser(sub) -> None:
  p = sub.add_parser("serve", help="run the gRPC server (meshserve.v1.Inference)")
  p.add_argument("--model", default=None, help=MODEL_HELP)
  p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics")
  field_flags(p, ServeOptions, SERVER_FLAGS, max_queue=int)
  field_flags(p, EngineConfig, ENGINE_FLAGS)
  for name, help_text in FILES.items():
    p.add_argument(f"--{name.replace('_', '-')}", type=pathlib.Path, default=None, help=help_text)
  add_cache_flag(p)
  p.add_argument(
    "--no-warmup", action="store_true", help="skip compiling every step shape before SERVING"
  )
  topo = p.add_argument_group("topology (see README: Disaggregated serving)")
  topo.add_argument(
    "--mode", choices=("colocated", "disaggregated"), default="colocated",
    help="disaggregated: prefill and decode stages in this process, each on its own devices",
  )  # fmt: skip
  topo.add_argument(
    "--prefill-layout", default=None, help="disaggregated: e.g. tp=2 (default tp=1)"
  )
  topo.add_argument("--decode-layout", default=None, help="disaggregated: e.g. tp=4 (default tp=1)")
  topo.add_argument(
    "--role", choices=("all", "prefill", "decode", "router"), default="all",
    help="all: serve here; prefill/decode: a stage worker for a router; router: the public "
    "endpoint over workers",
  )  # fmt: skip
  field_flags(topo, ServeOptions, WORKER_FLAGS)
  topo.add_argument("--prefill", default=None, help="router: prefill workers, ADDR[,ADDR...]")
  topo.add_argument("--decode", default=None, help="router: decode workers, ADDR[,ADDR...]")
  add_dtype_flag(p)
  add_device_flags(p)
  p.set_defaults(func=run, check=check_topology)


def run(args: argparse.Namespace) -> int:
  import asyncio

  from meshserve.server.serve import serve

  check_topology(args)
  args.prefill_layout = args.prefill_layout or "tp=1"
  args.decode_layout = args.decode_layout or "tp=1"
  if args.max_queue < 0:
    raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
  if bool(args.tls_cert) != bool(args.tls_key):
    raise ValueError("--tls-cert and --tls-key go together")
  if args.max_concurrent_rpcs < 1:
    raise ValueError(f"--max-concurrent-rpcs must be >= 1, got {args.max_concurrent_rpcs}")
  if args.worker_down_after < 1:
    raise ValueError(f"--worker-down-after must be >= 1, got {args.worker_down_after}")
  for flag in FILES:
    path = getattr(args, flag)
    if path is not None and not path.is_file():
      raise FileNotFoundError(f"--{flag.replace('_', '-')}: {path} not found")
  opts = ServeOptions(
    model="" if args.role == "router" else model_name(args),  # a router loads no model
    engine=EngineConfig(**values(args, EngineConfig, ENGINE_FLAGS)),
    warmup=not args.no_warmup,
    prefill_workers=addresses(args.prefill, "--prefill"),
    decode_workers=addresses(args.decode, "--decode"),
    **values(args, ServeOptions, [*SERVER_FLAGS, *WORKER_FLAGS, *FILES]),
    **values(args, ServeOptions, ["dtype", "layout", "metrics_port", "compilation_cache"]),
    **values(args, ServeOptions, ["role", "mode", "prefill_layout", "decode_layout"]),
  )
  return asyncio.run(serve(opts))


def check_topology(args: argparse.Namespace) -> None:
  """Flags that only make sense together; before any device or model is touched."""
  if args.mode == "disaggregated" and args.role != "all":
    raise ValueError("--mode disaggregated runs both stages in one process: leave --role out")
  if args.mode == "disaggregated" and args.layout:
    raise ValueError(
      "--mode disaggregated: give --prefill-layout and --decode-layout, not --layout"
    )
  if args.mode != "disaggregated" and (args.prefill_layout or args.decode_layout):
    raise ValueError("--prefill-layout and --decode-layout need --mode disaggregated")
  if args.role == "router":
    if not (args.prefill and args.decode):
      raise ValueError("--role router needs --prefill ADDR[,ADDR...] and --decode ADDR[,ADDR...]")
  elif args.prefill or args.decode:
    raise ValueError("--prefill and --decode name a router's workers: add --role router")
  if (args.num_processes or 1) > 1 and (args.mode == "disaggregated" or args.role != "all"):
    raise ValueError(
      "--num-processes: only colocated serving spans hosts; leave --mode and --role out"
    )


def addresses(text: str | None, flag: str) -> tuple[str, ...]:
  if not text:
    return ()
  out = tuple(a.strip() for a in text.split(","))
  for address in out:
    host, sep, port = address.rpartition(":")
    if not (host and sep and port.isdigit()):
      raise ValueError(f"{flag}: {address!r} is not HOST:PORT")
  return out
