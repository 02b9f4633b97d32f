"""A request's host-side state as it moves waiting -> running -> finished."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from meshserve.engine.api import FinishReason, RequestTiming
from meshserve.engine.params import SamplingParams

# One sampled token's logprobs as the sampler returned them: (its logprob, the top ids, their
# logprobs), numpy rows. The front end formats them (OutputProcessor), not the core's thread.
SampledLogprobs = tuple[Any, Any, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class TokenDelta:
  """What the core hands its front end for one request after a step: the new token ids and,
  when the request asked, their logprobs unformatted. The front end's OutputProcessor turns it
  into a RequestDelta (text, stop strings, TokenLogprobs), off the core's thread."""

  request_id: str
  new_token_ids: list[int]
  new_logprobs: list[SampledLogprobs] | None  # one per new token id, when the request asked
  finish_reason: FinishReason | None
  num_prompt_tokens: int
  num_output_tokens: int  # so far
  num_cached_tokens: int  # prompt tokens served from the prefix cache
  timing: RequestTiming

  @property
  def finished(self) -> bool:
    return self.finish_reason is not None

  @property
  def final(self) -> bool:  # the last event of its stream
    return self.finish_reason is not None


@dataclasses.dataclass(eq=False)
class Request:
  """`token_ids` is the prompt followed by the output so far. `num_computed` of them have
  their KV in the pool; the scheduler's job is to bring it up to `len(token_ids)`, at which
  point the step samples the next token."""

  request_id: str
  token_ids: list[int]
  prompt_len: int
  params: SamplingParams
  seed: int
  cache_salt: str = ""  # prefix-cache scope: pages are shared only under the same salt
  arrival: float = dataclasses.field(default_factory=time.perf_counter)  # perf_counter clock
  num_computed: int = 0
  num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
  num_preemptions: int = 0
  logprobs: list[SampledLogprobs | None] = dataclasses.field(default_factory=list)
  finish_reason: FinishReason | None = None
  scheduled_at: float | None = None
  first_token_at: float | None = None
  finished_at: float | None = None
  # Structured output: the llguidance matcher of params.constraint, advanced with every token
  # (engine/structured.py); None when unconstrained.
  matcher: Any = None
  _reported: int = 0  # output tokens already handed out in an update

  @property
  def num_tokens(self) -> int:
    return len(self.token_ids)

  @property
  def output_ids(self) -> list[int]:
    return self.token_ids[self.prompt_len :]

  @property
  def num_output(self) -> int:
    return len(self.token_ids) - self.prompt_len

  @property
  def finished(self) -> bool:
    return self.finish_reason is not None

  def finish(self, reason: FinishReason) -> None:
    self.finish_reason = reason
    self.finished_at = time.perf_counter()

  def timing(self) -> RequestTiming:
    def since(t):
      return None if t is None else t - self.arrival

    return RequestTiming(
      since(self.scheduled_at), since(self.first_token_at), since(self.finished_at)
    )

  def delta(self) -> TokenDelta:
    """The tokens added since the last call (their text is the front end's to make:
    OutputProcessor)."""
    new_ids = self.token_ids[self.prompt_len + self._reported :]
    logprobs = self.logprobs[self._reported :] if self.params.logprobs is not None else None
    self._reported = self.num_output
    return TokenDelta(
      request_id=self.request_id,
      new_token_ids=new_ids,
      new_logprobs=logprobs,
      finish_reason=self.finish_reason,
      num_prompt_tokens=self.prompt_len,
      num_output_tokens=self.num_output,
      num_cached_tokens=self.num_cached_tokens,
      timing=self.timing(),
    )


@dataclasses.dataclass(frozen=True)
class RequestState:
  """What a decode stage needs to continue a request a prefill stage took to its first token:
  everything but the KV. Plain data, so it crosses processes as a message."""

  prompt_ids: list[int]
  output_ids: list[int]  # the first token (and any before a hand-off)
  params: SamplingParams  # max_tokens resolved
  seed: int  # resolved: the decode stage draws the same random stream
  num_cached_tokens: int = 0
  cache_salt: str = ""

  @classmethod
  def of(cls, request: Request) -> RequestState:
    return cls(
      list(request.token_ids[: request.prompt_len]), list(request.output_ids), request.params,
      request.seed, request.num_cached_tokens, request.cache_salt,
    )  # fmt: skip

  def resume(self, request_id: str) -> Request:
    """The request as the prefill stage left it: prompt KV computed, output so far reported."""
    ids = self.prompt_ids + self.output_ids
    request = Request(
      request_id, ids, len(self.prompt_ids), self.params, self.seed, self.cache_salt
    )
    request.num_computed = len(self.prompt_ids)
    request.num_cached_tokens = self.num_cached_tokens
    request.logprobs = [None] * len(self.output_ids)  # reported by the prefill stage
    request._reported = len(self.output_ids)
    return request
