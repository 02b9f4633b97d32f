"""Regenerates the Python stubs of the protos in this folder (run after editing a .proto):

    .venv/bin/python -m meshserve.server.proto.generate

The stubs import each other by their installed name, `meshserve.server.proto.meshserve.v1`, so
protoc sees the repository through an include root where it is called `meshserve/` (a symlink in a
temporary folder). `tests/test_server_proto.py` checks that the committed stubs describe what the
.proto files say; scripts/lock.txt fixes the generator's version.
"""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Iterator

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTOS = sorted((ROOT / "server/proto").rglob("*.proto"))
# What protoc calls each .proto: its path under the installed package `meshserve`.
NAMES = [pathlib.PurePosixPath("meshserve", *p.relative_to(ROOT).parts) for p in PROTOS]


@contextlib.contextmanager
def include_root() -> Iterator[pathlib.Path]:
  """A folder in which `meshserve/` is this repository: protoc's -I for the names above."""
  with tempfile.TemporaryDirectory() as tmp:
    (pathlib.Path(tmp) / "meshserve").symlink_to(ROOT, target_is_directory=True)
    yield pathlib.Path(tmp)


def protoc(*outputs: str) -> None:
  """Runs protoc on every .proto, with the given output flags."""
  from grpc_tools import protoc as grpc_protoc

  bundled = grpc_protoc._get_resource_file_name("grpc_tools", "_proto")
  with include_root() as root:
    args = ["protoc", f"-I{root}", f"-I{bundled}", *outputs, *map(str, NAMES)]
    if grpc_protoc.main(args) != 0:
      raise RuntimeError(f"protoc failed on {[str(n) for n in NAMES]}")


def generate() -> list[pathlib.Path]:
  """Writes `*_pb2.py`, `*_pb2.pyi` and `*_pb2_grpc.py` beside each .proto; returns their paths."""
  with tempfile.TemporaryDirectory() as out:
    protoc(f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}")
    written = []
    for name, proto in zip(NAMES, PROTOS, strict=True):
      for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
        target = proto.with_name(proto.stem + suffix)
        shutil.copyfile(pathlib.Path(out, name).with_name(proto.stem + suffix), target)
        written.append(target)
  return written


if __name__ == "__main__":
  for path in generate():
    print(path.relative_to(ROOT), file=sys.stderr)
