"""`meshserve`: the command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _generate(args: argparse.Namespace) -> int:
  from engine import LLM, SamplingParams

  params = SamplingParams(
    max_tokens=args.max_tokens,
    temperature=args.temperature,
    top_k=args.top_k,
    top_p=args.top_p,
    seed=args.seed,
    stop=tuple(args.stop),
  )
  if not args.prompt.strip():
    raise ValueError("--prompt: the prompt is empty")
  llm = LLM(args.model)

  def show(_, text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()

  if args.chat:
    out = llm.chat([{"role": "user", "content": args.prompt}], params, on_delta=show)
  else:
    out = llm.generate(args.prompt, params, on_delta=show)
  sys.stdout.write("\n")
  logging.getLogger("meshserve").info(
    "finish_reason=%s tokens=%d", out[0].finish_reason, len(out[0].token_ids)
  )
  return 0


def build_parser() -> argparse.ArgumentParser:
  from models import DEFAULT_MODEL

  parser = argparse.ArgumentParser(prog="meshserve", description=__doc__)
  parser.add_argument("-q", "--quiet", action="store_true", help="only warnings on stderr")
  sub = parser.add_subparsers(dest="command", required=True)

  gen = sub.add_parser("generate", help="complete one prompt offline, streaming to stdout")
  gen.add_argument("--model", default=DEFAULT_MODEL, help="model name or .gguf path")
  gen.add_argument("--prompt", required=True)
  gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
  gen.add_argument("--max-tokens", type=int, default=128)
  gen.add_argument("--temperature", type=float, default=0.0)
  gen.add_argument("--top-k", type=int, default=0)
  gen.add_argument("--top-p", type=float, default=1.0)
  gen.add_argument("--seed", type=int, default=None)
  gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
  gen.set_defaults(func=_generate)
  return parser


def main(argv: list[str] | None = None) -> int:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # silences libtpu probing on CPU machines
  args = build_parser().parse_args(argv)
  logging.basicConfig(
    level=logging.WARNING if args.quiet else logging.INFO,
    format="%(asctime)s %(name)s: %(message)s",
    stream=sys.stderr,
  )
  try:
    return args.func(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"meshserve: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    return 130


if __name__ == "__main__":
  sys.exit(main())
