"""Meshes, the logical-axis rules table and sharded placement (see ARCHITECTURE.md).

Models name logical axes only: every parameter carries `logical_axes` metadata
(`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `layers`, `norm`); this package
maps them to mesh axes.
"""
