"""The host side of serving: requests, scheduling, KV pages, the runner and sampling.

Never imports grpc. Entry points: `LLM` (offline batches), `Engine` (one step at a time) and
`AsyncEngine` (the streaming API the server uses).
"""

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.engine import Engine
from engine.llm import LLM
from engine.output import RequestOutput, RequestTiming, TokenLogprob
from engine.sampling import SamplingParams

__all__ = [
  "LLM",
  "AsyncEngine",
  "Engine",
  "EngineConfig",
  "RequestOutput",
  "RequestTiming",
  "SamplingParams",
  "TokenLogprob",
]
