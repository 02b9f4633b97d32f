"""`meshserve convert`: writes an Orbax checkpoint of a model."""

from __future__ import annotations

import argparse
import logging
import time

from meshserve.server.cli.common import add_device_flags, add_dtype_flag

log = logging.getLogger("meshserve")


def add_parser(sub) -> None:
  p = sub.add_parser("convert", help="write an Orbax checkpoint of a model")
  p.add_argument("src", help="model name, .gguf file or Hugging Face checkpoint directory")
  p.add_argument("dst", help="new or empty directory")
  add_dtype_flag(p)
  add_device_flags(p)
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  from meshserve.models import load_model
  from meshserve.models.checkpoint import save_checkpoint

  start = time.perf_counter()
  dst = save_checkpoint(load_model(args.src, layout=args.layout, dtype=args.dtype), args.dst)
  log.info("converted %s to %s in %.1fs", args.src, dst, time.perf_counter() - start)
  return 0
