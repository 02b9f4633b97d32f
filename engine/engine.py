"""The engine loop: schedule -> execute -> update, one step at a time.

`Engine` is synchronous and single-threaded: `add_request` and `abort` queue work, `step` runs
one device step and returns the outputs of the requests it advanced. `LLM` drives it for
offline batches; `AsyncEngine` drives it from a background thread for the server.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import secrets
import time
from collections.abc import Sequence

from engine.config import EngineConfig
from engine.kv_manager import PageAllocator
from engine.output import RequestOutput, TextStream, TokenLogprob
from engine.request import Request
from engine.runner import Runner
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from models import Model

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class StepStats:
  """What one step did and how long it took (host work included)."""

  prefill_tokens: int
  decodes: int
  shapes: tuple[tuple[int, ...], ...]  # the runner's compiled-shape keys it dispatched
  seconds: float


class Engine:
  def __init__(self, model: Model, config: EngineConfig):
    self.model, self.config = model, config
    self.tokenizer = model.tokenizer
    self.allocator = PageAllocator(
      config.num_pages, config.page_size, prefix_caching=config.prefix_caching
    )
    self.scheduler = Scheduler(self.allocator, config)
    self.runner = Runner(model, config)
    self.requests: dict[str, Request] = {}  # unfinished, by id
    self._ids = itertools.count()
    self.num_steps = 0
    self.last_step: StepStats | None = None

  def add_request(
    self,
    prompt: str | Sequence[int],
    params: SamplingParams | None = None,
    request_id: str | None = None,
  ) -> str:
    """Queues a request (text, or token ids); returns its id. Raises ValueError naming the
    offending field for bad input."""
    params = params or SamplingParams()
    if request_id is None:
      request_id = f"req-{next(self._ids)}"
    if request_id in self.requests:
      raise ValueError(f"request_id: {request_id!r} is already in use")
    ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    if not ids:
      raise ValueError("prompt: the prompt is empty")
    vocab = self.model.config.vocab_size
    if min(ids) < 0 or max(ids) >= vocab:
      raise ValueError(f"prompt: token ids must lie in [0, {vocab})")
    if len(ids) >= self.config.max_model_len:
      raise ValueError(
        f"prompt: {len(ids)} tokens leave no room to generate within max_model_len "
        f"{self.config.max_model_len}"
      )
    if any(t >= vocab for t in params.stop_token_ids):
      raise ValueError(f"stop_token_ids: ids must lie in [0, {vocab})")
    seed = params.seed if params.seed is not None else secrets.randbits(31)
    stream = TextStream(self.tokenizer, params.stop)
    request = Request(request_id, ids, len(ids), params, seed, stream)
    self.requests[request_id] = request
    self.scheduler.add(request)
    return request_id

  def abort(self, request_id: str) -> RequestOutput | None:
    """Stops a request and frees its pages at once; its final output, or None if unknown."""
    request = self.requests.pop(request_id, None)
    if request is None:
      return None
    self.scheduler.remove(request)
    request.finish("abort")
    return request.output()

  def has_unfinished(self) -> bool:
    return bool(self.requests)

  def step(self) -> list[RequestOutput]:
    """Runs one step; returns an output for every request that produced a token or ended."""
    start = time.perf_counter()
    schedule = self.scheduler.schedule()
    if schedule.empty:
      return []
    results = self.runner.execute(schedule, self.allocator)
    for chunk in schedule.prefills + schedule.decodes:
      request = chunk.request
      request.num_computed += chunk.length
      self.allocator.commit(request.request_id, request.token_ids, request.num_computed)
    outputs = []
    for chunk, sampled in results:
      request = chunk.request
      self._append(request, sampled)
      if request.finished:
        self.scheduler.remove(request)
        del self.requests[request.request_id]
      outputs.append(request.output())
    self.num_steps += 1
    self.last_step = StepStats(
      prefill_tokens=sum(c.length for c in schedule.prefills),
      decodes=len(schedule.decodes),
      shapes=self.runner.last_shapes,
      seconds=time.perf_counter() - start,
    )
    return outputs

  def stats(self) -> dict[str, int]:
    return dict(
      waiting=len(self.scheduler.waiting),
      running=len(self.scheduler.running),
      free_pages=self.allocator.num_free,
      total_pages=self.config.num_pages - 1,
      cached_tokens=self.scheduler.num_cached_tokens,
      preemptions=self.scheduler.num_preemptions,
      steps=self.num_steps,
    )

  def _append(self, request: Request, sampled) -> None:
    """Adds a sampled token to the request and settles whether it is finished."""
    token, params = int(sampled.tokens), request.params
    request.token_ids.append(token)
    if request.first_token_at is None:
      request.first_token_at = time.perf_counter()
    if params.logprobs is not None:
      n = params.logprobs
      top = zip(sampled.top_ids[:n].tolist(), sampled.top_logprobs[:n].tolist(), strict=True)
      request.logprobs.append(TokenLogprob(token, float(sampled.logprob), tuple(top)))
    eos = token in self.model.config.eos_token_ids and not params.ignore_eos
    if eos or token in params.stop_token_ids:
      request.stream.flush()
      request.finish("stop")
      return
    request.stream.add(token)
    if request.stream.stopped:
      request.finish("stop")
    elif request.num_output >= params.max_tokens or request.num_tokens >= self.config.max_model_len:
      request.stream.flush()
      request.finish("length")
