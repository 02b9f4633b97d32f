"""The bfloat16 path against the float32 reference: greedy tokens, logit error, and the
bfloat16-as-bits storage that keeps XLA:CPU from copying whole arrays (models.precision)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshserve.engine import LLM, EngineConfig, SamplingParams
from meshserve.models import load_model, precision

PREFIX = 16  # greedy tokens compared with float32's


@pytest.fixture(scope="module")
def bf16():
  return load_model("smollm2-135m-instruct", dtype=jnp.bfloat16)


def greedy_prefix_matches(model, golden) -> list[bool]:
  """Per golden case: whether bfloat16 greedy gives the reference's first PREFIX tokens, or all
  of them where the reference ends (EOS) sooner. The reference is HF float32, which the
  float32 model reproduces exactly."""
  llm = LLM(model, EngineConfig(num_pages=64, max_model_len=256, max_batch=8))
  prompts = [golden.case(i)["ids"].tolist() for i in range(golden.n)]
  out = llm.generate(prompts, SamplingParams(max_tokens=PREFIX))
  return [
    o.token_ids[:PREFIX] == golden.case(i)["greedy"].tolist()[:PREFIX] for i, o in enumerate(out)
  ]


def logit_error(model, golden) -> float:
  """The largest |bfloat16 - reference| over the reference's top-20 logits at every position."""
  worst = 0.0
  for i in range(golden.n):
    case = golden.case(i)
    ours = np.take_along_axis(model.logits(case["ids"]), case["top_ids"], axis=1)
    worst = max(worst, float(np.abs(ours - case["top_logits"]).max()))
  return worst


def test_the_default_dtype_is_bfloat16_on_accelerators_and_float32_on_cpu(model):
  assert precision.default_dtype("tpu") == precision.default_dtype("gpu") == jnp.bfloat16
  assert precision.default_dtype("cpu") == jnp.float32
  assert model.config.dtype == jnp.float32  # load_model's default, here on CPU
  from meshserve.engine.api import LaunchSpec
  from meshserve.server.cli import build_parser

  assert LaunchSpec("m").dtype == "auto"
  required = {
    "generate": ["--prompt", "hi"],
    "convert": ["a", "b"],
    "layouts": ["--layouts", "tp=1"],
  }
  for command in ("serve", "generate", "convert", "layouts"):
    args = build_parser().parse_args([command, *required.get(command, [])])
    assert args.dtype == "auto", command


def test_weights_and_pool_are_stored_as_bits_on_cpu(bf16):
  state = jax.tree.leaves(bf16.state)
  assert {x.dtype for x in state} == {precision.BITS, jnp.dtype(jnp.float32)}  # norms: float32
  llm = LLM(bf16, EngineConfig(num_pages=16, max_model_len=64, max_batch=2))
  assert llm.runner.cache.k.dtype == precision.BITS and llm.runner.cache.dtype == jnp.bfloat16


def test_smollm2_greedy_and_logit_error(bf16, golden, model):
  matches = greedy_prefix_matches(bf16, golden)
  error = logit_error(bf16, golden)
  print(f"SmolLM2 bfloat16: {sum(matches)}/{len(matches)} greedy prefixes equal, top-20 logit "
        f"error {error:.3f}")  # fmt: skip
  assert sum(matches) >= len(matches) - 1, matches  # the issue asks 7 of 8 over both models
  # README, Precision: logits of magnitude ~20 move by at most this much in bfloat16.
  assert error < 0.4, error
  # And the float32 model is untouched by the mixed-precision code path: its error is tiny.
  assert logit_error(model, golden) < 1e-3


@pytest.mark.slow
def test_greedy_prefixes_equal_on_seven_of_eight_golden_prompts(bf16, golden, gemma_golden):
  """The issue's bar: on the 8 golden prompts (5 SmolLM2, 3 Gemma 3), bfloat16 greedy equals
  float32's first 16 tokens on at least 7."""
  gemma = load_model("gemma3-270m", dtype=jnp.bfloat16)
  matches = greedy_prefix_matches(bf16, golden) + greedy_prefix_matches(gemma, gemma_golden)
  error = logit_error(gemma, gemma_golden)
  print(f"bfloat16: {sum(matches)}/8 greedy prefixes equal; Gemma 3 top-20 logit error {error:.3f}")
  assert len(matches) == 8 and sum(matches) >= 7, matches
  assert error < 0.25, error


def test_checkpoint_of_a_bits_model_holds_bfloat16(bf16, tmp_path):
  from meshserve.models.checkpoint import save_checkpoint

  path = save_checkpoint(bf16, tmp_path / "ckpt")
  again = load_model(str(path), dtype=jnp.bfloat16)
  ids = [1, 504, 3458, 282, 4649, 314]
  np.testing.assert_array_equal(again.logits(ids), bf16.logits(ids))
