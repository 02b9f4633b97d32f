"""The committed gRPC stubs describe what the .proto files say: the same messages, fields and
services, compared as descriptors (not as the generator's text, whose banner names its own
version). The generator's version is fixed by scripts/lock.txt; after editing a .proto, run
`.venv/bin/python -m meshserve.server.proto.generate`."""

import importlib
import pathlib

import grpc
import pytest
from google.protobuf import descriptor_pb2

from meshserve.server.proto import generate

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROTOS = generate.NAMES  # each .proto by the name protoc and the stubs give it


def compiled_from_source(tmp_path) -> dict[str, descriptor_pb2.FileDescriptorProto]:
  """Each .proto as protoc parses it now."""
  out = tmp_path / "protos.pb"
  generate.protoc(f"--descriptor_set_out={out}")
  files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
  return {f.name: f for f in files}


def stub_module(proto: pathlib.PurePosixPath, suffix: str):
  return importlib.import_module(".".join(proto.with_suffix("").parts) + suffix)


@pytest.mark.parametrize("proto", PROTOS, ids=str)
def test_committed_stubs_describe_the_proto(proto, tmp_path):
  want = compiled_from_source(tmp_path)[str(proto)]
  committed = descriptor_pb2.FileDescriptorProto()
  stub_module(proto, "_pb2").DESCRIPTOR.CopyToProto(committed)
  # CopyToProto leaves out source info and json names that protoc fills in; compare the rest.
  for f in (want, committed):
    f.ClearField("source_code_info")
    for message in f.message_type:
      for field in message.field:
        field.ClearField("json_name")
  assert committed == want, (
    f"{proto}: the stubs are stale: run python -m meshserve.server.proto.generate"
  )

  grpc_stubs = stub_module(proto, "_pb2_grpc")  # imports only under a grpcio it supports
  channel = grpc.insecure_channel("127.0.0.1:1")  # never dialled: stubs connect lazily
  for service in want.service:
    stub = getattr(grpc_stubs, f"{service.name}Stub")(channel)
    servicer = getattr(grpc_stubs, f"{service.name}Servicer")
    assert hasattr(grpc_stubs, f"add_{service.name}Servicer_to_server")
    for method in service.method:
      assert callable(getattr(stub, method.name)), f"{service.name}Stub.{method.name}"
      assert callable(getattr(servicer, method.name)), f"{service.name}Servicer.{method.name}"
  channel.close()

  typed = ROOT.joinpath(*proto.parts[1:]).with_name(proto.stem + "_pb2.pyi").read_text()
  for message in want.message_type:
    assert f"class {message.name}(_message.Message)" in typed, f"{message.name} in the .pyi"


def test_the_generator_is_the_locked_one():
  """scripts/bootstrap.sh installs grpcio-tools at the lock's version: what regenerates the
  stubs is what the project tested."""
  from importlib.metadata import version

  lock = (ROOT / "scripts/lock.txt").read_text().splitlines()
  assert f"grpcio-tools=={version('grpcio-tools')}" in lock


def test_the_service_is_described_by_its_proto():
  from meshserve.server.proto.meshserve.v1 import inference_pb2

  service = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
  assert service.full_name == "meshserve.v1.Inference"
  assert {m.name for m in service.methods} == {"Generate", "Tokenize", "GetModelInfo"}
  assert service.methods_by_name["Generate"].server_streaming
