"""The host side of serving: requests, batching, the runner and sampling. Never imports grpc."""

from engine.llm import LLM
from engine.output import RequestOutput
from engine.runner import EngineConfig
from engine.sampling import SamplingParams

__all__ = ["LLM", "EngineConfig", "RequestOutput", "SamplingParams"]
