"""The Llama family (SmolLM2, Llama 2/3, Mistral, Qwen2-style GQA) as one Flax NNX module.

Layers are stacked on a leading `layers` axis and run under `jax.lax.scan`, so XLA compiles one
layer body whatever the depth. Every parameter is declared once, in `Llama.__init__`, with its
shape and logical axis names; `sharding/` maps those names to mesh axes.

Letters: B batch, T query tokens, S key tokens, L layers, E embed, H query heads, K kv heads,
G query heads per kv head, D head dim, F mlp hidden, V vocab, P pages per sequence, N pages,
Z page size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import AttentionBackend, KVCache, cache_slots
from models.config import ModelConfig


def _param(shape: tuple[int, ...], dtype, axes: tuple[str, ...]) -> nnx.Param:
  assert len(shape) == len(axes), (shape, axes)
  return nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes)


class Llama(nnx.Module):
  """Decoder-only transformer: RMSNorm, RoPE, GQA attention, SwiGLU MLP."""

  def __init__(self, cfg: ModelConfig, attention: AttentionBackend | None = None):
    self.cfg, self.attention = cfg, attention or AttentionBackend()
    L, E, F, V = cfg.num_layers, cfg.embed_dim, cfg.mlp_dim, cfg.vocab_size
    H, K, D, dt = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.dtype
    self.embed = _param((V, E), dt, ("vocab", "embed"))
    self.attn_norm = _param((L, E), dt, ("layers", "norm"))
    self.wq = _param((L, E, H, D), dt, ("layers", "embed", "heads", "head_dim"))
    self.wk = _param((L, E, K, D), dt, ("layers", "embed", "kv_heads", "head_dim"))
    self.wv = _param((L, E, K, D), dt, ("layers", "embed", "kv_heads", "head_dim"))
    self.wo = _param((L, H, D, E), dt, ("layers", "heads", "head_dim", "embed"))
    self.mlp_norm = _param((L, E), dt, ("layers", "norm"))
    self.w_gate = _param((L, E, F), dt, ("layers", "embed", "mlp"))
    self.w_up = _param((L, E, F), dt, ("layers", "embed", "mlp"))
    self.w_down = _param((L, F, E), dt, ("layers", "mlp", "embed"))
    self.final_norm = _param((E,), dt, ("norm",))
    if not cfg.tie_embeddings:
      self.lm_head = _param((E, V), dt, ("embed", "vocab"))

  def __call__(
    self,
    tokens: jax.Array,  # [B, T] int32
    positions: jax.Array,  # [B, T] int32, absolute position of each token; -1 marks padding
    cache: KVCache | None = None,
    page_table: jax.Array | None = None,  # [B, P] int32, pool page of each sequence page
    logits_at: jax.Array | None = None,  # [B] int32: compute logits at this token only
  ) -> tuple[jax.Array, KVCache | None]:
    """Runs the stack. Without a cache the tokens attend only to each other (the reference
    path); with one, their K/V are written into the pool and they attend to everything their
    sequence has cached so far. Returns float32 logits [B, T, V] ([B, V] with `logits_at`)
    and the updated cache."""
    cfg = self.cfg
    x = self.embed[...][tokens].astype(cfg.dtype)  # [B, T, E]
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    layers = dict(
      attn_norm=self.attn_norm[...],
      wq=self.wq[...],
      wk=self.wk[...],
      wv=self.wv[...],
      wo=self.wo[...],
      mlp_norm=self.mlp_norm[...],
      w_gate=self.w_gate[...],
      w_up=self.w_up[...],
      w_down=self.w_down[...],
    )

    slots = None if cache is None else cache_slots(positions, page_table, cache.page_size)

    def layer(carry, xs):
      x, kv = carry
      w, i = xs
      with jax.named_scope("attention"):
        h = rms_norm(x, w["attn_norm"], cfg.norm_eps)
        q = apply_rope(jnp.einsum("BTE,EHD->BTHD", h, w["wq"]), cos, sin)
        k = apply_rope(jnp.einsum("BTE,EKD->BTKD", h, w["wk"]), cos, sin)
        v = jnp.einsum("BTE,EKD->BTKD", h, w["wv"])
        if kv is not None:
          kv = kv.write(i, slots, k, v)
        attn = self.attention(q, k, v, positions, kv, i, page_table)
        x = x + jnp.einsum("BTHD,HDE->BTE", attn, w["wo"])
      with jax.named_scope("mlp"):
        h = rms_norm(x, w["mlp_norm"], cfg.norm_eps)
        gate = jax.nn.silu(jnp.einsum("BTE,EF->BTF", h, w["w_gate"]))
        up = jnp.einsum("BTE,EF->BTF", h, w["w_up"])
        x = x + jnp.einsum("BTF,FE->BTE", gate * up, w["w_down"])
      return (x, kv), None

    (x, cache), _ = jax.lax.scan(layer, (x, cache), (layers, jnp.arange(cfg.num_layers)))
    if logits_at is not None:  # skip the vocab projection of tokens nobody samples from
      x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)[:, 0]  # [B, E]
    x = rms_norm(x, self.final_norm[...], cfg.norm_eps)
    head = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]  # [E, V]
    logits = jnp.einsum("...E,EV->...V", x, head, preferred_element_type=jnp.float32)
    return logits, cache


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (x32 * weight.astype(jnp.float32)).astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos and sin [B, T, D/2] for the rotate-half (HF/NeoX) RoPE convention."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = jnp.maximum(positions, 0).astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B, T, heads, D]: rotates the pairs (i, i + D/2) by the position's angle."""
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
