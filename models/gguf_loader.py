"""Reads a llama.cpp GGUF file: metadata -> ModelConfig, tensors -> float32 numpy arrays.

Dequantization is the `gguf` package's; this module only maps names and layouts. For the
`llama` architecture llama.cpp's converter permutes the rows of attn_q / attn_k so its RoPE can
rotate adjacent pairs; we undo that so the model uses the rotate-half convention of the original
(HF) checkpoint. `gemma3` files keep HF's order, and store Gemma's norm weights already plus one
(the factor applied), which is what `Transformer` takes.
"""

from __future__ import annotations

import logging
import pathlib
import time

import gguf
import numpy as np
from tqdm.auto import tqdm

from meshserve.models.config import ModelConfig

log = logging.getLogger(__name__)

SUPPORTED_ARCHS = ("llama", "gemma3")
SUPPORTED_TYPES = {
  gguf.GGMLQuantizationType.F32,
  gguf.GGMLQuantizationType.F16,
  gguf.GGMLQuantizationType.BF16,
  gguf.GGMLQuantizationType.Q8_0,
  gguf.GGMLQuantizationType.Q4_0,
  gguf.GGMLQuantizationType.Q4_1,
  gguf.GGMLQuantizationType.Q5_0,
  gguf.GGMLQuantizationType.Q5_1,
  gguf.GGMLQuantizationType.Q4_K,
  gguf.GGMLQuantizationType.Q5_K,
  gguf.GGMLQuantizationType.Q6_K,
}


EOS_KEYS = (
  "tokenizer.ggml.eos_token_id",
  "tokenizer.ggml.eot_token_id",
  "tokenizer.ggml.eom_token_id",
)
# Control tokens that end a turn in files that do not name them (as llama.cpp finds them).
END_OF_TURN = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>")
_CONTROL = 3  # GGUF token type of a control token

# Gemma 3 facts that its GGUF metadata leaves out (llama.cpp hard-codes them too): every sixth
# layer is global, the others slide; sliding layers use RoPE base 10000.
GEMMA3_GLOBAL_EVERY = 6
GEMMA3_LOCAL_ROPE_THETA = 10000.0


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
      raise ValueError(
        f"{self.path.name}: unsupported architecture {arch!r}; supported: {SUPPORTED_ARCHS}"
      )
    a = lambda key: self.require(f"{arch}.{key}")
    embed_dim, num_heads = int(a("embedding_length")), int(a("attention.head_count"))
    num_layers = int(a("block_count"))
    head_dim = self.meta(f"{arch}.attention.key_length") or self.meta(
      f"{arch}.rope.dimension_count", embed_dim // num_heads
    )
    vocab = self.meta(f"{arch}.vocab_size") or len(self.require("tokenizer.ggml.tokens"))
    return ModelConfig(
      name=name,
      arch=arch,
      vocab_size=int(vocab),
      embed_dim=embed_dim,
      mlp_dim=int(a("feed_forward_length")),
      num_layers=num_layers,
      num_heads=num_heads,
      num_kv_heads=int(self.meta(f"{arch}.attention.head_count_kv") or num_heads),
      head_dim=int(head_dim),
      rope_theta=float(self.meta(f"{arch}.rope.freq_base", 10000.0)),
      norm_eps=float(a("attention.layer_norm_rms_epsilon")),
      max_context=int(a("context_length")),
      tie_embeddings="output.weight" not in self.tensors,
      bos_token_id=self.meta("tokenizer.ggml.bos_token_id"),
      eos_token_ids=self.eos_token_ids(),
      rope_scale=self._rope_scale(arch),
      **(self._gemma3(embed_dim, num_heads, num_layers) if arch == "gemma3" else {}),
    )

  def eos_token_ids(self) -> tuple[int, ...]:
    """Every id that ends a turn: EOS, and end-of-turn / end-of-message where the model has
    them (Llama 3's <|eot_id|> ends a chat, not its EOS; so does Gemma's <end_of_turn>)."""
    eos = {int(i) for k in EOS_KEYS if (i := self.meta(k)) is not None}
    if self.meta("tokenizer.ggml.eot_token_id") is None:
      tokens = self.meta("tokenizer.ggml.tokens") or []
      types = self.meta("tokenizer.ggml.token_type") or []
      ids = {t: i for i, t in enumerate(tokens) if t in END_OF_TURN}
      eos |= {i for i in ids.values() if i < len(types) and types[i] == _CONTROL}
    return tuple(sorted(eos))

  def _rope_scale(self, arch: str) -> float:
    scaling = self.meta(f"{arch}.rope.scaling.type")
    if scaling in (None, "none") and "rope_freqs.weight" not in self.tensors:
      return 1.0
    if scaling == "linear":
      return float(self.require(f"{arch}.rope.scaling.factor"))
    raise ValueError(
      f"{self.path.name}: {arch}.rope.scaling.type {scaling!r} (rope scaling) is not supported"
    )

  def _gemma3(self, embed_dim: int, num_heads: int, num_layers: int) -> dict:
    window = self.require("gemma3.attention.sliding_window")
    return dict(
      qk_norm=True,
      post_norms=True,
      embed_scale=embed_dim**0.5,
      activation="gelu_tanh",
      # query_pre_attn_scalar, which GGUF does not carry: the head dim, but E / H for the 27B
      # model (62 layers), as llama.cpp has it.
      query_scale=(embed_dim // num_heads) ** -0.5 if num_layers == 62 else None,
      sliding_window=int(window),
      sliding_layers=tuple((i + 1) % GEMMA3_GLOBAL_EVERY != 0 for i in range(num_layers)),
      rope_local_theta=GEMMA3_LOCAL_ROPE_THETA,
    )


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's `permute`: w [heads*D, E] back to HF row order."""
  rows = w.shape[0]
  return (
    w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
  )


def load_weights(f: GGUFFile, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """float32 arrays keyed and shaped like `models.transformer.Transformer`'s parameters."""
  L, E, H, K, D = cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  # llama.cpp permutes q/k rows only for the `llama` architecture.
  rows = (lambda w, heads: unpermute_rope_rows(w, heads)) if cfg.arch == "llama" else None
  q_rows = (lambda w: rows(w, H)) if rows else (lambda w: w)
  k_rows = (lambda w: rows(w, K)) if rows else (lambda w: w)
  per_layer = {  # our name -> (GGUF name, transform of the [out, in] matrix)
    "attn_norm": ("attn_norm", lambda w: w),
    "wq": ("attn_q", lambda w: q_rows(w).T.reshape(E, H, D)),
    "wk": ("attn_k", lambda w: k_rows(w).T.reshape(E, K, D)),
    "wv": ("attn_v", lambda w: w.T.reshape(E, K, D)),
    "wo": ("attn_output", lambda w: w.T.reshape(H, D, E)),
    "mlp_norm": ("ffn_norm", lambda w: w),
    "w_gate": ("ffn_gate", lambda w: w.T),
    "w_up": ("ffn_up", lambda w: w.T),
    "w_down": ("ffn_down", lambda w: w.T),
  }
  if cfg.qk_norm:
    per_layer |= {"q_norm": ("attn_q_norm", lambda w: w), "k_norm": ("attn_k_norm", lambda w: w)}
  if cfg.post_norms:
    per_layer |= {
      "post_attn_norm": ("post_attention_norm", lambda w: w),
      "post_mlp_norm": ("post_ffw_norm", lambda w: w),
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
