"""Builds the engine a `LaunchSpec` describes: loads the model (one per stage, each on devices
of its own) and starts the engine cores, which warm up in the background."""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Callable

import jax

from meshserve.engine import lockstep
from meshserve.engine.api import EngineClient, EngineDeadError, LaunchSpec, Role
from meshserve.engine.async_engine import AsyncEngine
from meshserve.engine.disaggregated import DisaggregatedEngine, StageWorkerEngine
from meshserve.engine.engine import Engine
from meshserve.models import load_model
from meshserve.sharding import Layout, split_devices

log = logging.getLogger(__name__)


def launch(spec: LaunchSpec, *, on_dead: Callable[[Exception], None] | None = None) -> EngineClient:
  kw = dict(max_queue=spec.max_queue, warmup=spec.warmup, on_dead=on_dead)
  if spec.role == Role.DISAGGREGATED:
    layouts = [Layout.parse(spec.prefill_layout), Layout.parse(spec.decode_layout)]
    prefill, decode = (
      load_model(spec.model, layout=layout, devices=devices, dtype=spec.dtype)
      for layout, devices in zip(layouts, split_devices(*layouts), strict=True)
    )
    return DisaggregatedEngine(
      Engine(prefill, spec.engine, role=Role.PREFILL),
      Engine(decode, spec.engine, role=Role.DECODE),
      **kw,
    )
  engine = Engine(load_model(spec.model, layout=spec.layout, dtype=spec.dtype), spec.engine,
                  role=spec.role)  # fmt: skip
  if jax.process_count() > 1:  # process 0 of several: the others follow its core's turns
    if spec.role != Role.COLOCATED:
      raise ValueError(f"role: {spec.role} serves from one host; multi-host serves colocated")
    publisher = lockstep.Publisher(jax.process_count())
    front = AsyncEngine(engine, publish=publisher, **kw)
    publisher.watch(lambda why: front.core.fail(EngineDeadError(why)))
    return front
  if spec.role == Role.COLOCATED:
    return AsyncEngine(engine, **kw)
  return StageWorkerEngine(engine, transfer_host=spec.transfer_host, **kw)


def follow(spec: LaunchSpec) -> None:
  """A multi-host follower (every process but 0): the same model and engine as process 0's,
  every step shape compiled, then process 0's turns applied in lockstep until it stops."""
  if spec.role != Role.COLOCATED:
    raise ValueError(f"role: {spec.role} serves from one host; multi-host serves colocated")
  engine = Engine(load_model(spec.model, layout=spec.layout, dtype=spec.dtype), spec.engine,
                  role=spec.role)  # fmt: skip
  if spec.warmup:
    engine.runner.warmup()
  _ = engine.grammars  # constraints compile as process 0's do
  log.info("process %d: following process 0", jax.process_index())
  lockstep.follow(engine, jax.process_index())
  log.info("process %d: process 0 stopped; done", jax.process_index())


def enable_compilation_cache(path: str | os.PathLike | None = None) -> pathlib.Path:
  """Turns on JAX's persistent compilation cache, so a restarted server loads its compiled
  steps from disk instead of compiling them again. Default: $MESHSERVE_CACHE/jax, else
  ~/.cache/meshserve/jax."""
  if path is None:
    root = os.environ.get("MESHSERVE_CACHE", pathlib.Path.home() / ".cache/meshserve")
    path = pathlib.Path(root) / "jax"
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
