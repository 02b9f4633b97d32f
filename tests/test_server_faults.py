"""The server under TLS and bearer-token auth, with a queue limit, and with an injected engine
failure (tests/fault_server.py: the CLI with a step that fails once a file exists), which comes
last: it kills the engine."""

import concurrent.futures
import ipaddress
import pathlib
import time

import grpc
import pytest
from serving import Server, self_signed_cert

from meshserve.server.proto.meshserve.v1 import inference_pb2 as pb
from meshserve.server.proto.meshserve.v1 import stages_pb2 as spb
from meshserve.server.proto.meshserve.v1 import stages_pb2_grpc

TOKEN = "s3cret-token"  # alice's
BOB = "bobs-token"


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
  """A self-signed certificate for 127.0.0.1, made here."""
  return self_signed_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, tls, compilation_cache):
  d = tmp_path_factory.mktemp("server")
  (d / "token").write_text(f"# name token\nalice {TOKEN}\nbob {BOB}\n")
  cert, key = tls
  s = Server(
    "--tls-cert", str(cert), "--tls-key", str(key), "--auth-token-file", str(d / "token"),
    "--max-batch", "2", "--max-queue", "2",
    log=d / "server.log", cache=compilation_cache,
    entry=(str(pathlib.Path(__file__).with_name("fault_server.py")), str(d / "fault")),
  )  # fmt: skip
  s.fault = d / "fault"
  s.credentials = grpc.ssl_channel_credentials(cert.read_bytes())
  try:
    s.wait_serving(credentials=s.credentials)
    yield s
  finally:
    s.stop()


AUTH = (("authorization", f"Bearer {TOKEN}"),)


def generate(stub, max_tokens=8, metadata=AUTH, **kw):
  sampling = pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
  request = pb.GenerateRequest(text="Once upon a time", sampling=sampling)
  return list(stub.Generate(request, metadata=metadata, timeout=120, **kw))


def test_tls_and_bearer_token(server):
  with server.channel(server.credentials) as channel:
    stub = server.stub(channel)
    assert server.health(channel) == "SERVING"  # health needs no token
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
      with pytest.raises(grpc.RpcError) as e:
        generate(stub, metadata=metadata)
      assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
      with pytest.raises(grpc.RpcError) as e:
        stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata, timeout=10)
      assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert sum(len(r.token_ids) for r in generate(stub)) == 8
  with server.channel() as plaintext, pytest.raises(grpc.RpcError) as e:
    server.health(plaintext)  # a TLS port does not speak plaintext
  assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_each_named_token_has_its_own_cache_scope_and_request_ids(server):
  """alice and bob (two named tokens) may both have a request "x" in flight, and neither is
  served from the other's prefix cache; alice's own second "x" is refused."""
  bob = (("authorization", f"Bearer {BOB}"),)
  prompt = "Meeting notes, strictly confidential: the merger closes on Friday at noon. " * 2

  def run(metadata, request_id=""):
    request = pb.GenerateRequest(
      request_id=request_id, text=prompt, sampling=pb.SamplingParams(max_tokens=2)
    )
    return list(server.stub(channel).Generate(request, metadata=metadata, timeout=120))

  with server.channel(server.credentials) as channel:
    run(AUTH)
    assert run(bob)[-1].usage.cached_prompt_tokens == 0
    assert run(AUTH)[-1].usage.cached_prompt_tokens > 0
    long = pb.GenerateRequest(
      request_id="x", text="Count:", sampling=pb.SamplingParams(max_tokens=40, ignore_eos=True)
    )
    alice_x = server.stub(channel).Generate(long, metadata=AUTH, timeout=120)
    assert next(alice_x).request_id == "x"
    assert run(bob, "x")[-1].request_id == "x"  # bob's "x" is not alice's
    with pytest.raises(grpc.RpcError) as e:
      run(AUTH, "x")
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    list(alice_x)


def test_a_full_queue_gets_resource_exhausted(server):
  """max_batch 2 + max_queue 2: at most 4 requests in flight; the rest are refused at once."""
  request = pb.GenerateRequest(
    text="Write a long poem", sampling=pb.SamplingParams(max_tokens=24, ignore_eos=True)
  )

  def one(stub):
    try:
      return sum(len(r.token_ids) for r in stub.Generate(request, metadata=AUTH, timeout=120))
    except grpc.RpcError as e:
      assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue" in e.details()
      return "refused"

  with server.channel(server.credentials) as channel:
    stub = server.stub(channel)
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
      outcomes = list(pool.map(one, [stub] * 12))
  assert outcomes.count("refused") >= 4 and outcomes.count(24) >= 4, outcomes
  assert set(outcomes) == {24, "refused"}


def test_an_engine_failure_ends_every_stream_with_unavailable(server):
  request = pb.GenerateRequest(
    text="Tell me everything", sampling=pb.SamplingParams(max_tokens=200, ignore_eos=True)
  )
  with server.channel(server.credentials) as channel:
    stub = server.stub(channel)
    calls = [stub.Generate(request, metadata=AUTH, timeout=120) for _ in range(4)]
    # The server admits them in the order they arrive: wait (bounded) for any 2 to be
    # running and 2 waiting, then fail the next step.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
      stats = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=AUTH, timeout=10)
      if (stats.stages[0].stats.running, stats.stages[0].stats.waiting) == (2, 2):
        break
      time.sleep(0.02)
    server.fault.touch()
    start, codes = time.monotonic(), []
    for call in calls:
      try:
        for _ in call:
          pass
        codes.append(grpc.StatusCode.OK)
      except grpc.RpcError as e:
        codes.append(e.code())
    seconds = time.monotonic() - start
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 4 and seconds < 10, (codes, seconds)
    deadline = time.monotonic() + 10
    while server.health(channel) != "NOT_SERVING" and time.monotonic() < deadline:
      time.sleep(0.1)
    assert server.health(channel) == "NOT_SERVING"
    assert server.health(channel, "meshserve.v1.Inference") == "NOT_SERVING"
    with pytest.raises(grpc.RpcError) as e:
      generate(stub)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
  assert "fault injected" in server.output()


@pytest.mark.slow  # a cold warm-up; default: the SIGTERM drain in test_server
def test_sigterm_during_warmup_stops_promptly(tmp_path):
  """A cold warm-up (a compilation cache of its own) cut short: the shapes compiling finish,
  no new one starts, and the server exits 0."""
  s = Server(log=tmp_path / "server.log", cache=tmp_path / "cold-cache")
  try:
    deadline = time.monotonic() + 120
    while "NOT_SERVING until warm" not in s.output() and time.monotonic() < deadline:
      assert s.proc.poll() is None, s.output()
      time.sleep(0.2)
    start = time.monotonic()
    assert s.terminate(timeout=60) == 0, s.output()
    assert time.monotonic() - start < 30
    assert "cancelled" in s.output()
  finally:
    s.stop()


def listening_hosts(port: int) -> set[str]:
  """The addresses (IPv4 and IPv6) that listen on `port`, from /proc/net/tcp{,6}."""
  hosts = set()
  for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in pathlib.Path(table).read_text().splitlines()[1:]:
      local, state = line.split()[1], line.split()[3]
      address, hex_port = local.split(":")
      if state == "0A" and int(hex_port, 16) == port:  # LISTEN
        raw = bytes.fromhex(address)
        words = [raw[i : i + 4][::-1] for i in range(0, len(raw), 4)]  # host-order words
        ip = ipaddress.ip_address(b"".join(words))
        hosts.add(str(getattr(ip, "ipv4_mapped", None) or ip))
  return hosts


@pytest.mark.slow  # default: the auth interceptor in test_tls_and_bearer_token
def test_a_worker_s_stage_api_takes_only_the_internal_token_and_listens_inward(tmp_path):
  """A decode worker with both credentials: StageWorker refuses the public token
  (PERMISSION_DENIED) and no token (UNAUTHENTICATED), takes the internal one; the public
  API takes either. /metrics and the KV transfer server listen where --metrics-host and
  --internal-host say, not on --host."""
  (tmp_path / "public").write_text("public-token")
  (tmp_path / "internal").write_text("internal-token")
  s = Server(
    "--role", "decode", "--no-warmup", "--auth-token-file", str(tmp_path / "public"),
    "--internal-token-file", str(tmp_path / "internal"), "--metrics-host", "127.0.0.2",
    "--internal-host", "127.0.0.3", log=tmp_path / "worker.log", cache=tmp_path / "cache",
  )  # fmt: skip
  public, internal = (
    (("authorization", "Bearer public-token"),),
    (("authorization", "Bearer internal-token"),),
  )
  try:
    s.wait_serving()
    with s.channel() as channel:
      stage = stages_pb2_grpc.StageWorkerStub(channel)
      for metadata, code in [
        (public, grpc.StatusCode.PERMISSION_DENIED),
        ((), grpc.StatusCode.UNAUTHENTICATED),
      ]:
        with pytest.raises(grpc.RpcError) as e:
          stage.Describe(spb.DescribeRequest(), metadata=metadata, timeout=10)
        assert e.value.code() == code, e.value
      info = stage.Describe(spb.DescribeRequest(), metadata=internal, timeout=10)
      assert info.role == "decode"
      for metadata in (public, internal):
        s.stub(channel).GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata, timeout=10)
    # Each listener where its own flag says (the defaults: tests/test_cli.py).
    host, transfer_port = info.transfer_address.rsplit(":", 1)
    assert host == "127.0.0.3" and listening_hosts(int(transfer_port)) == {"127.0.0.3"}
    assert listening_hosts(s.metrics_port) == {"127.0.0.2"}
    assert listening_hosts(s.port) == {"127.0.0.1"}
  finally:
    s.stop()
