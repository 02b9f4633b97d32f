"""`meshserve generate` as a user runs it: a subprocess, stdout streamed, errors without traces."""

import os
import subprocess
import sys
import time

import pytest


def _meshserve(*args: str, **kw) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.Popen(
    [sys.executable, "-m", "meshserve.server.cli", *args],
    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw,
  )  # fmt: skip


@pytest.mark.slow  # default: the chat template in test_tokenizer, chat over gRPC in test_server
def test_generate_chat_streams_an_answer():
  proc = _meshserve(
    "generate", "--chat", "--prompt", "What is the capital of France?", "--max-tokens", "16"
  )
  # Read stdout as it arrives: a streamed answer shows up in several pieces over time.
  pieces, arrivals = [], []
  fd = proc.stdout.fileno()
  os.set_blocking(fd, True)
  while chunk := os.read(fd, 64):
    pieces.append(chunk.decode())
    arrivals.append(time.perf_counter())
  proc.wait(timeout=300)
  out = "".join(pieces)
  assert proc.returncode == 0, proc.stderr.read()
  assert "Paris" in out
  assert len(pieces) >= 3 and arrivals[-1] > arrivals[0]
  assert "ready in" in proc.stderr.read()  # the stage log line with its timing


@pytest.mark.slow  # default: test_bfloat16 in-process
def test_generate_in_bfloat16():
  proc = _meshserve(
    "generate", "--dtype", "bfloat16", "--prompt", "The capital of France is", "--max-tokens", "8"
  )
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err
  assert "Paris" in out  # the float32 reference's greedy answer too


def _main_here(capsys, monkeypatch, *argv: str) -> tuple[int, str]:
  """`meshserve ARGV` in this process, for mistakes caught before any model or device is
  touched (a new process for each costs seconds of start-up). A mistake that went unnoticed
  fails the test instead of starting a server; the compilation cache stays this run's."""
  from meshserve.server import serve
  from meshserve.server.cli import main

  async def never(opts):
    pytest.fail(f"a server would have started: {opts}")

  monkeypatch.setattr(serve, "serve", never)
  try:
    code = main([*argv, "--compilation-cache", ""])
  except SystemExit as e:  # argparse's own errors (an unknown choice)
    code = e.code
  return code, capsys.readouterr().err


def test_a_bad_flag_is_one_clear_line_from_a_real_process():
  """The in-process cases below, end to end once: exit status 2, no traceback."""
  proc = _meshserve("generate", "--prompt", "hi", "--temperature", "-1")
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 2
  assert "temperature" in err and "Traceback" not in err


@pytest.mark.parametrize(
  ("args", "message"),
  [
    (["--prompt", ""], "prompt"),
    (["--prompt", "hi", "--max-tokens", "0"], "max_tokens"),
    (["--prompt", "hi", "--model", "no-such-model"], "unknown model"),
    (["--prompt", "hi", "--model", "/nonexistent/m.gguf"], "not found"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature"),
    (["--prompt", "hi", "--min-p", "2"], "min_p"),
    (["--prompt", "hi", "--frequency-penalty", "3"], "frequency_penalty"),
    (["--prompt", "hi", "--repetition-penalty", "0"], "repetition_penalty"),
    (["--prompt", "hi", "--stop-token-id", "-1"], "stop_token_ids"),
    (["--prompt", "hi", "--dtype", "float16"], "--dtype"),
    (["--prompt", "hi", "--choice", ""], "--choice: give one or more non-empty strings"),
    (["--prompt", "hi", "--json-schema", "@/nonexistent.json"], "--json-schema: [Errno 2]"),
    (["--prompt", "hi", "--choice", "a", "--regex", "b"], "not allowed with argument --choice"),
    (["--prompt", "hi", "--regex", "a("], "--regex: at 1(8): invalid regex"),  # compiled: a model
  ],
)
def test_generate_bad_input_is_one_clear_line(capsys, monkeypatch, args, message):
  code, err = _main_here(capsys, monkeypatch, "generate", *args)
  assert code == 2
  assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
  ("args", "message"),
  [
    (["--mode", "disaggregated", "--role", "prefill"], "leave --role out"),
    (["--mode", "disaggregated", "--layout", "tp=2"], "--prefill-layout"),
    (["--prefill-layout", "tp=2"], "need --mode disaggregated"),
    (["--role", "router", "--prefill", "127.0.0.1:1"], "--decode"),
    (["--role", "router", "--prefill", "nohost", "--decode", "127.0.0.1:1"], "HOST:PORT"),
    (["--prefill", "127.0.0.1:1"], "--role router"),
    (["--role", "prefill", "--num-processes", "2"], "only colocated serving spans hosts"),
  ],
)
def test_serve_topology_mistakes_are_one_clear_line(capsys, monkeypatch, args, message):
  code, err = _main_here(capsys, monkeypatch, "serve", "--port", "0", "--host", "127.0.0.1", *args)
  assert code == 2, err
  assert message in err and "Traceback" not in err


def test_too_few_devices_for_the_stages_is_one_clear_line():
  """A device count is fixed when a process starts: this one runs in its own."""
  proc = _meshserve(
    "serve", "--port", "0", "--host", "127.0.0.1", "--mode", "disaggregated",
    "--prefill-layout", "tp=4", "--decode-layout", "tp=4", "--cpu-devices", "6",
  )  # fmt: skip
  try:
    out, err = proc.communicate(timeout=120)
  finally:
    proc.kill()  # a mistake that went unnoticed would start a server: stop it, by its PID
  assert proc.returncode == 2, err
  assert "need 8 devices, found 6" in err and "Traceback" not in err


def test_no_tpu_start_up_noise_where_there_is_no_tpu():
  """libtpu is installed (dev extra) but this machine has no TPU: with no JAX_PLATFORMS set,
  the CLI neither prints libtpu's probe warnings nor forces anything a TPU VM would notice."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  proc = subprocess.run(
    [sys.executable, "-m", "meshserve.server.cli", "generate", "--prompt", "Hi",
     "--max-tokens", "2"],
    capture_output=True, text=True, env=env, timeout=300,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  for noise in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "Unable to initialize backend"):
    assert noise not in proc.stderr


def test_the_cli_never_overrides_a_platform(monkeypatch):
  """A platform the user set stays; on a TPU VM nothing is set; only where no TPU exists is
  TPU left out of what jax probes."""
  from meshserve.server.cli import common as cli

  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  cli.skip_absent_tpu()
  assert os.environ["JAX_PLATFORMS"] == "tpu"
  monkeypatch.delenv("JAX_PLATFORMS")
  monkeypatch.setattr(cli, "has_tpu", lambda: True)
  cli.skip_absent_tpu()
  assert "JAX_PLATFORMS" not in os.environ
  monkeypatch.setattr(cli, "has_tpu", lambda: False)
  cli.skip_absent_tpu()
  assert os.environ["JAX_PLATFORMS"].split(",")[-1] == "cpu"
  assert "tpu" not in os.environ["JAX_PLATFORMS"]


def test_serve_opens_only_the_public_port_beyond_loopback_by_default():
  """/metrics has no auth and the KV transfer server none of its own: both stay on loopback
  unless the operator says otherwise; the public gRPC port is the one that faces clients."""
  from meshserve.server.cli import build_parser

  args = build_parser().parse_args(["serve"])
  assert (args.metrics_host, args.internal_host) == ("127.0.0.1", "127.0.0.1")
  assert args.host == "0.0.0.0"
  assert args.handoff_timeout == 30.0 and args.worker_down_after == 3
