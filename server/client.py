"""`meshserve client`: streams one completion from a running server to stdout."""

from __future__ import annotations

import argparse
import pathlib
import sys

import grpc

from meshserve.server.cli.common import add_constraint_flags, constraint_of
from meshserve.server.proto.meshserve.v1 import inference_pb2 as pb
from meshserve.server.proto.meshserve.v1 import inference_pb2_grpc
from meshserve.server.servicer import constraint_proto


def channel(address: str, tls_ca: pathlib.Path | None = None) -> grpc.Channel:
  if tls_ca is None:
    return grpc.insecure_channel(address)
  return grpc.secure_channel(address, grpc.ssl_channel_credentials(tls_ca.read_bytes()))


def run(args: argparse.Namespace) -> int:
  sampling = pb.SamplingParams(
    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop=args.stop
  )
  if args.max_tokens is not None:
    sampling.max_tokens = args.max_tokens
  if args.seed is not None:
    sampling.seed = args.seed
  constraint_proto(constraint_of(args), sampling)
  request = pb.GenerateRequest(sampling=sampling)
  if args.chat:
    request.messages.append(pb.ChatMessage(role="user", content=args.prompt))
  else:
    request.text = args.prompt
  metadata = []
  if args.auth_token_file is not None:
    metadata.append(("authorization", f"Bearer {args.auth_token_file.read_text().strip()}"))
  last = None
  with channel(args.address, args.tls_ca) as ch:
    stub = inference_pb2_grpc.InferenceStub(ch)
    try:
      for response in stub.Generate(request, timeout=args.timeout, metadata=metadata):
        sys.stdout.write(response.text)
        sys.stdout.flush()
        if response.finish_reason:
          last = response
    except grpc.RpcError as e:
      print(f"\nmeshserve: error: {e.code().name}: {e.details()}", file=sys.stderr)
      return 1
  sys.stdout.write("\n")
  if last is None:
    print("meshserve: error: the stream ended without a finish_reason", file=sys.stderr)
    return 1
  reason = pb.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
  print(
    f"finish_reason={reason} prompt_tokens={last.usage.prompt_tokens} "
    f"completion_tokens={last.usage.completion_tokens} "
    f"ttft={last.timing.time_to_first_token_s:.3f}s total={last.timing.total_s:.3f}s",
    file=sys.stderr,
  )
  return 0


def add_parser(sub) -> None:
  p = sub.add_parser("client", help="stream a completion from a running server")
  p.add_argument("prompt")
  p.add_argument("--address", default="127.0.0.1:50051", help="HOST:PORT of the server")
  p.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
  p.add_argument("--max-tokens", type=int, default=None)
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=None)
  p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
  p.add_argument("--timeout", type=float, default=600.0, help="deadline in seconds")
  add_constraint_flags(p)
  p.add_argument("--tls-ca", type=pathlib.Path, default=None, help="CA certificate (PEM): use TLS")
  p.add_argument("--auth-token-file", type=pathlib.Path, default=None)
  p.set_defaults(func=run)
