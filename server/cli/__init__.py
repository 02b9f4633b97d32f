"""`meshserve`: the command line, one module per command (generate, serve, client, layouts,
convert), each with `add_parser(sub)` and `run(args)`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from meshserve.server import client
from meshserve.server.cli import common, convert, generate, layouts, serve

COMMANDS = (generate, serve, client, layouts, convert)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="meshserve", description=__doc__.splitlines()[0])
  parser.add_argument("-q", "--quiet", action="store_true", help="only warnings on stderr")
  sub = parser.add_subparsers(dest="command", required=True)
  for command in COMMANDS:
    command.add_parser(sub)
  return parser


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
    if not common.has_tpu():
      os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  else:
    common.skip_absent_tpu()
  try:
    if (check := getattr(args, "check", None)) is not None:  # flag mistakes, before any device
      check(args)
    if getattr(args, "role", None) == "router":
      pass  # holds no model and touches no device: it never imports JAX
    elif "coordinator_address" in vars(args):  # a command with the device flags
      common.setup_devices(args)
    elif getattr(args, "cpu_devices", None):
      common.fake_cpu_devices(args.cpu_devices)
    return args.func(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"meshserve: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    return 130
