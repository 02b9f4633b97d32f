"""`Layout`: the mesh shape (`data` x `model`) plus the rules table that places arrays on it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

from meshserve.sharding.rules import MEGATRON, Rules

AXES = ("data", "model")  # mesh axis names, major to minor


@dataclasses.dataclass(frozen=True, slots=True)
class Layout:
  """How many ways the batch (`data`) and the weights (`model`, tensor parallel) are split."""

  data: int = 1
  model: int = 1
  rules: Rules = MEGATRON

  def __post_init__(self):
    for name in ("data", "model"):
      size = getattr(self, name)
      if not isinstance(size, int) or size < 1:
        raise ValueError(f"layout: {name} must be a positive integer, got {size!r}")

  @classmethod
  def tp(cls, n: int) -> Layout:
    """Tensor parallel over n devices (tp=1 is a one-device mesh)."""
    return cls(model=n)

  @classmethod
  def dp_tp(cls, dp: int, tp: int) -> Layout:
    """dp replicas of the weights, each split tp ways."""
    return cls(data=dp, model=tp)

  @classmethod
  def parse(cls, text: str) -> Layout:
    """'tp=8', 'dp=2,tp=4' or 'tp=1'; a missing axis has size 1."""
    sizes: dict[str, int] = {}
    for piece in text.split(","):
      key, sep, value = piece.strip().partition("=")
      if key not in ("dp", "tp") or not sep:
        raise ValueError(f"layout {text!r}: bad piece {piece!r}; expected tp=N and/or dp=N")
      if key in sizes:
        raise ValueError(f"layout {text!r}: {key} is given twice")
      if not value.isdigit() or int(value) < 1:
        raise ValueError(f"layout {text!r}: bad piece {piece!r}; N must be a positive integer")
      sizes[key] = int(value)
    return cls.dp_tp(sizes.get("dp", 1), sizes.get("tp", 1))

  def __str__(self) -> str:
    return f"tp={self.model}" if self.data == 1 else f"dp={self.data},tp={self.model}"

  @property
  def num_devices(self) -> int:
    return self.data * self.model

  def make_mesh(self, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "model") mesh over the first `num_devices` devices (all processes' devices
    after `sharding.distributed.initialize`), ordered for the interconnect by jax."""
    devices = jax.devices() if devices is None else list(devices)
    if len(devices) < self.num_devices:
      raise ValueError(
        f"layout {self} needs {self.num_devices} devices, found {len(devices)}"
        " (on CPU, fake more with --cpu-devices N)"
      )
    # Auto axes: XLA propagates shardings from the parameters; the model code names no mesh.
    return jax.make_mesh(
      (self.data, self.model),
      AXES,
      axis_types=(AxisType.Auto,) * len(AXES),
      devices=devices[: self.num_devices],
    )


def split_devices(
  *layouts: Layout, devices: Sequence[jax.Device] | None = None
) -> list[list[jax.Device]]:
  """Disjoint device sets, one per layout, in order (e.g. a prefill and a decode mesh)."""
  devices = jax.devices() if devices is None else list(devices)
  need = sum(layout.num_devices for layout in layouts)
  if need > len(devices):
    shown = " + ".join(str(layout) for layout in layouts)
    raise ValueError(
      f"layouts {shown} need {need} devices, found {len(devices)}"
      " (on CPU, fake more with --cpu-devices N)"
    )
  out, start = [], 0
  for layout in layouts:
    out.append(devices[start : start + layout.num_devices])
    start += layout.num_devices
  return out
