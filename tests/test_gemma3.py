"""Gemma 3 270M (sliding-window and global layers) against HF transformers float32 on the same
GGUF file, through the no-cache forward, the engine, and the Pallas kernels' window path."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_greedy_equal, variant

from meshserve.engine import LLM, EngineConfig, SamplingParams
from meshserve.models import AttentionBackend, attention


def test_golden_case_count(gemma_golden):
  # Guards against a truncated copy of the reference data silently shrinking the tests.
  assert gemma_golden.n == 3 and gemma_golden.ntok == 4


def test_config_from_the_gguf(gemma):
  cfg = gemma.config
  assert (cfg.arch, cfg.num_layers, cfg.embed_dim, cfg.head_dim) == ("gemma3", 18, 640, 256)
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (4, 1, 262144)
  # Every sixth layer is global; the others see the newest 512 tokens, with RoPE base 10^4.
  assert cfg.layer_windows == tuple(0 if i % 6 == 5 else 512 for i in range(18))
  assert (cfg.rope_theta, cfg.rope_local_theta) == (1e6, 1e4)
  assert cfg.eos_token_ids == (1, 106)  # <eos> and <end_of_turn>
  assert gemma.tokenizer.add_bos and gemma.tokenizer.bos_token_id == 2


@pytest.mark.parametrize("i", range(3))
def test_logits_match_reference(gemma, gemma_golden, i):
  case = gemma_golden.case(i)
  logits = gemma.logits(case["ids"])
  np.testing.assert_array_equal(logits.argmax(-1), case["top_ids"][:, 0])
  ours_top = np.take_along_axis(logits, case["top_ids"], axis=1)
  np.testing.assert_allclose(ours_top, case["top_logits"], atol=1e-3)
  assert np.abs(logits[-1] - case["last_logits"]).max() <= 1e-3


def test_tokenizer_ids_equal_reference(gemma, gemma_golden):
  tok = gemma.tokenizer
  for j in range(gemma_golden.ntok):
    text, ids = str(gemma_golden[f"tok{j}_text"]), gemma_golden[f"tok{j}_ids"].tolist()
    assert tok.encode(text) == ids, text
    assert tok.decode(ids) == text


def test_text_prompts_get_bos_and_greedy_equals_reference(gemma, gemma_golden):
  llm = LLM(gemma, EngineConfig(num_pages=64, max_model_len=256, max_batch=4))
  cases = [gemma_golden.case(i) for i in range(gemma_golden.n)]
  outs = llm.generate([c["source"] for c in cases], SamplingParams(max_tokens=32))
  for case, out in zip(cases, outs, strict=True):
    assert out.prompt_token_ids == case["ids"].tolist()  # starts with <bos>, as HF encodes it
    assert_greedy_equal(gemma, case["ids"], case["greedy"].tolist(), out.token_ids)
    if out.token_ids == case["greedy"].tolist():
      assert out.text == case["greedy_text"]


@pytest.fixture
def kernel_windows(monkeypatch):
  """The sliding_window argument of every Pallas kernel call traced, by kernel."""
  seen = {"flash_attention": set(), "ragged_paged_attention": set()}
  for name in seen:
    kernel = getattr(attention, name)

    def spy(*args, kernel=kernel, name=name, **kwargs):
      seen[name].add(kwargs.get("sliding_window"))
      return kernel(*args, **kwargs)

    monkeypatch.setattr(attention, name, spy)
  return seen


def test_pallas_sliding_window_path_reproduces_golden_greedy(gemma, gemma_golden, kernel_windows):
  """Prefill and decode through the kernels in interpret mode: sliding layers call them with
  their window, global layers without, and the tokens are the reference's."""
  model = variant(gemma, attention=AttentionBackend("pallas", interpret=True))
  llm = LLM(model, EngineConfig(num_pages=32, max_model_len=128, max_batch=1))
  case = gemma_golden.case(0)
  out = llm.generate(case["ids"].tolist(), SamplingParams(max_tokens=12))[0]
  assert_greedy_equal(gemma, case["ids"], case["greedy"][:12].tolist(), out.token_ids)
  assert kernel_windows == {"flash_attention": {None, 512}, "ragged_paged_attention": {None, 512}}


def _no_cache_greedy(model, prompt: list[int], n: int) -> list[int]:
  ids = list(prompt)
  for _ in range(n):
    ids.append(int(model.logits(ids)[-1].argmax()))
  return ids[len(prompt) :]


@pytest.mark.parametrize(
  "attention", ["native", "xla", pytest.param("pallas", marks=pytest.mark.slow)]
)  # pallas: slow (default: its window path on the golden tokens, above)
def test_a_window_shorter_than_the_context_is_honoured_by_every_path(gemma, attention):
  """A window of 8 over 40 tokens in pages of 16: chunked prefill, the prefix cache and decode
  must each leave out exactly the keys before the window, as the no-cache forward does."""
  backend = AttentionBackend("pallas", interpret=True) if attention == "pallas" else attention
  small = variant(gemma, sliding_window=8)
  prompt = gemma.tokenizer.encode("The capital of France is Paris, and the capital of", True)
  prompt = (prompt * 3)[:30]
  assert np.abs(small.logits(prompt)[-1] - gemma.logits(prompt)[-1]).max() > 1e-2
  expected = _no_cache_greedy(small, prompt, 10)
  config = EngineConfig(num_pages=32, max_model_len=128, max_batch=2, max_num_batched_tokens=24)
  llm = LLM(variant(small, attention=backend), config)
  first = llm.generate(prompt, SamplingParams(max_tokens=10))[0]  # prefill in two chunks
  again = llm.generate(prompt, SamplingParams(max_tokens=10))[0]  # the first page from cache
  assert again.num_cached_tokens == 16
  for out in (first, again):
    assert_greedy_equal(small, prompt, expected, out.token_ids)


@pytest.mark.slow  # default: Gemma 3 greedy in-process; the CLI in test_cli
def test_cli_generate_continues_the_prompt(gemma_golden):
  """The command of the issue, as a user runs it: the reference's greedy words come out."""
  command = [sys.executable, "-m", "meshserve.server.cli", "generate", "--model", "gemma3-270m"]
  command += ["--prompt", "The capital of France is", "--max-tokens", "8"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
  assert done.returncode == 0, done.stderr[-2000:]
  expected = " the capital of the country of France."  # the reference's first 8 greedy tokens
  assert gemma_golden.case(0)["greedy_text"].startswith(expected)
  assert done.stdout.strip() == expected.strip()
