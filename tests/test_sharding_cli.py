"""`meshserve convert` and `meshserve generate --layout` as a user runs them."""

import os
import subprocess
import sys

import pytest


def _meshserve(*args: str) -> subprocess.CompletedProcess:
  # No XLA_FLAGS from conftest: --cpu-devices alone must provide the devices.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, "-m", "meshserve.server.cli", *args],
    capture_output=True, text=True, env=env, timeout=300,
  )  # fmt: skip


@pytest.mark.slow  # default: Orbax round trip in test_sharding
def test_convert_then_generate_sharded(golden, tmp_path):
  dst = tmp_path / "smollm2"
  conv = _meshserve("convert", "smollm2-135m-instruct", str(dst))
  assert conv.returncode == 0, conv.stderr
  assert "converted smollm2-135m-instruct to" in conv.stderr
  case = golden.case(0)
  gen = _meshserve(
    "generate", "--model", str(dst), "--prompt", case["source"], "--max-tokens", "6",
    "--cpu-devices", "4", "--layout", "tp=4",
  )  # fmt: skip
  assert gen.returncode == 0, gen.stderr
  assert "(tp=4 over 4 devices)" in gen.stderr
  text = gen.stdout.removesuffix("\n")
  assert len(text) > 5 and case["greedy_text"].startswith(text)


def test_bad_layouts_are_one_clear_line():
  for args, message in [
    (["--layout", "tp=x"], "layout 'tp=x': bad piece 'tp=x'"),
    (["--layout", "tp=8", "--cpu-devices", "4"], "layout tp=8 needs 8 devices, found 4"),
  ]:
    out = _meshserve("generate", "--prompt", "hi", *args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
