"""The model's attention backend switch, end to end: pallas kernels (interpret mode on CPU) and
the all-XLA path (the CPU default decodes through the compiled kernel: every other test)."""

import numpy as np
import pytest

from meshserve.engine import LLM, EngineConfig, SamplingParams
from meshserve.models import AttentionBackend, cpu_kernels, load_model


@pytest.fixture(scope="module")
def pallas_model():
  return load_model("smollm2-135m-instruct", attention=AttentionBackend("pallas", interpret=True))


def test_pallas_logits_match_reference(pallas_model, golden):
  case = golden.case(3)
  logits = pallas_model.logits(case["ids"])
  np.testing.assert_array_equal(logits.argmax(-1), case["top_ids"][:, 0])
  assert np.abs(logits[-1] - case["last_logits"]).max() <= 1e-3


@pytest.mark.slow  # default: the kernels against their references, pallas logits
def test_pallas_generation_reproduces_golden_greedy(pallas_model, golden):
  """Prefill through flash_attention (a row per prompt, as on TPU), decode through
  ragged_paged_attention over the pool."""
  config = EngineConfig(num_pages=64, max_model_len=256, max_batch=2, prefill_segment=0)
  llm = LLM(pallas_model, config)
  chat, prompt = golden.case(3), golden.case(0)
  outs = llm.generate([chat["ids"].tolist(), prompt["ids"].tolist()], SamplingParams(max_tokens=8))
  assert outs[0].token_ids == chat["greedy"].tolist()  # ends in EOS within 8 tokens
  assert outs[1].token_ids == prompt["greedy"][:8].tolist()


@pytest.mark.slow  # default: the paged prefill kernel against its reference
def test_pallas_chunked_prefill_and_prefix_hits_reproduce_golden_greedy(
  pallas_model, golden, monkeypatch
):
  """Prompts prefilled in chunks of 16 tokens (each after the first continues a cached prefix),
  then again from the prefix cache: the paged prefill kernel reads the pool in place."""
  from meshserve.models import attention

  traced = []
  kernel = attention.paged_prefill_attention
  monkeypatch.setattr(
    attention, "paged_prefill_attention", lambda *a, **kw: traced.append(1) or kernel(*a, **kw)
  )
  config = EngineConfig(
    num_pages=64, max_model_len=256, max_batch=2, prefill_segment=0, max_num_batched_tokens=16
  )
  llm = LLM(pallas_model, config)
  chat, prompt = golden.case(3), golden.case(0)
  for _ in range(2):  # the second pass hits the prefix cache
    outs = llm.generate(
      [chat["ids"].tolist(), prompt["ids"].tolist()], SamplingParams(max_tokens=8)
    )
    assert outs[0].token_ids == chat["greedy"].tolist()
    assert outs[1].token_ids == prompt["greedy"][:8].tolist()
  assert outs[0].num_cached_tokens > 0 and traced


def test_xla_generation_reproduces_golden_greedy(golden):
  """Decode through the XLA page walk instead of the compiled kernel."""
  model = load_model("smollm2-135m-instruct", attention="xla")
  assert model.attention.kind == "xla"
  llm = LLM(model, EngineConfig(num_pages=64, max_model_len=256, max_batch=2))
  chat, prompt = golden.case(3), golden.case(0)
  outs = llm.generate([chat["ids"].tolist(), prompt["ids"].tolist()], SamplingParams(max_tokens=8))
  assert outs[0].token_ids == chat["greedy"].tolist()
  assert outs[1].token_ids == prompt["greedy"][:8].tolist()


def test_backend_choice():
  assert AttentionBackend.default_for("tpu").kind == "pallas"
  native = "native" if cpu_kernels.available() else "xla"
  assert AttentionBackend.default_for("cpu").kind == native
  assert AttentionBackend.default_for("cpu", sharded=True).kind == "xla"
  assert AttentionBackend.default_for("gpu").kind == "xla"
  with pytest.raises(ValueError, match="attention"):
    AttentionBackend("triton")
  with pytest.raises(ValueError, match="native"):
    load_model("smollm2-135m-instruct", attention="native", layout="tp=2")


@pytest.mark.slow  # default: test_layouts compiles the split kernels for a v5e slice
def test_pallas_kernels_split_themselves_over_a_mesh(golden):
  """XLA cannot partition a Mosaic kernel: under tp=3 (SmolLM2's 3 kv heads, one a device)
  the kernels run per shard in a shard_map, and the model still gives the golden tokens."""
  model = load_model(
    "smollm2-135m-instruct", layout="tp=3", attention=AttentionBackend("pallas", interpret=True)
  )
  case = golden.case(0)
  np.testing.assert_array_equal(model.logits(case["ids"]).argmax(-1), case["top_ids"][:, 0])
  config = EngineConfig(num_pages=32, max_model_len=128, max_batch=2, prefill_segment=0)
  llm = LLM(model, config)  # a row per prompt: prefill takes the flash kernel, as on TPU
  out = llm.generate([case["ids"].tolist()], SamplingParams(max_tokens=4))[0]
  assert out.token_ids == case["greedy"][:4].tolist()
