"""Pallas attention kernels, each beside its plain-JAX float32 reference.

- `flash_attention`: prefill, tiled causal / sliding-window attention with GQA.
- `ragged_paged_attention`: decode, one query token per sequence reading KV pages in place.
- `paged_prefill_attention`: a prefill chunk after a cached prefix, reading KV pages in place
  (the same kernel, with blocks of queries).

Mosaic (TPU) is the lowering target; `interpret=True` (or `pltpu.InterpretParams()`) runs the
same kernels on CPU. Never imports engine or models.
"""

from meshserve.pallas_kernels.paged import paged_prefill_attention, ragged_paged_attention
from meshserve.pallas_kernels.prefill import BlockSizes, flash_attention
from meshserve.pallas_kernels.reference import (
  flash_attention_reference,
  paged_prefill_attention_reference,
  ragged_paged_attention_reference,
)

__all__ = [
  "BlockSizes",
  "flash_attention",
  "flash_attention_reference",
  "paged_prefill_attention",
  "paged_prefill_attention_reference",
  "ragged_paged_attention",
  "ragged_paged_attention_reference",
]
