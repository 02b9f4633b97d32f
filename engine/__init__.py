"""The host side of serving: requests, scheduling, KV pages, the runner and sampling.

Never imports grpc. Entry points: `LLM` (offline batches), `Engine` (one step at a time) and
`AsyncEngine` (the streaming front end, over an `EngineCore` thread). A server uses only
`meshserve.engine.api`, the seam between the two.

The names below load on first use, so that importing `meshserve.engine.api` (a router, which
holds no model) loads no JAX.
"""

import importlib

_EXPORTS = {
  "LLM": "llm",
  "AsyncEngine": "async_engine",
  "Engine": "engine",
  "EngineConfig": "config",
  "EngineCore": "core",
  "Constraint": "params",
  "ConstraintError": "params",
  "EngineDeadError": "api",
  "QueueFullError": "api",
  "RequestDelta": "api",
  "RequestIdInUseError": "api",
  "RequestOutput": "output",
  "RequestTiming": "api",
  "SamplingParams": "params",
  "TokenLogprob": "api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
  return sorted(__all__)
