"""The host side of serving: requests, scheduling, KV pages, the runner and sampling.

Never imports grpc. Entry points: `LLM` (offline batches), `Engine` (one step at a time) and
`AsyncEngine` (the streaming API the server uses, over an `EngineCore` thread).
"""

from meshserve.engine.async_engine import AsyncEngine, QueueFullError, RequestIdInUseError
from meshserve.engine.config import EngineConfig
from meshserve.engine.core import EngineCore, EngineDeadError
from meshserve.engine.engine import Engine
from meshserve.engine.llm import LLM
from meshserve.engine.output import RequestDelta, RequestOutput, RequestTiming, TokenLogprob
from meshserve.engine.sampling import SamplingParams

__all__ = [
  "LLM",
  "AsyncEngine",
  "Engine",
  "EngineConfig",
  "EngineCore",
  "EngineDeadError",
  "QueueFullError",
  "RequestDelta",
  "RequestIdInUseError",
  "RequestOutput",
  "RequestTiming",
  "SamplingParams",
  "TokenLogprob",
]
