"""Tiny Hugging Face checkpoint directories and an independent NumPy forward pass over them.

`write_hf_dir` writes a random-weight Llama / Mistral / Qwen2 / Gemma 3 directory (config.json,
safetensors, tokenizer files) and `numpy_forward` computes its logits the way HF transformers
does, in float64, without any of the project's model code.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import numpy as np
from safetensors.numpy import load_file, save_file
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

ARCHITECTURES = {
  "llama": ("LlamaForCausalLM", "llama"),
  "mistral": ("MistralForCausalLM", "mistral"),
  "qwen2": ("Qwen2ForCausalLM", "qwen2"),
  "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
}
# ids 0..7: specials and chat role markers; 8..15 punctuation; 16..41 "a".."z"; 42..95 words.
SPECIALS = ["<pad>", "<s>", "</s>", "<|eot|>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
PUNCTUATION = [".", ",", "!", "?", "'", ":", ";", "-"]
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
_WORDS = (
  "hello world the of and to in is it you that he was for on are with as they be at one "
  "have this from or by not but what all we when your can said there how hi capital "
  "france paris tell me story once upon time cat dog big small red blue"
)
WORDS = _WORDS.split()
VOCAB = SPECIALS + PUNCTUATION + LETTERS + WORDS
CHAT_TEMPLATE = (
  "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}<|eot|>"
  "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _config(arch: str, tie: bool) -> dict:
  architecture, model_type = ARCHITECTURES[arch]
  gemma = arch == "gemma3"
  cfg = {
    "architectures": [architecture],
    "model_type": model_type,
    "vocab_size": len(VOCAB),
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 4 if gemma else 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16 if gemma else 8,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1e6 if gemma else 10000.0,
    "max_position_embeddings": 128,
    "tie_word_embeddings": True if gemma else tie,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
    "rope_scaling": None,
  }
  if arch == "mistral":
    cfg["sliding_window"] = 5
  elif arch == "qwen2":
    cfg |= {"use_sliding_window": False, "sliding_window": None}
  elif gemma:
    cfg |= {
      "sliding_window": 5,
      "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
      "rope_local_base_freq": 10000.0,
      "query_pre_attn_scalar": 12,
      "hidden_activation": "gelu_pytorch_tanh",
      "final_logit_softcapping": None,
      "attn_logit_softcapping": None,
    }
  return cfg


def _weights(cfg: dict, arch: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
  E, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
  H, K, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
  gemma = arch == "gemma3"

  def rand(*shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.2).astype(np.float32)

  def norm(n: int) -> np.ndarray:  # Gemma multiplies by (1 + w), the others by w
    return ((0.0 if gemma else 1.0) + rng.standard_normal(n) * 0.1).astype(np.float32)

  w = {"model.embed_tokens.weight": rand(V, E)}
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    w[p + "input_layernorm.weight"] = norm(E)
    for name, out in (("q", H * D), ("k", K * D), ("v", K * D)):
      w[p + f"self_attn.{name}_proj.weight"] = rand(out, E)
      if arch == "qwen2":
        w[p + f"self_attn.{name}_proj.bias"] = rand(out)
    w[p + "self_attn.o_proj.weight"] = rand(E, H * D)
    if gemma:
      w[p + "self_attn.q_norm.weight"], w[p + "self_attn.k_norm.weight"] = norm(D), norm(D)
    w[p + "post_attention_layernorm.weight"] = norm(E)
    if gemma:
      w[p + "pre_feedforward_layernorm.weight"] = norm(E)
      w[p + "post_feedforward_layernorm.weight"] = norm(E)
    w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"] = rand(F, E), rand(F, E)
    w[p + "mlp.down_proj.weight"] = rand(E, F)
  w["model.norm.weight"] = norm(E)
  if not cfg["tie_word_embeddings"]:
    w["lm_head.weight"] = rand(V, E)
  return w


def _tokenizer() -> Tokenizer:
  tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
  return tok


def write_hf_dir(
  path: pathlib.Path, arch: str, *, sharded: bool = False, seed: int = 0, tie: bool = False
) -> dict:
  """Writes a tiny random-weight HF checkpoint directory for `arch`; returns its config.json."""
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  cfg = _config(arch, tie)
  weights = _weights(cfg, arch, np.random.default_rng(seed))
  (path / "config.json").write_text(json.dumps(cfg, indent=2))
  if sharded:
    names = list(weights)
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for file, part in zip(files, halves, strict=True):
      save_file({n: weights[n] for n in part}, str(path / file))
      weight_map |= {n: file for n in part}
    total = sum(int(a.nbytes) for a in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
  else:
    save_file(weights, str(path / "model.safetensors"))
  _tokenizer().save(str(path / "tokenizer.json"))
  tok_cfg = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "add_bos_token": True,
    "chat_template": CHAT_TEMPLATE,
  }
  (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
  gen_cfg = {"bos_token_id": 1, "eos_token_id": [2, 3]}
  (path / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
  return cfg


def _load(path: pathlib.Path) -> dict[str, np.ndarray]:
  index = path / "model.safetensors.index.json"
  if index.exists():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  else:
    files = ["model.safetensors"]
  w = {}
  for f in files:
    w |= {k: v.astype(np.float64) for k, v in load_file(str(path / f)).items()}
  return w


def _rope(x: np.ndarray, theta: float) -> np.ndarray:
  """Rotate-half RoPE of x [T, heads, D] at positions 0..T-1."""
  T, _, D = x.shape
  inv_freq = 1.0 / theta ** (np.arange(0, D, 2, dtype=np.float64) / D)
  angle = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None, :]
  angle = np.concatenate([angle, angle], axis=-1)[:, None, :]
  x1, x2 = x[..., : D // 2], x[..., D // 2 :]
  return x * np.cos(angle) + np.concatenate([-x2, x1], axis=-1) * np.sin(angle)


def numpy_forward(path: pathlib.Path, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
  """float64 logits [T, V] of one sequence at positions 0..T-1, with HF transformers semantics."""
  path = pathlib.Path(path)
  cfg = json.loads((path / "config.json").read_text())
  w = _load(path)
  gemma = cfg["model_type"] == "gemma3_text"
  eps, E = cfg["rms_norm_eps"], cfg["hidden_size"]
  H, K, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
  L = cfg["num_hidden_layers"]

  def rms(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * (1.0 + weight) if gemma else x * weight

  def linear(x: np.ndarray, name: str) -> np.ndarray:
    y = x @ w[name + ".weight"].T
    return y + w[name + ".bias"] if name + ".bias" in w else y

  def act(x: np.ndarray) -> np.ndarray:
    if gemma:
      return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))
    return x / (1.0 + np.exp(-x))

  ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
  T = len(ids)
  x = w["model.embed_tokens.weight"][ids] * (np.sqrt(E) if gemma else 1.0)
  if gemma:
    sliding = [t == "sliding_attention" for t in cfg["layer_types"]]
  else:
    sliding = [cfg.get("sliding_window") is not None and cfg.get("use_sliding_window", True)] * L
  scale = cfg["query_pre_attn_scalar"] ** -0.5 if gemma else D**-0.5
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  for layer in range(L):
    p = f"model.layers.{layer}."
    h = rms(x, w[p + "input_layernorm.weight"])
    q = linear(h, p + "self_attn.q_proj").reshape(T, H, D)
    k = linear(h, p + "self_attn.k_proj").reshape(T, K, D)
    v = linear(h, p + "self_attn.v_proj").reshape(T, K, D)
    theta = cfg["rope_theta"]
    if gemma:
      q, k = rms(q, w[p + "self_attn.q_norm.weight"]), rms(k, w[p + "self_attn.k_norm.weight"])
      theta = cfg["rope_local_base_freq"] if sliding[layer] else theta
    q, k = _rope(q, theta), _rope(k, theta)
    G = H // K
    k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)  # query head h -> kv head h // G
    scores = np.einsum("thd,shd->hts", q, k) * scale
    allowed = j <= i
    if sliding[layer]:
      allowed = allowed & (j > i - cfg["sliding_window"])
    scores = np.where(allowed[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    attn = linear(np.einsum("hts,shd->thd", probs, v).reshape(T, H * D), p + "self_attn.o_proj")
    if gemma:
      x = x + rms(attn, w[p + "post_attention_layernorm.weight"])
      h = rms(x, w[p + "pre_feedforward_layernorm.weight"])
    else:
      x = x + attn
      h = rms(x, w[p + "post_attention_layernorm.weight"])
    gated = act(linear(h, p + "mlp.gate_proj")) * linear(h, p + "mlp.up_proj")
    mlp = linear(gated, p + "mlp.down_proj")
    x = x + (rms(mlp, w[p + "post_feedforward_layernorm.weight"]) if gemma else mlp)
  x = rms(x, w["model.norm.weight"])
  tied = cfg.get("tie_word_embeddings", gemma) or "lm_head.weight" not in w
  head = w["model.embed_tokens.weight"] if tied else w["lm_head.weight"]
  return x @ head.T
