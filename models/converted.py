"""The converted-model cache: a GGUF file's parameters, dequantized once and kept as an Orbax
checkpoint under $MESHSERVE_CACHE/models, so that a later load restores them (each device
reading only its shard) instead of parsing and dequantizing the file again. Parsing a GGUF's
metadata alone reads its vocabulary one string at a time: 262k of them for Gemma 3.

An entry is keyed by the file (its resolved path, size and modification time) and by the code
that converts it (the sources of the GGUF loader, tokenizer, config and checkpoint modules), so
neither a changed file nor a changed conversion ever reads a stale entry. It holds float32, what
dequantization gives, and is cast on restore to the dtype asked for, as the GGUF path casts.
It is written into a directory of its own and renamed into place: processes started together
never read a partial entry. MESHSERVE_MODEL_CACHE=0 turns it off; a multi-process run never uses
it (every process must take the same path through a load).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import shutil
import time

import jax

from meshserve.models import checkpoint, config, cpu_kernels, gguf_loader, tokenizer

log = logging.getLogger(__name__)

# The code whose output an entry holds: a change to any of these makes new entries.
_CONVERSION = (gguf_loader, tokenizer, config, checkpoint)


def entry(path: pathlib.Path) -> pathlib.Path | None:
  """Where the converted parameters of the GGUF file `path` live (present or not), or None
  where the cache is off."""
  if os.environ.get("MESHSERVE_MODEL_CACHE", "1") == "0" or jax.process_count() > 1:
    return None
  path = path.resolve()
  stat = path.stat()
  key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
  for module in _CONVERSION:
    key.update(pathlib.Path(module.__file__).read_bytes())
  return cpu_kernels.cache_dir() / "models" / f"{path.stem}-{key.hexdigest()[:16]}"


def discard(dst: pathlib.Path) -> None:
  """Removes an entry that could not be restored, so that the next load writes it anew."""
  shutil.rmtree(dst, ignore_errors=True)


def store(dst: pathlib.Path, params: dict, cfg: config.ModelConfig, tok: tokenizer.Tokenizer):
  """Writes an entry (float32 `params` keyed as the model's state); a failure (a full disk, a
  read-only cache) is logged and costs only the next load's time."""
  start = time.perf_counter()
  partial = dst.with_name(f"{dst.name}.partial-{os.getpid()}")
  try:
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    checkpoint.write(partial, params, cfg, tok)
    partial.rename(dst)
  except Exception as e:  # noqa: BLE001 - the load itself has succeeded
    if not checkpoint.is_checkpoint(dst):  # else another process kept it first
      log.warning("could not keep the converted model in %s: %s", dst, e)
  else:
    log.info("kept the converted model in %s (%.1fs)", dst, time.perf_counter() - start)
  finally:
    shutil.rmtree(partial, ignore_errors=True)
