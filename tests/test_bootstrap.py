"""scripts/bootstrap.sh picks the accelerator's extra (jax[tpu] or jax[cuda12]) from what the
machine shows, so the README's serve command installs the right JAX on a TPU VM or a GPU host.
The devices are faked: a folder stands in for /dev and a script for nvidia-smi."""

import os
import pathlib
import subprocess

import pytest

BOOTSTRAP = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "bootstrap.sh"


def detect(dev: pathlib.Path, bin_dir: pathlib.Path) -> str:
  env = {"MESHSERVE_DEV": str(dev), "PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": os.environ["HOME"]}
  run = subprocess.run(
    ["bash", BOOTSTRAP, "--detect"], env=env, capture_output=True, text=True, timeout=30
  )
  assert run.returncode == 0, run.stderr
  return run.stdout.strip()


@pytest.mark.parametrize(
  ("devices", "gpus", "extra"),
  [
    ((), None, ""),  # plain CPU
    (("accel0",), None, "tpu"),  # TPU v4 and older: /dev/accel*
    (("accel0", "accel1", "accel2", "accel3"), None, "tpu"),
    (("vfio/0", "vfio/vfio"), None, "tpu"),  # v5e, v5p, v6e: /dev/vfio
    ((), "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)", "cuda"),
    ((), "", ""),  # nvidia-smi installed but no GPU found (no driver, or none attached)
    (("vfio/0",), "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)", "tpu"),  # a TPU VM comes first
  ],
)
def test_bootstrap_picks_the_accelerators_extra(tmp_path, devices, gpus, extra):
  dev, bin_dir = tmp_path / "dev", tmp_path / "bin"
  dev.mkdir()
  bin_dir.mkdir()
  for name in devices:
    (dev / name).parent.mkdir(parents=True, exist_ok=True)
    (dev / name).touch()
  if gpus is not None:
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\n[ \"$1\" = -L ] && printf '%s\\n' '{gpus}'\n")
    smi.chmod(0o755)
  assert detect(dev, bin_dir) == extra
