"""Reads a llama.cpp GGUF file: metadata -> ModelConfig, tensors -> float32 numpy arrays.

Dequantization is the `gguf` package's; this module only maps names and layouts. llama.cpp's
converter permutes the rows of attn_q / attn_k so its RoPE can rotate adjacent pairs; we undo
that so the model uses the rotate-half convention of the original (HF) checkpoint.
"""

from __future__ import annotations

import logging
import pathlib
import time

import gguf
import numpy as np
from tqdm.auto import tqdm

from models.config import ModelConfig

log = logging.getLogger(__name__)

SUPPORTED_ARCHS = ("llama",)
SUPPORTED_TYPES = {
  gguf.GGMLQuantizationType.F32,
  gguf.GGMLQuantizationType.F16,
  gguf.GGMLQuantizationType.BF16,
  gguf.GGMLQuantizationType.Q8_0,
  gguf.GGMLQuantizationType.Q4_0,
  gguf.GGMLQuantizationType.Q4_1,
  gguf.GGMLQuantizationType.Q4_K,
  gguf.GGMLQuantizationType.Q5_K,
  gguf.GGMLQuantizationType.Q6_K,
}


EOS_KEYS = (
  "tokenizer.ggml.eos_token_id",
  "tokenizer.ggml.eot_token_id",
  "tokenizer.ggml.eom_token_id",
)


class GGUFFile:
  """An open GGUF file: typed access to its metadata and its dequantized tensors."""

  def __init__(self, path: str | pathlib.Path):
    self.path = pathlib.Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(f"GGUF file not found: {self.path}")
    try:
      self.reader = gguf.GGUFReader(str(self.path))
    except Exception as e:  # the gguf package raises bare ValueError/struct errors
      raise ValueError(f"{self.path} is not a readable GGUF file: {e}") from e
    self.tensors = {t.name: t for t in self.reader.tensors}

  def meta(self, key: str, default=None):
    field = self.reader.fields.get(key)
    return default if field is None else field.contents()

  def require(self, key: str):
    value = self.meta(key)
    if value is None:
      raise ValueError(f"{self.path.name}: GGUF metadata lacks {key!r}")
    return value

  def tensor(self, name: str) -> np.ndarray:
    """The tensor as float32, in numpy (row-major) order: a linear layer is [out, in]."""
    t = self.tensors[name]
    if t.tensor_type not in SUPPORTED_TYPES:
      raise ValueError(f"{name}: unsupported GGUF tensor type {t.tensor_type.name}")
    data = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))

  def config(self, name: str) -> ModelConfig:
    arch = self.require("general.architecture")
    if arch not in SUPPORTED_ARCHS:
      raise ValueError(f"{self.path.name}: unsupported architecture {arch!r}")
    a = lambda key: self.require(f"{arch}.{key}")
    embed_dim, num_heads = int(a("embedding_length")), int(a("attention.head_count"))
    vocab = self.meta(f"{arch}.vocab_size") or len(self.require("tokenizer.ggml.tokens"))
    # Every id that ends a turn: EOS, and end-of-turn / end-of-message where the model has
    # them (Llama 3's <|eot_id|> ends a chat, not its EOS).
    eos = tuple(sorted({int(i) for k in EOS_KEYS if (i := self.meta(k)) is not None}))
    scaling = self.meta(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none") or "rope_freqs.weight" in self.tensors:
      raise ValueError(
        f"{self.path.name}: {arch}.rope.scaling.type {scaling!r} (rope scaling) is not supported"
      )
    return ModelConfig(
      name=name,
      arch=arch,
      vocab_size=int(vocab),
      embed_dim=embed_dim,
      mlp_dim=int(a("feed_forward_length")),
      num_layers=int(a("block_count")),
      num_heads=num_heads,
      num_kv_heads=int(self.meta(f"{arch}.attention.head_count_kv") or num_heads),
      head_dim=int(self.meta(f"{arch}.rope.dimension_count") or embed_dim // num_heads),
      rope_theta=float(self.meta(f"{arch}.rope.freq_base", 10000.0)),
      norm_eps=float(a("attention.layer_norm_rms_epsilon")),
      max_context=int(a("context_length")),
      tie_embeddings="output.weight" not in self.tensors,
      bos_token_id=self.meta("tokenizer.ggml.bos_token_id"),
      eos_token_ids=eos,
    )


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's `permute`: w [heads*D, E] back to HF row order."""
  rows = w.shape[0]
  return (
    w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
  )


def load_llama_weights(f: GGUFFile, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """float32 arrays keyed and shaped like `models.llama.Llama`'s parameters."""
  L, E, H, K, D = cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  per_layer = {  # our name -> (GGUF name, transform of the [out, in] matrix)
    "attn_norm": ("attn_norm", lambda w: w),
    "wq": ("attn_q", lambda w: unpermute_rope_rows(w, H).T.reshape(E, H, D)),
    "wk": ("attn_k", lambda w: unpermute_rope_rows(w, K).T.reshape(E, K, D)),
    "wv": ("attn_v", lambda w: w.T.reshape(E, K, D)),
    "wo": ("attn_output", lambda w: w.T.reshape(H, D, E)),
    "mlp_norm": ("ffn_norm", lambda w: w),
    "w_gate": ("ffn_gate", lambda w: w.T),
    "w_up": ("ffn_up", lambda w: w.T),
    "w_down": ("ffn_down", lambda w: w.T),
  }
  total = 2 + L * len(per_layer) + (0 if cfg.tie_embeddings else 1)
  start = time.perf_counter()
  out: dict[str, np.ndarray] = {}
  with tqdm(total=total, desc=f"loading {f.path.name}", unit="tensor", leave=False) as bar:

    def get(name):
      bar.update(1)
      return f.tensor(name)

    out["embed"] = get("token_embd.weight")
    for ours, (theirs, fn) in per_layer.items():
      out[ours] = np.stack([fn(get(f"blk.{i}.{theirs}.weight")) for i in range(L)])
    out["final_norm"] = get("output_norm.weight")
    if not cfg.tie_embeddings:
      out["lm_head"] = get("output.weight").T
  used = {"token_embd.weight", "output_norm.weight", "output.weight"}
  used |= {f"blk.{i}.{theirs}.weight" for i in range(L) for theirs, _ in per_layer.values()}
  if unused := sorted(set(f.tensors) - used):
    shown = ", ".join(unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
    raise ValueError(f"{f.path.name}: tensors this model does not use: {shown}")
  log.info("loaded %d tensors from %s in %.1fs", total, f.path.name, time.perf_counter() - start)
  return out
