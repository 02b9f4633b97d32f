"""Logical axis names -> mesh axes: one `Rules` table per layout preset.

Models name the logical axes of every array (`embed`, `heads`, `kv_heads`, `mlp`, `vocab`, ...);
a table maps each name to a mesh axis (`data`, `model`) or to None (replicated). `spec_for`
turns one array's logical axes and shape into a PartitionSpec.

Fallback: a dimension whose size the mesh axis does not divide is replicated over that axis
instead of split. SmolLM2-135M has 9 query heads and 3 kv heads, so under tp=2, 4 or 8 every
attention weight (wq, wk, wv, wo) and the KV cache are replicated over `model` while the MLP
(F=1536) stays split; under tp=3 attention is split too. The result is always correct (XLA
inserts whatever communication the placement needs); only the memory and compute saving of
that dimension is lost.
"""

from __future__ import annotations

import dataclasses

from jax.sharding import Mesh, PartitionSpec

MeshAxis = str | None


@dataclasses.dataclass(frozen=True, slots=True)
class Rules:
  """The mesh axis of every logical axis name; None replicates it."""

  batch: MeshAxis = None  # B: rows of an engine step
  layers: MeshAxis = None  # L: the stacked-layer axis, scanned over
  embed: MeshAxis = None  # E
  heads: MeshAxis = None  # H: query heads
  kv_heads: MeshAxis = None  # K
  head_dim: MeshAxis = None  # D
  mlp: MeshAxis = None  # F
  vocab: MeshAxis = None  # V
  norm: MeshAxis = None  # the E-sized scale of an RMSNorm
  pages: MeshAxis = None  # N: pages of the KV pool
  page_slots: MeshAxis = None  # Z: token slots within a page

  def mesh_axis(self, logical: str) -> MeshAxis:
    if logical not in self.__dataclass_fields__:
      raise ValueError(
        f"unknown logical axis {logical!r}; the rules know {sorted(self.__dataclass_fields__)}"
      )
    return getattr(self, logical)


# Megatron tensor parallelism. wq/wk/wv and w_gate/w_up are split by output column (heads, mlp)
# and wo/w_down by input row, so each block needs exactly one all-reduce (of [B, T, E]) at its
# end and nothing else. `vocab` stays replicated: split, the embedding lookup would cost an extra
# all-reduce of [B, T, E] and the sampler an all-gather of the [B, V] logits every step;
# replicated, embed/head need no collective at all, for the price of V*E weights on every device.
# Under data parallelism each replica's rows and KV pages stay on its own devices (`batch` and
# `pages` over `data`): a replica stores and writes only its own KV.
MEGATRON = Rules(batch="data", heads="model", kv_heads="model", mlp="model", pages="data")


def spec_for(
  logical_axes: tuple[str, ...], rules: Rules, shape: tuple[int, ...], mesh: Mesh
) -> PartitionSpec:
  """The PartitionSpec of one array. Raises ValueError when two of its axes map to the same mesh
  axis (a table bug, whatever the sizes); replicates dimensions the mesh axis does not divide."""
  if len(logical_axes) != len(shape):
    raise ValueError(f"logical axes {logical_axes} do not match shape {shape}")
  spec: list[MeshAxis] = []
  owner: dict[str, str] = {}  # mesh axis -> the logical axis that took it
  for name, size in zip(logical_axes, shape, strict=True):
    axis = rules.mesh_axis(name)
    if axis is not None:
      if axis not in mesh.shape:
        raise ValueError(f"rules map {name!r} to {axis!r}, not an axis of mesh {dict(mesh.shape)}")
      if axis in owner:
        raise ValueError(
          f"logical axes {owner[axis]!r} and {name!r} of {logical_axes} both map to mesh axis "
          f"{axis!r}; an array can be split over a mesh axis only once"
        )
      owner[axis] = name
    # A mesh axis of size 1 splits nothing: left out, the spec says what is really split.
    split = axis is not None and mesh.shape[axis] > 1 and size % mesh.shape[axis] == 0
    spec.append(axis if split else None)
  return PartitionSpec(*spec)
