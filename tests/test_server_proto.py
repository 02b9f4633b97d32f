"""The committed gRPC stubs are what `python -m server.proto.generate` writes from the .proto."""

import pathlib

from server.proto import generate

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_committed_stubs_are_current(tmp_path):
  for fresh in generate.generate(tmp_path):
    committed = ROOT / fresh.relative_to(tmp_path)
    assert committed.is_file(), f"{committed} is missing: run python -m server.proto.generate"
    assert committed.read_bytes() == fresh.read_bytes(), (
      f"{committed.relative_to(ROOT)} is stale: run python -m server.proto.generate"
    )


def test_the_service_is_described_by_its_proto():
  from server.proto.meshserve.v1 import inference_pb2

  service = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
  assert service.full_name == "meshserve.v1.Inference"
  assert {m.name for m in service.methods} == {"Generate", "Tokenize", "GetModelInfo"}
  assert service.methods_by_name["Generate"].server_streaming
