"""The GGUF reader: metadata, dequantization by hand, and the RoPE row permutation."""

import functools
import json
import os

import numpy as np
import pytest

from meshserve.models.gguf_loader import GGUFFile, unpermute_rope_rows
from meshserve.models.loader import MODELS


@pytest.fixture(scope="module")
def gguf_file():
  return GGUFFile(MODELS["smollm2-135m-instruct"].path())


def test_config_from_metadata(gguf_file):
  cfg = gguf_file.config("smollm2-135m-instruct")
  assert (cfg.num_layers, cfg.embed_dim, cfg.mlp_dim) == (30, 576, 1536)
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (9, 3, 64)
  assert cfg.vocab_size == 49152 and cfg.tie_embeddings
  assert cfg.rope_theta == 100000.0 and cfg.eos_token_ids == (2,)
  assert abs(cfg.norm_eps - 1e-5) < 1e-9


def _f16(raw: np.ndarray) -> np.ndarray:
  return raw.view(np.float16).astype(np.float32).reshape(-1)  # [blocks]


def test_q4_1_dequantized_by_hand(gguf_file):
  # Q4_1 block: f16 scale d, f16 min m, 16 bytes of nibbles; x = d*q + m, low nibbles first.
  t = gguf_file.tensors["blk.0.attn_q.weight"]
  assert t.tensor_type.name == "Q4_1"
  raw = np.asarray(t.data[3]).reshape(-1, 20)  # row 3, 18 blocks of 32 values
  d, m, qs = _f16(raw[:, 0:2].copy()), _f16(raw[:, 2:4].copy()), raw[:, 4:]
  q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
  expected = (d[:, None] * q + m[:, None]).reshape(-1)
  np.testing.assert_allclose(gguf_file.tensor("blk.0.attn_q.weight")[3], expected, rtol=1e-6)


def test_q8_0_dequantized_by_hand(gguf_file):
  # Q8_0 block: f16 scale d, 32 int8; x = d*q.
  t = gguf_file.tensors["token_embd.weight"]
  assert t.tensor_type.name == "Q8_0"
  raw = np.asarray(t.data[1234]).reshape(-1, 34)
  d, q = _f16(raw[:, 0:2].copy()), raw[:, 2:].view(np.int8).astype(np.float32)
  expected = (d[:, None] * q).reshape(-1)
  np.testing.assert_allclose(gguf_file.tensor("token_embd.weight")[1234], expected, rtol=1e-6)


def test_f32_tensor_passes_through(gguf_file):
  t = gguf_file.tensors["output_norm.weight"]
  assert t.tensor_type.name == "F32"
  np.testing.assert_array_equal(gguf_file.tensor("output_norm.weight"), np.asarray(t.data))


def test_unpermute_inverts_llama_cpp_permute():
  heads, head_dim, cols = 3, 8, 5
  w = np.arange(heads * head_dim * cols, dtype=np.float32).reshape(heads * head_dim, cols)
  # llama.cpp convert_hf_to_gguf.py: reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2)
  permuted = w.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
  np.testing.assert_array_equal(unpermute_rope_rows(permuted, heads), w)
  # Row order of head 0 after permuting: pairs (0, 4), (1, 5), ... interleaved.
  assert permuted[:4, 0].tolist() == [0, 20, 5, 25]


def test_missing_and_bad_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    GGUFFile(tmp_path / "absent.gguf")
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"not a gguf file at all")
  with pytest.raises(ValueError, match="not a readable GGUF"):
    GGUFFile(bad)


def _tiny_gguf(path, *, meta=(), extra_tensors=()):
  """A one-layer llama GGUF with float32 tensors and the metadata the config reads."""
  import gguf

  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(1)
  w.add_embedding_length(8)
  w.add_feed_forward_length(16)
  w.add_head_count(2)
  w.add_head_count_kv(1)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_context_length(64)
  w.add_vocab_size(32)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  for key, value in meta:
    (w.add_string if isinstance(value, str) else w.add_uint32)(key, value)
  rng = np.random.default_rng(0)
  shapes = {
    "token_embd.weight": (32, 8), "output_norm.weight": (8,), "blk.0.attn_norm.weight": (8,),
    "blk.0.attn_q.weight": (8, 8), "blk.0.attn_k.weight": (4, 8), "blk.0.attn_v.weight": (4, 8),
    "blk.0.attn_output.weight": (8, 8), "blk.0.ffn_norm.weight": (8,),
    "blk.0.ffn_gate.weight": (16, 8), "blk.0.ffn_up.weight": (16, 8),
    "blk.0.ffn_down.weight": (8, 16), **dict(extra_tensors),
  }  # fmt: skip
  for name, shape in shapes.items():
    w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return GGUFFile(path)


def test_every_end_of_turn_id_is_an_eos(tmp_path):
  f = _tiny_gguf(tmp_path / "m.gguf", meta=[("tokenizer.ggml.eot_token_id", 7)])
  assert f.config("tiny").eos_token_ids == (2, 7)  # Llama 3's <|eot_id|> ends a chat too


def test_unused_tensors_and_rope_scaling_are_refused_by_name(tmp_path):
  from meshserve.models.gguf_loader import load_weights

  f = _tiny_gguf(tmp_path / "ok.gguf")
  weights = load_weights(f, f.config("tiny"))
  assert weights["wq"].shape == (1, 8, 2, 4) and "lm_head" not in weights  # tied
  f = _tiny_gguf(tmp_path / "extra.gguf", extra_tensors=[("blk.0.attn_q.bias", (8,))])
  with pytest.raises(ValueError, match=r"does not use: blk\.0\.attn_q\.bias"):
    load_weights(f, f.config("tiny"))
  f = _tiny_gguf(tmp_path / "yarn.gguf", meta=[("llama.rope.scaling.type", "yarn")])
  with pytest.raises(ValueError, match="rope.scaling.type 'yarn'"):
    f.config("tiny")


def test_text_prompts_get_bos_where_the_tokenizer_asks(model, monkeypatch):
  from meshserve.engine import LLM, EngineConfig, SamplingParams

  llm = LLM(model, EngineConfig(num_pages=16, max_model_len=64, max_batch=1))
  plain = llm.generate("Hello", SamplingParams(max_tokens=1))[0].prompt_token_ids
  assert plain[0] != model.config.bos_token_id  # SmolLM2's metadata: add_bos_token = False
  monkeypatch.setattr(model.tokenizer, "add_bos", True)
  with_bos = llm.generate("Hello", SamplingParams(max_tokens=1))[0].prompt_token_ids
  assert with_bos == [model.config.bos_token_id, *plain]


def test_an_unsupported_quant_type_is_refused_by_tensor_name(tmp_path):
  import gguf

  w = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
  block = np.zeros((1, 18), np.uint8)  # one IQ4_NL block: 32 weights in 18 bytes
  w.add_tensor("blk.0.attn_q.weight", block, raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match="blk.0.attn_q.weight: unsupported GGUF tensor type IQ4_NL"):
    GGUFFile(tmp_path / "iq.gguf").tensor("blk.0.attn_q.weight")


def test_a_second_load_restores_the_converted_model_bit_for_bit(tmp_path, monkeypatch):
  """A load of a GGUF keeps its float32 parameters in the converted-model cache (here after
  finding a damaged entry, which it converts again); the next restores them: the same config,
  tokenizer and parameters, exactly, in float32 and in bfloat16 (cast as the GGUF path casts).
  A changed file is another entry."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from meshserve.models import checkpoint, converted, load_model, precision

  monkeypatch.setenv("MESHSERVE_CACHE", str(tmp_path))
  path = MODELS["smollm2-135m-instruct"].path()
  kept = converted.entry(path)
  assert kept.parent == tmp_path / "models" and not kept.exists()
  kept.mkdir(parents=True)
  meta = kept / checkpoint.META
  meta.write_text("{}")  # damaged (or another format): it cannot be restored
  # XLA attention: the native kernel's build would land in this cache too, costing seconds.
  load = functools.partial(load_model, "smollm2-135m-instruct", attention="xla")
  parsed = load()
  assert json.loads(meta.read_text())["format"] == checkpoint.FORMAT  # converted anew
  restored = load()
  assert restored.config == parsed.config
  text = "The capital of France is <|im_end|> ünïcödé"
  assert restored.tokenizer.encode(text) == parsed.tokenizer.encode(text)
  assert restored.tokenizer.chat_template == parsed.tokenizer.chat_template
  want = nnx.to_pure_dict(parsed.state)
  for name, got in nnx.to_pure_dict(restored.state).items():
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want[name]), err_msg=name)
  bf16 = load(dtype=jnp.bfloat16)  # from the cache too
  for name, got in nnx.to_pure_dict(bf16.state).items():
    value = np.asarray(want[name])
    expected = value if name.endswith("norm") else value.astype(jnp.bfloat16)
    got = np.asarray(jax.tree.map(precision.values, got))
    np.testing.assert_array_equal(got, expected, err_msg=name)
  other = tmp_path / "copy.gguf"
  other.write_bytes(b"not read")
  first = converted.entry(other)
  os.utime(other, ns=(1, 1))
  assert converted.entry(other) != first
  monkeypatch.setenv("MESHSERVE_MODEL_CACHE", "0")
  assert converted.entry(path) is None
