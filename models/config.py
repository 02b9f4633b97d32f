"""The architecture of a model, as one frozen dataclass.

Letters used in shape comments across `models/`:
  B batch, T query tokens, S key tokens, L layers, E embed, H query heads,
  K kv heads, G query heads per kv head (H // K), D head dim, F mlp hidden, V vocab.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
  """Everything the forward pass needs to know about the architecture."""

  name: str
  arch: str  # "llama"
  vocab_size: int  # V
  embed_dim: int  # E
  mlp_dim: int  # F
  num_layers: int  # L
  num_heads: int  # H
  num_kv_heads: int  # K
  head_dim: int  # D
  rope_theta: float
  norm_eps: float
  max_context: int  # the longest context the model was trained for
  tie_embeddings: bool
  bos_token_id: int | None
  eos_token_ids: tuple[int, ...]
  dtype: jnp.dtype = jnp.float32  # weights and activations; softmax/norms always in float32

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
      )

  @property
  def q_per_kv(self) -> int:  # G
    return self.num_heads // self.num_kv_heads

  def num_params(self) -> int:
    E, F, L, V = self.embed_dim, self.mlp_dim, self.num_layers, self.vocab_size
    H, K, D = self.num_heads, self.num_kv_heads, self.head_dim
    per_layer = E * H * D * 2 + E * K * D * 2 + 3 * E * F + 2 * E
    head = 0 if self.tie_embeddings else E * V
    return V * E + L * per_layer + E + head
