"""The architecture of a model, as one frozen dataclass.

One decoder (`models.transformer.Transformer`) serves every supported family; the fields below
switch on what a family adds to the Llama baseline:

  Llama, Mistral   RMSNorm, RoPE, GQA attention, SwiGLU MLP (Mistral: an optional sliding window)
  Qwen2            + q/k/v projection biases
  Gemma 3          + QK-norm, a norm after attention and after the MLP, embeddings scaled by
                   sqrt(E), GeGLU, a query scale of its own, and sliding-window layers with their
                   own RoPE base interleaved with global ones

Letters used in shape comments across `models/`:
  B batch, T query tokens, S key tokens, L layers, E embed, H query heads,
  K kv heads, G query heads per kv head (H // K), D head dim, F mlp hidden, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

ARCHS = ("llama", "mistral", "qwen2", "gemma3")


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
  """Everything the forward pass needs to know about the architecture."""

  name: str
  arch: str  # one of ARCHS
  vocab_size: int  # V
  embed_dim: int  # E
  mlp_dim: int  # F
  num_layers: int  # L
  num_heads: int  # H
  num_kv_heads: int  # K
  head_dim: int  # D
  rope_theta: float  # the RoPE base of global layers
  norm_eps: float
  max_context: int  # the longest context the model was trained for
  tie_embeddings: bool
  bos_token_id: int | None
  eos_token_ids: tuple[int, ...]
  dtype: jnp.dtype = jnp.float32  # weights, KV and matmul inputs; norms and softmax compute
  # in float32 whatever it is, and so does the residual stream unless split (transformer.py)
  # What families add to the Llama baseline (the defaults are Llama's).
  qkv_bias: bool = False  # Qwen2: biases on the q, k and v projections
  qk_norm: bool = False  # Gemma 3: an RMSNorm over D of every query and key head
  post_norms: bool = False  # Gemma 3: RMSNorm of the attention and MLP outputs, before the add
  embed_scale: float = 1.0  # Gemma: sqrt(E)
  activation: Literal["silu", "gelu_tanh"] = "silu"  # of the gated MLP
  query_scale: float | None = None  # softmax scale of q.k; None = D ** -0.5
  rope_scale: float = 1.0  # linear RoPE scaling of the global layers (positions / rope_scale)
  sliding_window: int | None = None  # keys a sliding-window layer sees, its own token included
  # Which layers use the sliding window (None: all, when sliding_window is set).
  sliding_layers: tuple[bool, ...] | None = None
  rope_local_theta: float | None = None  # RoPE base of sliding-window layers; None = rope_theta

  def __post_init__(self):
    if self.arch not in ARCHS:
      raise ValueError(f"arch: {self.arch!r} is not supported; supported: {', '.join(ARCHS)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
      )
    if self.sliding_window is not None and self.sliding_window <= 0:
      raise ValueError(f"sliding_window: must be positive, got {self.sliding_window}")
    if self.sliding_layers is not None and len(self.sliding_layers) != self.num_layers:
      raise ValueError(
        f"sliding_layers: {len(self.sliding_layers)} entries for {self.num_layers} layers"
      )

  @property
  def q_per_kv(self) -> int:  # G
    return self.num_heads // self.num_kv_heads

  @property
  def layer_windows(self) -> tuple[int, ...]:
    """Each layer's sliding window; 0 for a global layer."""
    if self.sliding_window is None:
      return (0,) * self.num_layers
    local = self.sliding_layers or (True,) * self.num_layers
    return tuple(self.sliding_window if is_local else 0 for is_local in local)

  def num_params(self) -> int:
    E, F, L, V = self.embed_dim, self.mlp_dim, self.num_layers, self.vocab_size
    H, K, D = self.num_heads, self.num_kv_heads, self.head_dim
    per_layer = E * H * D * 2 + E * K * D * 2 + 3 * E * F + 2 * E
    per_layer += (H + 2 * K) * D if self.qkv_bias else 0
    per_layer += 2 * D if self.qk_norm else 0
    per_layer += 2 * E if self.post_norms else 0
    head = 0 if self.tie_embeddings else E * V
    return V * E + L * per_layer + E + head
