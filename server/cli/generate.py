"""`meshserve generate`: one prompt, completed offline and streamed to stdout."""

from __future__ import annotations

import argparse
import logging
import sys

from meshserve.engine.api import ConstraintError, SamplingParams
from meshserve.server.cli.common import (
  MODEL_HELP,
  add_cache_flag,
  add_constraint_flags,
  add_device_flags,
  add_dtype_flag,
  constraint_of,
  enable_cache,
  field_flags,
  model_name,
  values,
)

log = logging.getLogger("meshserve")

SAMPLING_FLAGS = {
  "temperature": "0 is greedy",
  "top_k": "0: no limit",
  "top_p": None,
  "min_p": None,
  "repetition_penalty": None,
  "presence_penalty": None,
  "frequency_penalty": None,
  "seed": None,
}


def add_parser(sub) -> None:
  p = sub.add_parser("generate", help="complete one prompt offline, streaming to stdout")
  p.add_argument("--model", default=None, help=MODEL_HELP)
  p.add_argument("--prompt", required=True)
  p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
  # The command's own default: a longer answer than a server request's (SamplingParams: 64).
  p.add_argument("--max-tokens", type=int, default=128)
  field_flags(p, SamplingParams, SAMPLING_FLAGS, seed=int)
  p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
  p.add_argument(
    "--stop-token-id", type=int, action="append", default=[], help="stop token id (repeatable)"
  )
  add_constraint_flags(p)
  add_cache_flag(p)
  add_dtype_flag(p)
  add_device_flags(p)
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  from meshserve.engine import LLM
  from meshserve.models import load_model

  params = SamplingParams(
    max_tokens=args.max_tokens,
    stop=tuple(args.stop),
    stop_token_ids=tuple(args.stop_token_id),
    constraint=constraint_of(args),
    **values(args, SamplingParams, SAMPLING_FLAGS),
  )
  if not args.prompt.strip():
    raise ValueError("--prompt: the prompt is empty")
  enable_cache(args)
  llm = LLM(load_model(model_name(args), layout=args.layout, dtype=args.dtype))

  def show(_, text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()

  try:
    if args.chat:
      out = llm.chat([{"role": "user", "content": args.prompt}], params, on_delta=show)
    else:
      out = llm.generate(args.prompt, params, on_delta=show)
  except ConstraintError as e:  # "constraint.<kind>: <llguidance's message>": name the flag
    field, message = str(e).split(": ", 1)
    raise ValueError(
      f"--{field.removeprefix('constraint.').replace('_', '-')}: {message}"
    ) from None
  sys.stdout.write("\n")
  log.info("finish_reason=%s tokens=%d", out[0].finish_reason, len(out[0].token_ids))
  return 0
