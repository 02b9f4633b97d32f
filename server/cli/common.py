"""What the commands share: flags derived from the dataclasses they fill (so each default lives
once, in the dataclass), the dtype and device flags, and setting up devices before JAX starts."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pathlib

log = logging.getLogger("meshserve")
DTYPES = ("auto", "float32", "bfloat16")
# --model defaults to models.DEFAULT_MODEL, looked up only by the commands that load a model:
# importing `models` imports jax, which `meshserve client` and a router do not need.
MODEL_HELP = (
  "smollm2-135m-instruct (default) or gemma3-270m, a .gguf file, a Hugging Face checkpoint "
  "directory or an Orbax checkpoint"
)


def model_name(args: argparse.Namespace) -> str:
  from meshserve.models import DEFAULT_MODEL

  return args.model or DEFAULT_MODEL


def field_flags(parser, owner, helps: dict[str, str], **types) -> None:
  """One `--name-with-dashes` flag per key of `helps`, a field of the dataclass `owner`: its
  default is the field's, and so is its type (unless `types` names one, for a field whose
  default is None)."""
  fields = {f.name: f for f in dataclasses.fields(owner)}
  for name, help_text in helps.items():
    default = fields[name].default
    kind = types.get(name, type(default))
    parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, help=help_text)


def values(args: argparse.Namespace, owner, names) -> dict:
  """The parsed flags of `names`, as keyword arguments of `owner`."""
  fields = {f.name for f in dataclasses.fields(owner)}
  return {name: getattr(args, name) for name in names if name in fields}


def add_constraint_flags(parser: argparse.ArgumentParser) -> None:
  """Structured output: at most one of the constraint flags (SamplingParams.constraint)."""
  group = parser.add_argument_group(
    "structured output (at most one)"
  ).add_mutually_exclusive_group()
  group.add_argument("--json-schema", help="a JSON Schema the output follows (JSON, or @FILE)")
  group.add_argument("--json-object", action="store_true", help="the output is a JSON object")
  group.add_argument("--regex", help="a regular expression the whole output matches")
  group.add_argument("--grammar", help="a Lark grammar the output follows (text, or @FILE)")
  group.add_argument("--choice", action="append", help="the output is one of these (repeatable)")


def constraint_of(args: argparse.Namespace):
  """The Constraint the flags of add_constraint_flags give, or None; ValueError names the
  flag (an @FILE that cannot be read, or a malformed constraint)."""
  from meshserve.engine.api import Constraint

  for flag in ("json_schema", "regex", "grammar", "choice"):
    value = getattr(args, flag)
    if value is None:
      continue
    if isinstance(value, str) and value.startswith("@") and flag != "regex":
      try:
        value = pathlib.Path(value[1:]).read_text()
      except OSError as e:
        raise ValueError(f"--{flag.replace('_', '-')}: {e}") from None
    try:
      return Constraint(flag, tuple(value) if flag == "choice" else value)
    except ValueError as e:  # "constraint.<kind>: ..."
      raise ValueError(f"--{flag.replace('_', '-')}: {str(e).split(': ', 1)[1]}") from None
  return Constraint("json_object") if args.json_object else None


def add_cache_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--compilation-cache", default=None,
    help="persistent JAX compilation cache dir (default $MESHSERVE_CACHE/jax, else "
    "~/.cache/meshserve/jax; '' = off): a second run loads its compiled steps",
  )  # fmt: skip


def enable_cache(args: argparse.Namespace) -> None:
  if args.compilation_cache != "":
    from meshserve.engine import api

    log.info(
      "persistent compilation cache: %s", api.enable_compilation_cache(args.compilation_cache)
    )


def add_dtype_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--dtype", choices=DTYPES, default="auto",
    help="weights and KV cache. auto (default): bfloat16 on TPU and GPU, float32 (the "
    "reference precision) on CPU, where bfloat16 gives 1.5-1.8x the throughput at 64 requests "
    "and half the memory (README: Benchmarks)",
  )  # fmt: skip


def add_device_flags(parser: argparse.ArgumentParser) -> None:
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


def fake_cpu_devices(n: int) -> None:
  if n < 1:
    raise ValueError(f"--cpu-devices must be positive, got {n}")
  flag = f"--xla_force_host_platform_device_count={n}"
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def setup_devices(args: argparse.Namespace) -> None:
  """Runs before any jax backend exists: the device count and the process group are fixed
  when the first backend starts."""
  if args.cpu_devices is not None:
    fake_cpu_devices(args.cpu_devices)
  from meshserve.sharding import distributed

  distributed.initialize(
    args.coordinator_address, args.num_processes, args.process_id, auto=args.auto_distributed
  )


# Where a TPU VM exposes its chips: /dev/accel* (v2-v5e) or /dev/vfio/N (v5p, v6e).
TPU_DEVICE_GLOBS = ("/dev/accel*", "/dev/vfio/[0-9]*")


def has_tpu() -> bool:
  import glob

  return any(glob.glob(g) for g in TPU_DEVICE_GLOBS)


def skip_absent_tpu() -> None:
  """libtpu (in the dev extra) probes for a TPU whenever jax starts, and on a machine without
  one prints a screen of warnings before jax falls back (without libtpu, jax still logs that
  the TPU backend failed). Where no TPU device node exists and the user has not chosen
  platforms, leave TPU out of the platforms jax tries; everything else (CPU, and a GPU where its
  plugin is installed) is found as usual. On a TPU VM nothing changes."""
  import importlib.util

  if "JAX_PLATFORMS" in os.environ or has_tpu():
    return
  plugins = {
    "cuda": ("jax_cuda12_plugin", "jax_cuda13_plugin"),
    "rocm": ("jax_rocm60_plugin", "jax_rocm7_plugin"),
  }
  gpu = [p for p, names in plugins.items() if any(importlib.util.find_spec(n) for n in names)]
  os.environ["JAX_PLATFORMS"] = ",".join([*gpu, "cpu"])
