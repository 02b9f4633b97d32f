"""Reads a Hugging Face checkpoint directory: config.json, *.safetensors and the tokenizer files.

    config.json                    architecture and sizes -> ModelConfig
    model.safetensors              the weights, or model-0000i-of-0000n.safetensors files listed
                                   by model.safetensors.index.json
    tokenizer.json                 the `tokenizers` tokenizer, as published
    tokenizer_config.json          BOS and EOS tokens, add_bos_token, the chat template (or a
                                   chat_template.jinja file beside it)
    generation_config.json         more ids that end a reply (Llama 3's <|eot_id|>)

Weights stream: each parameter is built shard by shard with `jax.make_array_from_callback`, and
a shard reads only the layers it covers, one tensor at a time: the host holds at most the
shards of one parameter (one weight kind over every layer), never a copy of the whole model.
Anything the model would not use, or cannot use as it is, is refused by name.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from collections.abc import Callable

import jax
import numpy as np
import tokenizers
from safetensors import safe_open
from tqdm.auto import tqdm

from meshserve.models.config import ModelConfig
from meshserve.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

ARCHITECTURES = {
  "LlamaForCausalLM": "llama",
  "MistralForCausalLM": "mistral",
  "Qwen2ForCausalLM": "qwen2",
  "Gemma3ForCausalLM": "gemma3",
}
# Buffers some exports save beside the weights, recomputed by every model that needs them.
REDUNDANT_SUFFIXES = (".rotary_emb.inv_freq",)


def is_hf_dir(path: str | pathlib.Path) -> bool:
  return (pathlib.Path(path) / "config.json").is_file()


def _read_json(path: pathlib.Path, required: bool = True) -> dict:
  if not path.is_file():
    if required:
      raise FileNotFoundError(f"{path.parent}: no {path.name}")
    return {}
  return json.loads(path.read_text())


def _ids(value) -> set[int]:
  if value is None:
    return set()
  return {int(v) for v in value} if isinstance(value, list) else {int(value)}


def read_config(path: pathlib.Path, name: str) -> ModelConfig:
  """The ModelConfig of an HF directory. Raises ValueError naming the field it cannot take."""
  c = _read_json(path / "config.json")
  where = f"{path.name}/config.json"
  archs = c.get("architectures") or []
  if len(archs) != 1 or archs[0] not in ARCHITECTURES:
    raise ValueError(
      f"{where}: architectures {archs} is not supported; supported: {sorted(ARCHITECTURES)}"
    )
  arch = ARCHITECTURES[archs[0]]

  def refuse_unless(field: str, ok: bool, why: str):
    if not ok:
      raise ValueError(f"{where}: {field} = {c.get(field)!r} is not supported ({why})")

  refuse_unless("attention_bias", not c.get("attention_bias"), "attention biases")
  refuse_unless("mlp_bias", not c.get("mlp_bias"), "MLP biases")
  scaling = c.get("rope_scaling")
  kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
  refuse_unless("rope_scaling", kind in (None, "default", "linear"), "only linear scaling")
  activation = c.get("hidden_activation") or c.get("hidden_act")
  if arch == "gemma3":
    refuse_unless("hidden_activation", activation == "gelu_pytorch_tanh", "GeGLU with tanh")
    for field in ("final_logit_softcapping", "attn_logit_softcapping"):
      refuse_unless(field, c.get(field) is None, "logit soft-capping")
  else:
    refuse_unless("hidden_act", activation in (None, "silu"), "SwiGLU only")
  if arch == "qwen2":
    refuse_unless("use_sliding_window", not c.get("use_sliding_window"), "per-layer windows")

  E, H, L = c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"]
  D = c.get("head_dim") or E // H
  gen = _read_json(path / "generation_config.json", required=False)
  fields = dict(
    name=name,
    arch=arch,
    vocab_size=c["vocab_size"],
    embed_dim=E,
    mlp_dim=c["intermediate_size"],
    num_layers=L,
    num_heads=H,
    num_kv_heads=c.get("num_key_value_heads") or H,
    head_dim=D,
    rope_theta=float(c.get("rope_theta", 10000.0)),
    norm_eps=float(c.get("rms_norm_eps", 1e-6)),
    max_context=c.get("max_position_embeddings", 2048),
    tie_embeddings=bool(c.get("tie_word_embeddings", arch == "gemma3")),
    bos_token_id=c.get("bos_token_id"),
    eos_token_ids=tuple(sorted(_ids(c.get("eos_token_id")) | _ids(gen.get("eos_token_id")))),
    rope_scale=float(scaling["factor"]) if kind == "linear" else 1.0,
    qkv_bias=arch == "qwen2",
  )
  if arch == "mistral" and c.get("sliding_window"):
    fields |= dict(sliding_window=int(c["sliding_window"]))
  if arch == "gemma3":
    types = c.get("layer_types") or [
      "full_attention" if (i + 1) % c.get("sliding_window_pattern", 6) == 0 else "sliding"
      for i in range(L)
    ]
    fields |= dict(
      qk_norm=True,
      post_norms=True,
      embed_scale=E**0.5,
      activation="gelu_tanh",
      query_scale=float(c.get("query_pre_attn_scalar", D)) ** -0.5,
      sliding_window=int(c.get("sliding_window", 512)),
      sliding_layers=tuple(t != "full_attention" for t in types),
      rope_local_theta=float(c.get("rope_local_base_freq", 10000.0)),
    )
  return ModelConfig(**fields)


def read_tokenizer(path: pathlib.Path, config: ModelConfig) -> Tokenizer:
  hf = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
  tc = _read_json(path / "tokenizer_config.json", required=False)

  def token_id(field: str) -> int | None:
    token = tc.get(field)
    token = token.get("content") if isinstance(token, dict) else token
    if token is None:
      return None
    if (i := hf.token_to_id(token)) is None:
      raise ValueError(f"{path.name}/tokenizer_config.json: {field} {token!r} is not in the vocab")
    return i

  bos = token_id("bos_token")
  bos = config.bos_token_id if bos is None else bos
  eos = token_id("eos_token")
  eos = eos if eos is not None else (config.eos_token_ids or (None,))[0]
  # Whether text gets BOS: as the config says, else as the tokenizer's own post-processor does
  # (Llama 3's tokenizer.json adds <|begin_of_text|> itself).
  add_bos = tc.get("add_bos_token")
  if add_bos is None:
    add_bos = bos is not None and hf.encode("a", add_special_tokens=True).ids[:1] == [bos]
  template = tc.get("chat_template")
  if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
    template = next((t["template"] for t in template if t.get("name") == "default"), None)
  if template is None and (path / "chat_template.jinja").is_file():
    template = (path / "chat_template.jinja").read_text()
  return Tokenizer(
    hf, bos_token_id=bos, eos_token_id=eos, add_bos=bool(add_bos), chat_template=template
  )


class SafetensorsDir:
  """The tensors of a directory's safetensors files, by name, read one at a time."""

  def __init__(self, path: pathlib.Path):
    index = path / "model.safetensors.index.json"
    if index.is_file():
      weight_map = _read_json(index)["weight_map"]
      files = {name: path / file for name, file in weight_map.items()}
    elif (path / "model.safetensors").is_file():
      with safe_open(path / "model.safetensors", framework="numpy") as f:
        files = dict.fromkeys(f.keys(), path / "model.safetensors")
    else:
      raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    self.path, self.files = path, files
    self._open: dict[pathlib.Path, object] = {}

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._file(name).get_slice(name).get_shape())

  def tensor(self, name: str) -> np.ndarray:
    return self._file(name).get_tensor(name)

  def _file(self, name: str):
    if name not in self.files:
      raise ValueError(f"{self.path.name}: the checkpoint lacks the tensor {name!r}")
    file = self.files[name]
    if file not in self._open:
      self._open[file] = safe_open(file, framework="numpy")
    return self._open[file]


@dataclasses.dataclass(frozen=True)
class Source:
  """Where one of our parameters comes from: an HF tensor name (with {i} for the layer, when
  the parameter is stacked over layers), the tensor's shape there, and the map to our layout."""

  name: str
  shape: tuple[int, ...]
  to_ours: Callable[[np.ndarray], np.ndarray] = lambda w: w
  norm_offset: float = 0.0  # Gemma stores its norm weights less one

  def read(self, st: SafetensorsDir, i: int | None = None) -> np.ndarray:
    return self.to_ours(st.tensor(self.name.format(i=i)).astype(np.float32) + self.norm_offset)


def sources(cfg: ModelConfig) -> dict[str, Source]:
  """Our parameter name -> its Source, for the config's architecture."""
  E, F, V = cfg.embed_dim, cfg.mlp_dim, cfg.vocab_size
  H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  layer = "model.layers.{i}."
  shift = 1.0 if cfg.arch == "gemma3" else 0.0

  def norm(name: str, size: int = E) -> Source:
    return Source(name, (size,), norm_offset=shift)

  out = {
    "embed": Source("model.embed_tokens.weight", (V, E)),
    "final_norm": norm("model.norm.weight"),
    "attn_norm": norm(layer + "input_layernorm.weight"),
    "wq": Source(layer + "self_attn.q_proj.weight", (H * D, E), lambda w: w.T.reshape(E, H, D)),
    "wk": Source(layer + "self_attn.k_proj.weight", (K * D, E), lambda w: w.T.reshape(E, K, D)),
    "wv": Source(layer + "self_attn.v_proj.weight", (K * D, E), lambda w: w.T.reshape(E, K, D)),
    "wo": Source(layer + "self_attn.o_proj.weight", (E, H * D), lambda w: w.T.reshape(H, D, E)),
    "w_gate": Source(layer + "mlp.gate_proj.weight", (F, E), lambda w: w.T),
    "w_up": Source(layer + "mlp.up_proj.weight", (F, E), lambda w: w.T),
    "w_down": Source(layer + "mlp.down_proj.weight", (E, F), lambda w: w.T),
  }
  if not cfg.tie_embeddings:
    out["lm_head"] = Source("lm_head.weight", (V, E), lambda w: w.T)
  if cfg.qkv_bias:
    out["bq"] = Source(layer + "self_attn.q_proj.bias", (H * D,), lambda b: b.reshape(H, D))
    out["bk"] = Source(layer + "self_attn.k_proj.bias", (K * D,), lambda b: b.reshape(K, D))
    out["bv"] = Source(layer + "self_attn.v_proj.bias", (K * D,), lambda b: b.reshape(K, D))
  if cfg.qk_norm:
    out["q_norm"] = norm(layer + "self_attn.q_norm.weight", D)
    out["k_norm"] = norm(layer + "self_attn.k_norm.weight", D)
  if cfg.post_norms:  # Gemma's names: its post_attention_layernorm follows attention
    out["post_attn_norm"] = norm(layer + "post_attention_layernorm.weight")
    out["mlp_norm"] = norm(layer + "pre_feedforward_layernorm.weight")
    out["post_mlp_norm"] = norm(layer + "post_feedforward_layernorm.weight")
  else:
    out["mlp_norm"] = norm(layer + "post_attention_layernorm.weight")
  return out


def check(st: SafetensorsDir, cfg: ModelConfig, plan: dict[str, Source]) -> None:
  """Before any read: every tensor the model needs is there with the config's shape, and no
  tensor is left over (but for copies known to be redundant)."""
  where = st.path.name
  used = set()
  for src in plan.values():
    layers = range(cfg.num_layers) if "{i}" in src.name else [None]
    for i in layers:
      name = src.name.format(i=i)
      if (shape := st.shape(name)) != src.shape:
        raise ValueError(f"{where}: {name} has shape {shape}, the config implies {src.shape}")
      used.add(name)
  unused = sorted(
    n for n in st.files
    if n not in used and not n.endswith(REDUNDANT_SUFFIXES)
    and not (n == "lm_head.weight" and cfg.tie_embeddings)  # a tied copy, saved anyway
  )  # fmt: skip
  if unused:
    more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
    raise ValueError(f"{where}: tensors this model does not use: {', '.join(unused[:5])}{more}")


def load_state(path: pathlib.Path, cfg: ModelConfig, abstract, shardings):
  """Fills `abstract` (the module's nnx.State of shapes) from the directory: each parameter is
  assembled on its devices from the slices they hold, reading one layer's tensor at a time."""
  from flax import nnx

  st, plan = SafetensorsDir(path), sources(cfg)
  check(st, cfg, plan)
  flat_shardings = dict(nnx.to_flat_state(shardings))
  start = time.perf_counter()
  reads = sum(cfg.num_layers if "{i}" in s.name else 1 for s in plan.values())
  with tqdm(total=reads, desc=f"loading {path.name}", unit="tensor", leave=False) as bar:
    for (key,), var in nnx.to_flat_state(abstract):
      src, value = plan[key], var.get_value()
      stacked = "{i}" in src.name
      shards: dict[tuple, np.ndarray] = {}  # devices holding the same slice share one read

      def shard(index, src=src, stacked=stacked, dtype=value.dtype, shards=shards):
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in shards:
          if stacked:
            layers = range(*index[0].indices(cfg.num_layers))
            shards[key] = np.stack([src.read(st, i)[index[1:]] for i in layers]).astype(dtype)
          else:
            shards[key] = src.read(st)[index].astype(dtype)
        return shards[key]

      sharding = flat_shardings[(key,)]
      var.set_value(jax.make_array_from_callback(value.shape, sharding, shard))
      bar.update(cfg.num_layers if stacked else 1)
  log.info("loaded %d tensors from %s in %.1fs", reads, path.name, time.perf_counter() - start)
  return abstract
