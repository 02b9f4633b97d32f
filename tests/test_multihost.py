"""Two processes x 4 CPU devices act as one 8-device mesh (jax.distributed, gloo collectives)
and compute the single-process numbers."""

import os
import pathlib
import re
import socket
import subprocess
import sys

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
