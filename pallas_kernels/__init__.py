"""Pallas attention kernels (prefill flash attention, ragged paged decode attention).

Until they land, models use the XLA attention path in `models.llama.attention`.
"""
