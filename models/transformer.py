"""Every supported family (Llama, Mistral, Qwen2, Gemma 3) as one Flax NNX decoder.

The families differ in a few switches of `ModelConfig` (biases, QK-norm, norms around each
block, the embedding scale, the MLP's activation, sliding-window layers), not in structure, so
they share one layer body: a fix or a kernel reaches all of them at once.

Precision: weights are `cfg.dtype` (bfloat16 ones stored as bits on CPU: `models.precision`).
Every matmul takes its inputs in the weights' dtype and accumulates in float32
(`preferred_element_type`), so a bfloat16 model runs bfloat16 matmuls (on XLA:CPU 2-3x the
float32 rate at 64 rows and more, and on TPU the MXU's native type). Norms, RoPE and softmax
compute in float32. Matmul results and the residual stream are float32, except on a mesh split
over `model`, where they are the weights' dtype, so that the all-reduces of partial sums move
half the bytes. The logits are always float32.

Layers are stacked on a leading `layers` axis and run under `jax.lax.scan`, so XLA compiles one
layer body whatever the depth; what differs per layer (a sliding window, its RoPE base) is data
the scan carries along. Every parameter is declared once, in `Transformer.__init__`, with its
shape and logical axis names; `sharding/` maps those names to mesh axes.

Letters: B batch, T query tokens, S key tokens, L layers, E embed, H query heads, K kv heads,
G query heads per kv head, D head dim, F mlp hidden, V vocab, P pages per sequence, N pages,
Z page size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from meshserve.models import precision
from meshserve.models.attention import AttentionBackend, KVCache, cache_slots
from meshserve.models.config import ModelConfig

ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


def _param(shape: tuple[int, ...], dtype, axes: tuple[str, ...]) -> nnx.Param:
  assert len(shape) == len(axes), (shape, axes)
  return nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes)


class Transformer(nnx.Module):
  """Decoder-only transformer: RMSNorm, RoPE, GQA attention, gated MLP, and the extras the
  config switches on. Norm weights are the factor applied (Gemma's checkpoints store it less
  one; the loaders add it back)."""

  def __init__(
    self, cfg: ModelConfig, attention: AttentionBackend | None = None, *, unroll: bool = False
  ):
    """unroll: trace every layer instead of one scanned body. Serving scans (one compiled
    layer, whatever the depth); the layout explorer unrolls a model of one and two layers, as
    XLA's cost analysis counts a loop's body once however often it runs."""
    self.cfg, self.attention, self.unroll = cfg, attention or AttentionBackend(), unroll
    L, E, F, V = cfg.num_layers, cfg.embed_dim, cfg.mlp_dim, cfg.vocab_size
    H, K, D, dt = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.dtype
    self.embed = _param((V, E), dt, ("vocab", "embed"))
    f32 = jnp.float32  # norm scales: tiny, and kept exact (Gemma's are 1 + w)
    self.attn_norm = _param((L, E), f32, ("layers", "norm"))
    self.wq = _param((L, E, H, D), dt, ("layers", "embed", "heads", "head_dim"))
    self.wk = _param((L, E, K, D), dt, ("layers", "embed", "kv_heads", "head_dim"))
    self.wv = _param((L, E, K, D), dt, ("layers", "embed", "kv_heads", "head_dim"))
    self.wo = _param((L, H, D, E), dt, ("layers", "heads", "head_dim", "embed"))
    self.mlp_norm = _param((L, E), f32, ("layers", "norm"))
    self.w_gate = _param((L, E, F), dt, ("layers", "embed", "mlp"))
    self.w_up = _param((L, E, F), dt, ("layers", "embed", "mlp"))
    self.w_down = _param((L, F, E), dt, ("layers", "mlp", "embed"))
    self.final_norm = _param((E,), f32, ("norm",))
    if not cfg.tie_embeddings:
      self.lm_head = _param((E, V), dt, ("embed", "vocab"))
    if cfg.qkv_bias:
      self.bq = _param((L, H, D), dt, ("layers", "heads", "head_dim"))
      self.bk = _param((L, K, D), dt, ("layers", "kv_heads", "head_dim"))
      self.bv = _param((L, K, D), dt, ("layers", "kv_heads", "head_dim"))
    if cfg.qk_norm:
      self.q_norm = _param((L, D), f32, ("layers", "head_dim"))
      self.k_norm = _param((L, D), f32, ("layers", "head_dim"))
    if cfg.post_norms:
      self.post_attn_norm = _param((L, E), f32, ("layers", "norm"))
      self.post_mlp_norm = _param((L, E), f32, ("layers", "norm"))

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
    # The residual stream's and the matmuls' result dtype: float32, except on a mesh that splits
    # the heads or the MLP (as the rules say), where a matmul whose contraction is split ends
    # in an all-reduce of its partial sums, which then moves the weights' dtype: half the bytes
    # of float32 in bfloat16 (each shard still accumulates in float32, as the MXU does).
    mesh = jax.sharding.get_abstract_mesh()
    rules = self.attention.rules
    split = not mesh.empty and any(
      dict(mesh.shape).get(rules.mesh_axis(a), 1) > 1 for a in ("heads", "mlp")
    )
    result = jnp.dtype(cfg.dtype) if split else jnp.dtype(jnp.float32)
    x = precision.values(self.embed[...][tokens])  # [B, T, E]
    if cfg.embed_scale != 1.0:
      x = x * jnp.asarray(cfg.embed_scale, x.dtype)  # in the weights' dtype, as trained
    x = x.astype(result)
    windows = cfg.layer_windows
    local = jnp.asarray([w > 0 for w in windows])  # [L]
    mixed = 0 < sum(w > 0 for w in windows) < cfg.num_layers  # else every layer is alike
    window = cfg.sliding_window if any(windows) else None
    rope_global = rope_tables(positions / cfg.rope_scale, cfg.head_dim, cfg.rope_theta)
    rope_local = rope_global  # a sliding layer's own base (Gemma 3), unscaled; else the same
    if cfg.rope_local_theta is not None:
      rope_local = rope_tables(positions, cfg.head_dim, cfg.rope_local_theta)
    # The kernels scale q.k by D ** -0.5; a family with its own scale folds the ratio into q.
    q_scale = 1.0 if cfg.query_scale is None else cfg.query_scale * cfg.head_dim**0.5
    activation = ACTIVATIONS[cfg.activation]
    names = ["attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down"]
    names += ["bq", "bk", "bv"] if cfg.qkv_bias else []
    names += ["q_norm", "k_norm"] if cfg.qk_norm else []
    names += ["post_attn_norm", "post_mlp_norm"] if cfg.post_norms else []
    layers = {name: getattr(self, name)[...] for name in names}  # sliced by the scan

    slots = None if cache is None else cache_slots(positions, page_table, cache.page_size)

    def project(h, w, b, spec):
      out = matmul(spec, h, w, result)
      return out if b is None else out + b.astype(result)

    def layer(carry, xs):
      x, kv = carry
      w, i, is_local = xs
      w = {name: precision.values(a) for name, a in w.items()}
      with jax.named_scope("attention"):
        h = rms_norm(x, w["attn_norm"], cfg.norm_eps)
        q = project(h, w["wq"], w.get("bq"), "BTE,EHD->BTHD")
        k = project(h, w["wk"], w.get("bk"), "BTE,EKD->BTKD")
        v = project(h, w["wv"], w.get("bv"), "BTE,EKD->BTKD")
        if cfg.qk_norm:
          q, k = rms_norm(q, w["q_norm"], cfg.norm_eps), rms_norm(k, w["k_norm"], cfg.norm_eps)
        if mixed:
          cos, sin = (
            jnp.where(is_local, a, b) for a, b in zip(rope_local, rope_global, strict=True)
          )
        else:
          cos, sin = rope_local if windows[0] else rope_global
        q, k = apply_rope(q, cos, sin, q_scale), apply_rope(k, cos, sin)
        q, k, v = (a.astype(cfg.dtype) for a in (q, k, v))  # attention reads the KV's dtype
        if kv is not None:
          kv = kv.write(i, slots, k, v)
        attn = self.attention(
          q, k, v, positions, kv, i, page_table,
          window=window, local=is_local if mixed else None,
        )  # fmt: skip
        out = matmul("BTHD,HDE->BTE", attn, w["wo"], result)
        if cfg.post_norms:
          out = rms_norm(out, w["post_attn_norm"], cfg.norm_eps)
        x = x + out
      with jax.named_scope("mlp"):
        h = rms_norm(x, w["mlp_norm"], cfg.norm_eps)
        gate = activation(matmul("BTE,EF->BTF", h, w["w_gate"], result))
        up = matmul("BTE,EF->BTF", h, w["w_up"], result)
        out = matmul("BTF,FE->BTE", gate * up, w["w_down"], result)
        if cfg.post_norms:
          out = rms_norm(out, w["post_mlp_norm"], cfg.norm_eps)
        x = x + out
      return (x, kv), None

    xs = (layers, jnp.arange(cfg.num_layers), local)
    (x, cache), _ = jax.lax.scan(layer, (x, cache), xs, unroll=self.unroll)
    if logits_at is not None:  # skip the vocab projection of tokens nobody samples from
      x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)[:, 0]  # [B, E]
    x = rms_norm(x, self.final_norm[...], cfg.norm_eps)
    if cfg.tie_embeddings:
      logits = vocab_projection(x, self.embed[...], vocab_axis=0)  # embed [V, E]
    else:
      logits = vocab_projection(x, self.lm_head[...], vocab_axis=1)  # lm_head [E, V]
    return logits, cache


def vocab_projection(x: jax.Array, head: jax.Array, vocab_axis: int, block: int = 4096):
  """float32 logits [..., V] of x [..., E] against the (stored) head.

  A head stored as bits (bfloat16 on CPU) is read a vocabulary block at a time: XLA:CPU then
  runs each block's matmul in bfloat16, where a single [E, V] matmul makes it convert the
  whole head to float32 first, on every step (see models.precision)."""
  spec = "...E,VE->...V" if vocab_axis == 0 else "...E,EV->...V"
  V = head.shape[vocab_axis]
  if head.dtype != precision.BITS or block >= V:
    return matmul(spec, x, precision.values(head))
  n, tail = divmod(V, block)

  def project(i):
    part = jax.lax.dynamic_slice_in_dim(head, i * block, block, axis=vocab_axis)
    return matmul(spec, x, precision.values(part))

  logits = jax.lax.map(project, jnp.arange(n))  # [n, ..., block]
  logits = jnp.moveaxis(logits, 0, -2).reshape(*x.shape[:-1], n * block)
  if tail:  # the last V - n * block entries, a block of their own
    part = jax.lax.slice_in_dim(head, n * block, V, axis=vocab_axis)
    logits = jnp.concatenate([logits, matmul(spec, x, precision.values(part))], axis=-1)
  return logits


def matmul(spec: str, x: jax.Array, w: jax.Array, result=jnp.float32) -> jax.Array:
  """einsum(spec, x, w) with x in w's dtype, accumulated in float32 and returned as `result`."""
  return jnp.einsum(spec, x.astype(w.dtype), w, preferred_element_type=result)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """Over the last axis; weight has that axis's size."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (x32 * weight.astype(jnp.float32)).astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos and sin [B, T, D/2] for the rotate-half (HF/NeoX) RoPE convention."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = jnp.maximum(positions, 0).astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, scale: float = 1.0) -> jax.Array:
  """x [B, T, heads, D]: rotates the pairs (i, i + D/2) by the position's angle (and scales
  them, in float32)."""
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  cos, sin = cos[:, :, None, :] * scale, sin[:, :, None, :] * scale
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
