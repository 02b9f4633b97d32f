"""Hugging Face checkpoint directories: every supported architecture against an independent
NumPy forward pass (tests/hf_reference.py), sharded loading, BOS and EOS from the tokenizer and
generation configs, and bad checkpoints refused by name."""

import json
import subprocess
import sys

import numpy as np
import pytest
from hf_reference import numpy_forward, write_hf_dir
from safetensors.numpy import load_file, save_file

from meshserve.engine import LLM, EngineConfig, SamplingParams
from meshserve.models import load_model

IDS = [1, 42, 43, 9, 79, 57, 51, 11, 60, 44, 45, 46, 47, 48, 49, 50, 52, 53]  # 18 > window 5


@pytest.mark.parametrize(
  "arch, sharded, tie",
  [
    ("llama", False, False),
    ("llama", True, True),
    ("mistral", False, False),
    ("qwen2", True, False),
    ("gemma3", True, True),
  ],
)
def test_logits_equal_an_independent_numpy_forward(tmp_path, arch, sharded, tie):
  write_hf_dir(tmp_path / arch, arch, sharded=sharded, tie=tie)
  model = load_model(str(tmp_path / arch))
  assert model.config.arch == arch
  np.testing.assert_allclose(model.logits(IDS), numpy_forward(tmp_path / arch, IDS), atol=1e-4)


def test_sliding_window_layers_see_only_their_window(tmp_path):
  """Gemma 3 with three sliding layers (window 5) and one global: the window must matter, and
  each layer must get its own window and RoPE base."""
  write_hf_dir(tmp_path / "g", "gemma3")
  reference = numpy_forward(tmp_path / "g", IDS)
  config = json.loads((tmp_path / "g/config.json").read_text())
  config["layer_types"] = ["full_attention"] * 4
  (tmp_path / "g/config.json").write_text(json.dumps(config))
  unwindowed = numpy_forward(tmp_path / "g", IDS)
  assert np.abs(reference[-1] - unwindowed[-1]).max() > 1e-2  # the window changes the output
  np.testing.assert_allclose(load_model(str(tmp_path / "g")).logits(IDS), unwindowed, atol=1e-4)


def test_sharded_load_streams_into_the_layout(tmp_path):
  write_hf_dir(tmp_path / "q", "qwen2", sharded=True)
  single = load_model(str(tmp_path / "q")).logits(IDS)
  split = load_model(str(tmp_path / "q"), layout="tp=2")
  wq = split.state["wq"].get_value()
  assert wq.sharding.shard_shape(wq.shape) == (3, 32, 2, 8)  # 4 heads split over 2 devices
  np.testing.assert_allclose(split.logits(IDS), single, atol=1e-5)


def test_bos_eos_and_chat_template_come_from_the_tokenizer_files(tmp_path):
  write_hf_dir(tmp_path / "l", "llama")
  model = load_model(str(tmp_path / "l"))
  assert model.config.eos_token_ids == (2, 3)  # config.json's 2 and generation_config's [2, 3]
  tok = model.tokenizer
  assert tok.encode("hello world", add_special_tokens=True) == [1, 42, 43]
  chat = tok.apply_chat_template([{"role": "user", "content": "hello"}])
  assert chat == "<s><|user|> hello<|eot|><|assistant|>"


def _always_predicts(path, token: int) -> None:
  """Rewires a written checkpoint so that every position predicts `token`: the blocks add
  nothing, every embedding shares one direction, and only `token`'s head row points along it."""
  tensors = load_file(path / "model.safetensors")
  rng = np.random.default_rng(1)
  u = np.ones(tensors["model.embed_tokens.weight"].shape[1], np.float32)
  tensors["model.embed_tokens.weight"] = (
    0.01 * rng.standard_normal(tensors["model.embed_tokens.weight"].shape) + u
  ).astype(np.float32)
  for name in tensors:
    if name.endswith(("o_proj.weight", "down_proj.weight")):
      tensors[name] = np.zeros_like(tensors[name])
  tensors["lm_head.weight"][token] = 10 * u
  save_file(tensors, path / "model.safetensors")


def test_a_chat_ends_at_the_end_of_turn_token_of_the_generation_config(tmp_path):
  """Llama 3's shape: config.json's EOS is one id, generation_config.json adds <|eot_id|>."""
  write_hf_dir(tmp_path / "l", "llama")
  _always_predicts(tmp_path / "l", 3)  # <|eot|>
  messages = [{"role": "user", "content": "hello"}]
  params = SamplingParams(max_tokens=8)
  llm = LLM(load_model(str(tmp_path / "l")), EngineConfig(num_pages=16, max_model_len=64))
  out = llm.chat(messages, params)[0]
  assert (out.token_ids, out.finish_reason) == ([3], "stop")
  (tmp_path / "l/generation_config.json").unlink()  # EOS is 2 alone: the reply runs on
  llm = LLM(load_model(str(tmp_path / "l")), EngineConfig(num_pages=16, max_model_len=64))
  out = llm.chat(messages, params)[0]
  assert (out.token_ids, out.finish_reason) == ([3] * 8, "length")


def _edit_config(path, **changes):
  config = json.loads((path / "config.json").read_text()) | changes
  (path / "config.json").write_text(json.dumps(config))


def _edit_tensors(path, fn):
  tensors = load_file(path / "model.safetensors")
  fn(tensors)
  save_file(tensors, path / "model.safetensors")


@pytest.mark.parametrize(
  "break_it, message",
  [
    (
      lambda p: _edit_config(p, architectures=["GPT2LMHeadModel"]),
      r"architectures \['GPT2LMHeadModel'\] is not supported; supported: \[",
    ),
    (
      lambda p: _edit_config(p, rope_scaling={"rope_type": "yarn", "factor": 4.0}),
      "rope_scaling = .*yarn.* is not supported",
    ),
    (lambda p: _edit_config(p, hidden_act="gelu"), "hidden_act = 'gelu' is not supported"),
    (
      lambda p: _edit_tensors(p, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
      "lacks the tensor 'model.layers.1.mlp.up_proj.weight'",
    ),
    (
      lambda p: _edit_tensors(
        p, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((8, 32))})
      ),
      r"model.layers.0.self_attn.k_proj.weight has shape \(8, 32\), the config implies \(16, 32\)",
    ),
    (
      lambda p: _edit_tensors(p, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3)})),
      "tensors this model does not use: model.layers.0.extra.weight",
    ),
  ],
  ids=["architecture", "rope-scaling", "activation", "missing", "shape", "unused"],
)
def test_bad_checkpoints_are_refused_by_name(tmp_path, break_it, message):
  write_hf_dir(tmp_path / "l", "llama")
  break_it(tmp_path / "l")
  with pytest.raises(ValueError, match=message):
    load_model(str(tmp_path / "l"))


def test_redundant_tensors_are_accepted(tmp_path):
  """A tied model saved with its lm_head copy, and RoPE buffers that old exports include."""
  write_hf_dir(tmp_path / "l", "llama", tie=True)
  expected = numpy_forward(tmp_path / "l", IDS)

  def add(t):
    t["lm_head.weight"] = t["model.embed_tokens.weight"]
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)

  _edit_tensors(tmp_path / "l", add)
  np.testing.assert_allclose(load_model(str(tmp_path / "l")).logits(IDS), expected, atol=1e-4)


def test_convert_takes_an_hf_directory(tmp_path):
  write_hf_dir(tmp_path / "g", "gemma3")
  command = [
    sys.executable,
    "-m",
    "meshserve.server.cli",
    "convert",
    str(tmp_path / "g"),
    str(tmp_path / "c"),
  ]
  subprocess.run(command, check=True, capture_output=True, timeout=300)
  converted = load_model(str(tmp_path / "c"))
  assert converted.config == load_model(str(tmp_path / "g")).config
  np.testing.assert_allclose(converted.logits(IDS), numpy_forward(tmp_path / "g", IDS), atol=1e-4)
  assert converted.tokenizer.encode("hello", add_special_tokens=True) == [1, 42]
