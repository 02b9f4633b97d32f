"""The no-cache forward against HF transformers float32 logits on the same weights."""

import numpy as np
import pytest


@pytest.mark.parametrize("i", range(5))
def test_logits_match_reference(model, golden, i):
  case = golden.case(i)
  logits = model.logits(case["ids"])
  assert logits.shape == (len(case["ids"]), model.config.vocab_size)
  # Same argmax at every position, and the reference's top-20 logits everywhere.
  np.testing.assert_array_equal(logits.argmax(-1), case["top_ids"][:, 0])
  ours_top = np.take_along_axis(logits, case["top_ids"], axis=1)
  np.testing.assert_allclose(ours_top, case["top_logits"], atol=1e-3)
  assert np.abs(logits[-1] - case["last_logits"]).max() <= 1e-3


def test_golden_case_count(golden):
  # Guards against a truncated copy of the reference data silently shrinking the tests.
  assert golden.n == 5 and golden.ntok == 6


def test_logits_rejects_bad_ids(model):
  with pytest.raises(ValueError, match="token_ids"):
    model.logits([])
  with pytest.raises(ValueError, match="token_ids"):
    model.logits([model.config.vocab_size])


def test_parameters_carry_logical_axes(model):
  from flax import nnx

  axes = {path: v.get_metadata()["logical_axes"] for path, v in nnx.to_flat_state(model.state)}
  assert axes[("wq",)] == ("layers", "embed", "heads", "head_dim")
  assert axes[("embed",)] == ("vocab", "embed")
  for path, v in nnx.to_flat_state(model.state):
    assert len(axes[path]) == v.get_value().ndim, path
