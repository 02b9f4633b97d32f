"""Two processes x 4 CPU devices act as one 8-device mesh (jax.distributed, gloo collectives)
and compute the single-process numbers."""

import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).parent.parent
WORKER = pathlib.Path(__file__).parent / "multihost_worker.py"
TIMEOUT_S = 240


# What gloo (the CPU collectives library) prints to stdout when its ranks connect.
GLOO_LINE = re.compile(
  r"\[Gloo\] Rank \d+ is connected to \d+ peer ranks\. Expected number of connected peer "
  r"ranks is : \d+\n?"
)


def strip_gloo(out: str) -> str:
  """`out` without gloo's lines. Its threads print them concurrently, so one line can land
  inside another: removing the inner one completes the outer, hence the loop."""
  while (text := GLOO_LINE.sub("", out)) != out:
    out = text
  # Two interleaved lines can leave the inner one's newline behind, before the completion
  # (gloo connects before anything is generated).
  return out.lstrip("\n")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_two(argv_of, tmp_path: pathlib.Path) -> list[tuple[str, str]]:
  """Runs argv_of(coordinator, process_id) for process ids 0 and 1: their (stdout, stderr)."""
  coordinator = f"127.0.0.1:{_free_port()}"
  # No XLA_FLAGS from conftest: each process fakes its own 4 devices.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"PYTHONPATH": str(ROOT)}
  files = [(tmp_path / f"process{i}.out", tmp_path / f"process{i}.err") for i in range(2)]
  procs = []
  try:
    for i, (out, err) in enumerate(files):
      with out.open("w") as stdout, err.open("w") as stderr:
        argv = argv_of(coordinator, i)
        procs.append(subprocess.Popen(argv, env=env, stdout=stdout, stderr=stderr))
    for p in procs:
      p.wait(timeout=TIMEOUT_S)
  finally:
    for p in procs:  # on a timeout or a failure, never leave a process waiting for its peer
      p.kill()
      p.wait()
  texts = [(out.read_text(), err.read_text()) for out, err in files]
  for p, (_, err) in zip(procs, texts, strict=True):
    assert p.returncode == 0, err[-3000:]
  return texts


@pytest.mark.slow  # two processes each; default: test_sharding on one
def test_forward_tp8_over_two_processes(model, golden, tmp_path):
  # tp=8 over 2 x 4 devices: every all-reduce crosses the process boundary.
  outs = [tmp_path / f"process{i}.npz" for i in range(2)]
  _run_two(
    lambda addr, i: [sys.executable, str(WORKER), addr, "2", str(i), "tp=8", str(outs[i])],
    tmp_path,
  )
  for out in outs:
    got = np.load(out)
    assert tuple(got["shard_shape"]) == (30, 576, 1536 // 8)  # w_gate: F split 8 ways
    for i in range(golden.n):
      ref = model.logits(golden.case(i)["ids"])
      np.testing.assert_allclose(got[str(i)], ref, atol=2e-4)
      np.testing.assert_array_equal(got[str(i)].argmax(-1), ref.argmax(-1))


@pytest.mark.slow  # two processes each; default: test_sharding on one
def test_generate_cli_over_two_processes(golden, tmp_path):
  case = golden.case(0)
  logs = _run_two(
    lambda addr, i: [
      sys.executable,
      "-m",
      "meshserve.server.cli",
      "generate",
      "--prompt",
      case["source"],
      "--max-tokens",
      "6",
      "--cpu-devices",
      "4",
      "--layout",
      "tp=8",
      "--coordinator-address",
      addr,
      "--num-processes",
      "2",
      "--process-id",
      str(i),
    ],  # fmt: skip
    tmp_path,
  )
  for out, err in logs:  # every process runs the same program and prints the same completion
    assert "(tp=8 over 8 devices)" in err
    text = strip_gloo(out).removesuffix("\n")  # gloo writes its lines to stdout, anywhere
    assert len(text) > 5 and case["greedy_text"].startswith(text)


def _serving_pair(tmp_path: pathlib.Path, cache: pathlib.Path, name: str):
  """`meshserve serve --layout tp=8` over 2 processes x 4 CPU devices: [process 0, process 1],
  each a Server (process 1 is given a port and a metrics port, which it must never open)."""
  from serving import Server

  coordinator = f"127.0.0.1:{_free_port()}"
  flags = ("--cpu-devices", "4", "--layout", "tp=8", "--coordinator-address", coordinator,
           "--num-processes", "2", "--drain-timeout", "30")  # fmt: skip
  return [
    Server(*flags, "--process-id", str(i), log=tmp_path / f"{name}{i}.log", cache=cache)
    for i in range(2)
  ]


def _listening(port: int) -> bool:
  with socket.socket() as s:
    return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def pair(tmp_path, compilation_cache):
  started = []

  def start(name: str):
    servers = _serving_pair(tmp_path, compilation_cache, name)
    started.extend(servers)
    servers[0].seen = servers[0].wait_serving(timeout=TIMEOUT_S)
    return servers

  yield start
  for s in started:  # only the processes this test started, by their PID
    s.stop()


@pytest.mark.slow  # two serving processes, twice; default: test_sharding on one process
def test_serve_tp8_over_two_processes(pair, model, golden):
  """Process 0 serves, process 1 follows its schedule in lockstep: the golden prompts give the
  offline tokens (greedy up to a near-tie, seeded exactly), 64 concurrent streams and 50
  deadlines at random points leave every page free, process 1 never opens a port, and SIGTERM
  on process 0 stops both with status 0."""
  import concurrent.futures
  import random

  import grpc
  from conftest import assert_greedy_equal
  from serving import collect, model_info
  from topologies import ENGINE

  from meshserve.engine import LLM, SamplingParams
  from meshserve.server.proto.meshserve.v1 import inference_pb2 as pb

  leader, follower = pair("serve")
  assert not _listening(follower.port) and not _listening(follower.metrics_port)
  offline = LLM(model, ENGINE)
  seeded = dict(max_tokens=12, temperature=0.8, top_p=0.9, seed=1234)
  with leader.channel() as channel:
    stub = leader.stub(channel)
    for i in range(golden.n):
      case = golden.case(i)
      prompt, n = case["ids"].tolist(), len(case["greedy"])
      ids, _, _ = collect(stub, pb.GenerateRequest(token_ids=prompt, sampling={"max_tokens": n}))
      assert_greedy_equal(model, prompt, case["greedy"].tolist(), ids)
      ids, _, _ = collect(stub, pb.GenerateRequest(token_ids=prompt, sampling=seeded))
      assert ids == offline.generate(prompt, SamplingParams(**seeded))[0].token_ids
    prompts = [golden.case(i % golden.n)["ids"].tolist()[: 4 + i % 7] for i in range(64)]
    requests = [
      pb.GenerateRequest(token_ids=p, sampling={"max_tokens": 8, "ignore_eos": True})
      for p in prompts
    ]
    with concurrent.futures.ThreadPoolExecutor(64) as threads:
      outs = list(threads.map(lambda r: collect(stub, r), requests))
    assert all(len(ids) == 8 for ids, _, _ in outs)
    rng = random.Random(0)
    for p in prompts[:50]:  # deadlines at random points
      call = stub.Generate(
        pb.GenerateRequest(token_ids=p, sampling={"max_tokens": 40, "ignore_eos": True}),
        timeout=rng.uniform(0.05, 1.5),
      )
      try:
        for _ in call:
          pass
      except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e
    for _ in range(100):  # bounded: 10 s
      stats = model_info(stub).stages[0].stats
      if stats.free_kv_pages == stats.total_kv_pages and stats.running == stats.waiting == 0:
        break
      time.sleep(0.1)
    assert stats.free_kv_pages == stats.total_kv_pages, stats
  assert leader.terminate(60) == 0
  assert follower.proc.wait(60) == 0
  assert "following process 0" in follower.output()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_a_follower_that_dies_or_hangs_ends_every_stream_unavailable(pair, fault):
  """A follower killed (its collectives fail) or stopped (they would wait forever: the
  heartbeat tells) mid-stream: the stream ends UNAVAILABLE within 5 s and health turns
  NOT_SERVING; nothing hangs."""
  import signal

  import grpc

  from meshserve.server.proto.meshserve.v1 import inference_pb2 as pb

  leader, follower = pair(fault)
  with leader.channel() as channel:
    stub = leader.stub(channel)
    request = pb.GenerateRequest(
      text="List the planets:", sampling={"max_tokens": 200, "ignore_eos": True}
    )
    call = stub.Generate(request, timeout=120)
    next(call)  # streaming
    follower.proc.send_signal(getattr(signal, fault))
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
      for _ in call:
        pass
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
    assert time.monotonic() - start < 5.0
    assert leader.health(channel, "meshserve.v1.Inference") == "NOT_SERVING"
  if fault == "SIGSTOP":
    follower.proc.send_signal(signal.SIGCONT)
