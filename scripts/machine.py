"""The machine a benchmark ran on, for the first line of its table: figures from different
machines are never compared (the same benchmark gave 354 tok/s on one and 260 on another)."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def describe() -> str:
  """e.g. "cpu: AMD EPYC 9B14 (2 cores); host vm-1; JAX 0.8.1 on cpu"."""
  import jax

  device = jax.devices()[0]
  return (
    f"cpu: {cpu_model()} ({os.cpu_count()} cores); host {platform.node()}; JAX {jax.__version__} "
    f"on {device.platform} ({device.device_kind})"
  )
