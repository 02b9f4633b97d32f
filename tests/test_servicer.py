"""The servicer over an engine, in this process: a client that stops reading is cut off, and an
error nobody expected is INTERNAL and names the request."""

import asyncio

import pytest
from test_async_engine import CONFIG, all_pages_back

from meshserve.engine import AsyncEngine, Engine


def test_a_client_that_stops_reading_is_cut_off_and_its_pages_freed(model, tmp_path):
  """A Generate stream whose client reads nothing (its HTTP/2 window kept at 1 KiB) blocks
  the server's writes; after the slow-reader timeout the request is cancelled, its pages come
  back, and the call ends DEADLINE_EXCEEDED naming the cause."""
  import grpc

  from meshserve.server.metrics import Metrics
  from meshserve.server.proto.meshserve.v1 import inference_pb2 as pb
  from meshserve.server.proto.meshserve.v1 import inference_pb2_grpc
  from meshserve.server.servicer import InferenceServicer

  engine = AsyncEngine(Engine(model, CONFIG))
  servicer = InferenceServicer(engine, Metrics(engine.stages), slow_reader_timeout=1.0)

  async def main():
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    try:
      async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        request = pb.GenerateRequest(
          text="Tell me a story.",
          sampling=pb.SamplingParams(max_tokens=100, ignore_eos=True, logprobs=20),
        )
        call = inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=60)
        await asyncio.sleep(3.0)  # reads nothing: each response is ~300 bytes
        stats = await all_pages_back(engine)  # cancelled, though 100 tokens were asked for
        with pytest.raises(grpc.aio.AioRpcError) as e:
          while await call.read() != grpc.aio.EOF:
            pass
        return stats, e.value
    finally:
      await server.stop(0)

  try:
    stats, error = asyncio.run(main())
  finally:
    engine.shutdown(30)
  assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
  assert "read nothing" in error.details()


def test_an_unexpected_error_is_internal_and_names_the_request(caplog):
  import grpc

  from meshserve.server.servicer import status_of

  code, message = status_of(KeyError("boom"), "req-7")
  assert code == grpc.StatusCode.INTERNAL
  assert "req-7" in message and "KeyError" in message
  assert "Traceback" in caplog.text or any(r.exc_info for r in caplog.records)
