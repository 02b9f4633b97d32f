"""Regenerates the Python stubs of the protos in this folder (run after editing a .proto):

    .venv/bin/python -m server.proto.generate

Paths are taken from the repository root, so the stubs import each other as
`server.proto.meshserve.v1`. `tests/test_server_proto.py` checks that the committed stubs
describe what the .proto files say; scripts/lock.txt fixes the generator's version.
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTOS = sorted((ROOT / "server/proto").rglob("*.proto"))


def generate(out_dir: pathlib.Path = ROOT) -> list[pathlib.Path]:
  """Writes `*_pb2.py`, `*_pb2.pyi` and `*_pb2_grpc.py` under out_dir; returns their paths."""
  from grpc_tools import protoc

  relative = [str(p.relative_to(ROOT)) for p in PROTOS]
  args = [
    "protoc", f"-I{ROOT}", f"-I{protoc._get_resource_file_name('grpc_tools', '_proto')}",
    f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *relative,
  ]  # fmt: skip
  if protoc.main(args) != 0:
    raise RuntimeError(f"protoc failed on {relative}")
  return sorted(
    out_dir / p.with_name(p.stem + suffix)
    for p in map(pathlib.Path, relative)
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
  )


if __name__ == "__main__":
  for path in generate():
    print(path.relative_to(ROOT), file=sys.stderr)
