"""The host side of serving: requests, scheduling, KV pages, the runner and sampling.

Never imports grpc. Entry points: `LLM` (offline batches), `Engine` (one step at a time) and
`AsyncEngine` (the streaming API the server uses, over an `EngineCore` thread).
"""

from engine.async_engine import AsyncEngine, QueueFullError, RequestIdInUseError
from engine.config import EngineConfig
from engine.core import EngineCore, EngineDeadError
from engine.engine import Engine
from engine.llm import LLM
from engine.output import RequestDelta, RequestOutput, RequestTiming, TokenLogprob
from engine.sampling import SamplingParams

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
