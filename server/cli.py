"""`meshserve`: the command line."""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
import time

log = logging.getLogger("meshserve")

# --model defaults to models.DEFAULT_MODEL, looked up only by the commands that load a model:
# importing `models` imports jax, which `meshserve client` does not need.
MODEL_HELP = (
  "smollm2-135m-instruct (default) or gemma3-270m, a .gguf file, a Hugging Face checkpoint "
  "directory or an Orbax checkpoint"
)


DTYPES = ("float32", "bfloat16")


def _model(args: argparse.Namespace) -> str:
  from meshserve.models import DEFAULT_MODEL

  return args.model or DEFAULT_MODEL


def _generate(args: argparse.Namespace) -> int:
  from meshserve.engine import LLM, SamplingParams
  from meshserve.models import load_model

  params = SamplingParams(
    max_tokens=args.max_tokens,
    temperature=args.temperature,
    top_k=args.top_k,
    top_p=args.top_p,
    min_p=args.min_p,
    repetition_penalty=args.repetition_penalty,
    presence_penalty=args.presence_penalty,
    frequency_penalty=args.frequency_penalty,
    seed=args.seed,
    stop=tuple(args.stop),
    stop_token_ids=tuple(args.stop_token_id),
  )
  if not args.prompt.strip():
    raise ValueError("--prompt: the prompt is empty")
  llm = LLM(load_model(_model(args), layout=args.layout, dtype=args.dtype))

  def show(_, text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()

  if args.chat:
    out = llm.chat([{"role": "user", "content": args.prompt}], params, on_delta=show)
  else:
    out = llm.generate(args.prompt, params, on_delta=show)
  sys.stdout.write("\n")
  log.info("finish_reason=%s tokens=%d", out[0].finish_reason, len(out[0].token_ids))
  return 0


def _serve(args: argparse.Namespace) -> int:
  import asyncio

  from meshserve.engine import EngineConfig
  from meshserve.server.serve import ServeOptions, serve

  _check_topology(args)
  if args.max_queue < 0:
    raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
  if bool(args.tls_cert) != bool(args.tls_key):
    raise ValueError("--tls-cert and --tls-key go together")
  if args.max_concurrent_rpcs < 1:
    raise ValueError(f"--max-concurrent-rpcs must be >= 1, got {args.max_concurrent_rpcs}")
  if args.worker_down_after < 1:
    raise ValueError(f"--worker-down-after must be >= 1, got {args.worker_down_after}")
  for flag in ("tls_cert", "tls_key", "auth_token_file", "internal_token_file", "tls_ca"):
    path = getattr(args, flag)
    if path is not None and not path.is_file():
      raise FileNotFoundError(f"--{flag.replace('_', '-')}: {path} not found")
  engine = EngineConfig(
    page_size=args.page_size,
    num_pages=args.num_pages,
    max_model_len=args.max_model_len,
    max_batch=args.max_batch,
    max_num_batched_tokens=args.max_num_batched_tokens,
    seed=args.seed,
  )
  opts = ServeOptions(
    model=_model(args),
    dtype=args.dtype,
    layout=args.layout,
    host=args.host,
    port=args.port,
    metrics_port=args.metrics_port,
    metrics_host=args.metrics_host,
    internal_host=args.internal_host,
    handoff_timeout=args.handoff_timeout,
    slow_reader_timeout=args.slow_reader_timeout,
    engine=engine,
    max_queue=args.max_queue,
    tls_cert=args.tls_cert,
    tls_key=args.tls_key,
    auth_token_file=args.auth_token_file,
    internal_token_file=args.internal_token_file,
    tls_ca=args.tls_ca,
    max_concurrent_rpcs=args.max_concurrent_rpcs,
    worker_down_after=args.worker_down_after,
    drain_timeout=args.drain_timeout,
    warmup=not args.no_warmup,
    compilation_cache=args.compilation_cache,
    role=args.role,
    mode=args.mode,
    prefill_layout=args.prefill_layout,
    decode_layout=args.decode_layout,
    prefill_workers=_addresses(args.prefill, "--prefill"),
    decode_workers=_addresses(args.decode, "--decode"),
  )
  return asyncio.run(serve(opts))


def _check_topology(args: argparse.Namespace) -> None:
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
  args.prefill_layout = args.prefill_layout or "tp=1"
  args.decode_layout = args.decode_layout or "tp=1"


def _addresses(text: str | None, flag: str) -> tuple[str, ...]:
  if not text:
    return ()
  out = tuple(a.strip() for a in text.split(","))
  for address in out:
    host, sep, port = address.rpartition(":")
    if not (host and sep and port.isdigit()):
      raise ValueError(f"{flag}: {address!r} is not HOST:PORT")
  return out


def _layouts(args: argparse.Namespace) -> int:
  import jax.numpy as jnp

  from meshserve.server import explorer

  layouts = explorer.parse_layouts(args.layouts)
  model = args.model or "llama3-8b"
  if args.verify and not args.target.startswith("cpu:"):
    raise ValueError("--verify runs the layouts here: give --target cpu:N")
  rules = explorer.load_rules(args.rules) if args.rules else None
  shape = explorer.ServingShape(args.batch, args.context, args.page_size, args.prefill)
  dtype = None if args.dtype is None else jnp.dtype(args.dtype)
  start = time.perf_counter()
  reports = explorer.explore(model, args.target, layouts, shape, dtype=dtype, rules=rules)
  print(explorer.format_table(reports, shape, args.target))
  log.info("compiled %d layouts in %.0fs", len(layouts), time.perf_counter() - start)
  if args.csv:
    explorer.write_csv(reports, args.csv)
  if args.plot:
    explorer.plot(reports, str(args.plot))
  if args.verify:
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    for layout, differs in explorer.verify(model, layouts, prompts).items():
      verdict = "equal to tp=1" if differs is None else f"DIFFERS from tp=1 on prompt {differs}"
      print(f"verify {layout}: greedy tokens {verdict}")
  return 0


def _convert(args: argparse.Namespace) -> int:
  from meshserve.models import load_model
  from meshserve.models.checkpoint import save_checkpoint

  start = time.perf_counter()
  dst = save_checkpoint(load_model(args.src, layout=args.layout, dtype=args.dtype), args.dst)
  log.info("converted %s to %s in %.1fs", args.src, dst, time.perf_counter() - start)
  return 0


def _add_dtype_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--dtype", choices=DTYPES, default="float32",
    help="weights and KV cache: float32 (default, the reference) or bfloat16 (1.5-1.8x the "
    "throughput on CPU at 64 requests, half the memory; README: Benchmarks)",
  )  # fmt: skip


def _add_device_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--layout", default=None, help="mesh layout, e.g. tp=8 or dp=2,tp=4")
  parser.add_argument("--cpu-devices", type=int, default=None, help="fake N CPU devices")
  group = parser.add_argument_group("multi-process (run the same command in every process)")
  group.add_argument("--coordinator-address", default=None, help="host:port of process 0")
  group.add_argument("--num-processes", type=int, default=None)
  group.add_argument("--process-id", type=int, default=None)
  group.add_argument(
    "--auto-distributed",
    action="store_true",
    help="let jax detect the processes (Cloud TPU VM pod slice, Slurm, Open MPI)",
  )


def _fake_cpu_devices(n: int) -> None:
  if n < 1:
    raise ValueError(f"--cpu-devices must be positive, got {n}")
  flag = f"--xla_force_host_platform_device_count={n}"
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def _setup_devices(args: argparse.Namespace) -> None:
  """Runs before any jax backend exists: the device count and the process group are fixed
  when the first backend starts."""
  if args.cpu_devices is not None:
    _fake_cpu_devices(args.cpu_devices)
  from meshserve.sharding import distributed

  distributed.initialize(
    args.coordinator_address, args.num_processes, args.process_id, auto=args.auto_distributed
  )


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="meshserve", description=__doc__)
  parser.add_argument("-q", "--quiet", action="store_true", help="only warnings on stderr")
  sub = parser.add_subparsers(dest="command", required=True)

  gen = sub.add_parser("generate", help="complete one prompt offline, streaming to stdout")
  gen.add_argument("--model", default=None, help=MODEL_HELP)
  gen.add_argument("--prompt", required=True)
  gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
  gen.add_argument("--max-tokens", type=int, default=128)
  gen.add_argument("--temperature", type=float, default=0.0)
  gen.add_argument("--top-k", type=int, default=0)
  gen.add_argument("--top-p", type=float, default=1.0)
  gen.add_argument("--seed", type=int, default=None)
  gen.add_argument("--min-p", type=float, default=0.0)
  gen.add_argument("--repetition-penalty", type=float, default=1.0)
  gen.add_argument("--presence-penalty", type=float, default=0.0)
  gen.add_argument("--frequency-penalty", type=float, default=0.0)
  gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
  gen.add_argument(
    "--stop-token-id", type=int, action="append", default=[], help="stop token id (repeatable)"
  )
  _add_dtype_flag(gen)
  _add_device_flags(gen)
  gen.set_defaults(func=_generate)

  srv = sub.add_parser("serve", help="run the gRPC server (meshserve.v1.Inference)")
  srv.add_argument("--model", default=None, help=MODEL_HELP)
  srv.add_argument("--host", default="0.0.0.0", help="address the gRPC server binds")
  srv.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port)")
  srv.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics")
  srv.add_argument(
    "--metrics-host", default="127.0.0.1",
    help="address /metrics binds (it has no auth; 0.0.0.0 opens it on every interface)",
  )  # fmt: skip
  srv.add_argument("--max-model-len", type=int, default=2048, help="prompt + output tokens")
  srv.add_argument("--max-batch", type=int, default=32, help="requests decoded together")
  srv.add_argument("--num-pages", type=int, default=1024, help="KV cache pages")
  srv.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
  srv.add_argument("--max-num-batched-tokens", type=int, default=512, help="step token budget")
  srv.add_argument(
    "--max-queue", type=int, default=256,
    help="requests that may wait beyond --max-batch; more get RESOURCE_EXHAUSTED",
  )  # fmt: skip
  srv.add_argument("--seed", type=int, default=0, help="seeds the seeds of unseeded requests")
  srv.add_argument("--tls-cert", type=pathlib.Path, default=None, help="PEM certificate chain")
  srv.add_argument("--tls-key", type=pathlib.Path, default=None, help="PEM private key")
  srv.add_argument(
    "--auth-token-file", type=pathlib.Path, default=None,
    help="require 'authorization: Bearer <token>' (health checks stay open)",
  )  # fmt: skip
  srv.add_argument(
    "--internal-token-file", type=pathlib.Path, default=None,
    help="router and workers: the token the router calls workers with; a worker's StageWorker "
    "API takes it alone (the public token gets PERMISSION_DENIED there)",
  )  # fmt: skip
  srv.add_argument(
    "--slow-reader-timeout", type=float, default=30.0,
    help="seconds a Generate stream may wait for its client to read; then it is cancelled",
  )  # fmt: skip
  srv.add_argument(
    "--max-concurrent-rpcs", type=int, default=1024,
    help="calls in flight at once; more get RESOURCE_EXHAUSTED",
  )  # fmt: skip
  srv.add_argument("--drain-timeout", type=float, default=30.0, help="seconds, on SIGTERM")
  srv.add_argument(
    "--compilation-cache", default=None,
    help="persistent JAX compilation cache dir (default ~/.cache/meshserve/jax; '' = off)",
  )  # fmt: skip
  srv.add_argument(
    "--no-warmup", action="store_true", help="skip compiling every step shape before SERVING"
  )
  topo = srv.add_argument_group("topology (see README: Disaggregated serving)")
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
  topo.add_argument(
    "--internal-host", default="127.0.0.1",
    help="prefill/decode: address the KV transfer server binds (and peers dial)",
  )  # fmt: skip
  topo.add_argument(
    "--handoff-timeout", type=float, default=30.0,
    help="prefill: seconds a hand-off's pages stay pinned waiting for the decode side",
  )  # fmt: skip
  topo.add_argument("--prefill", default=None, help="router: prefill workers, ADDR[,ADDR...]")
  topo.add_argument(
    "--tls-ca", type=pathlib.Path, default=None,
    help="router: call workers over TLS, checking their certificates against this CA (PEM)",
  )  # fmt: skip
  topo.add_argument(
    "--worker-down-after", type=int, default=3,
    help="router: unanswered health checks in a row (1 s each) before a worker is down",
  )  # fmt: skip
  topo.add_argument("--decode", default=None, help="router: decode workers, ADDR[,ADDR...]")
  _add_dtype_flag(srv)
  _add_device_flags(srv)
  srv.set_defaults(func=_serve)

  from meshserve.server import client

  client.add_parser(sub)

  lay = sub.add_parser(
    "layouts",
    help="compile the engine's steps for a target topology under each layout and compare them",
  )
  lay.add_argument(
    "--model", default=None,
    help="a preset (llama3-8b, llama3-70b, qwen2.5-7b, gemma3-27b: shapes only), a registered "
    "model, a .gguf file or a Hugging Face checkpoint directory (its config only)",
  )  # fmt: skip
  lay.add_argument("--target", default="tpu:v5e:2x4", help="tpu:CHIP:TOPOLOGY or cpu:N")
  lay.add_argument(
    "--layouts", required=True,
    help="e.g. tp=8,dp=2,tp=4 (a dp piece starts a new layout; ';' separates too)",
  )  # fmt: skip
  lay.add_argument("--rules", default=None, help="JSON rules table: logical axis -> mesh axis")
  lay.add_argument("--batch", type=int, default=64, help="decode batch")
  lay.add_argument("--context", type=int, default=2048, help="tokens per sequence")
  lay.add_argument("--page-size", type=int, default=16)
  lay.add_argument("--prefill", type=int, default=2048, help="prefill chunk, tokens")
  lay.add_argument(
    "--dtype", choices=DTYPES, default=None,
    help="weights and KV (default: bfloat16 on TPU, float32 on CPU)",
  )  # fmt: skip
  lay.add_argument("--csv", type=pathlib.Path, default=None, help="also write the rows as CSV")
  lay.add_argument("--plot", type=pathlib.Path, default=None, help="memory and step time PNG")
  lay.add_argument(
    "--verify", action="store_true",
    help="cpu:N only: run each layout with real weights and compare its tokens with tp=1",
  )  # fmt: skip
  lay.add_argument("--cpu-devices", type=int, default=None, help="fake N CPU devices")
  lay.set_defaults(func=_layouts)

  conv = sub.add_parser("convert", help="write an Orbax checkpoint of a model")
  conv.add_argument("src", help="model name, .gguf file or Hugging Face checkpoint directory")
  conv.add_argument("dst", help="new or empty directory")
  _add_dtype_flag(conv)
  _add_device_flags(conv)
  conv.set_defaults(func=_convert)
  return parser


# Where a TPU VM exposes its chips: /dev/accel* (v2-v5e) or /dev/vfio/N (v5p, v6e).
TPU_DEVICE_GLOBS = ("/dev/accel*", "/dev/vfio/[0-9]*")


def _has_tpu() -> bool:
  import glob

  return any(glob.glob(g) for g in TPU_DEVICE_GLOBS)


def _skip_absent_tpu() -> None:
  """libtpu (in the dev extra) probes for a TPU whenever jax starts, and on a machine without
  one prints a screen of warnings before jax falls back (without libtpu, jax still logs that
  the TPU backend failed). Where no TPU device node exists and
  the user has not chosen platforms, leave TPU out of the platforms jax tries; everything else
  (CPU, and a GPU where its plugin is installed) is found as usual. On a TPU VM nothing
  changes."""
  import importlib.util

  if "JAX_PLATFORMS" in os.environ or _has_tpu():
    return
  plugins = {
    "cuda": ("jax_cuda12_plugin", "jax_cuda13_plugin"),
    "rocm": ("jax_rocm60_plugin", "jax_rocm7_plugin"),
  }
  gpu = [p for p, names in plugins.items() if any(importlib.util.find_spec(n) for n in names)]
  os.environ["JAX_PLATFORMS"] = ",".join([*gpu, "cpu"])


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  logging.basicConfig(
    level=logging.WARNING if args.quiet else logging.INFO,
    format="%(asctime)s %(name)s: %(message)s",
    stream=sys.stderr,
  )
  if args.command == "layouts" and args.target.startswith("tpu:"):
    # Compiling for a TPU topology loads libtpu, TPU or not. With no chips here to share,
    # other processes that load it too (a test run, a second explorer) are no conflict.
    if not _has_tpu():
      os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  else:
    _skip_absent_tpu()
  try:
    if "coordinator_address" in vars(args):  # a command with the device flags
      _setup_devices(args)
    elif getattr(args, "cpu_devices", None):
      _fake_cpu_devices(args.cpu_devices)
    return args.func(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"meshserve: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    return 130


if __name__ == "__main__":
  sys.exit(main())
