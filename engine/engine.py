"""The engine loop: schedule -> execute -> update, one step at a time.

`Engine` is synchronous and single-threaded: `add_request` and `abort` queue work, `step` runs
one device step and returns a delta for every request it advanced. It takes token ids: the
front ends (`LLM`, `AsyncEngine`) tokenize. `LLM` drives it for offline batches; `EngineCore`
owns it on a thread of its own for the server.

Disaggregated serving runs two engines, one per stage (`role`), and the engine offers it
primitives only; `meshserve.engine.handoff` owns the hand-off on top of them:
- `detach` takes a request that reached its first token out with its prompt's pages, which
  stay allocated until `free`, so its KV can be copied out meanwhile;
- `reserve` takes pages for a request prefilled elsewhere, and once the KV has been written
  into them, `admit` attaches the request to continue from its first token.
A "colocated" engine (the default) does both, with no hand-off.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import threading
import time
from collections.abc import Sequence

from meshserve.engine import structured
from meshserve.engine.api import Role
from meshserve.engine.config import EngineConfig
from meshserve.engine.kv_manager import PageAllocator, ReplicaAllocator
from meshserve.engine.params import RequestLimits
from meshserve.engine.request import Request, RequestState, TokenDelta
from meshserve.engine.runner import Runner
from meshserve.engine.sampling import SamplingParams
from meshserve.engine.scheduler import Scheduler
from meshserve.models import Model

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class StepStats:
  """What one step did and how long it took (host work included)."""

  prefill_tokens: int
  decodes: int
  shapes: tuple[tuple[int, ...], ...]  # the runner's compiled-shape keys it dispatched
  seconds: float


ROLES = (Role.COLOCATED, Role.PREFILL, Role.DECODE)  # an Engine runs one stage, or both


class Engine:
  def __init__(self, model: Model, config: EngineConfig, *, role: Role | str = Role.COLOCATED):
    if role not in ROLES:
      raise ValueError(f"role: {role!r} is not one of {', '.join(ROLES)}")
    role = Role(role)
    config = config.for_platform(model.platform)
    self.model, self.config, self.role = model, config, role
    self.tokenizer = model.tokenizer
    # Data parallel replicas each keep their own slice of the pool (colocated engines; a
    # stage keeps one pool, split as the rules say, for page lists that cross stages).
    replicas = model.layout.data if model.layout is not None and role == "colocated" else 1
    if replicas > 1:
      _check_replicas(config, replicas)
      self.allocator = ReplicaAllocator(
        config.num_pages, config.page_size, replicas=replicas,
        prefix_caching=config.prefix_caching,
      )  # fmt: skip
    else:
      self.allocator = PageAllocator(
        config.num_pages, config.page_size, prefix_caching=config.prefix_caching
      )
    self.scheduler = Scheduler(self.allocator, config)
    self.limits = RequestLimits(model.config.vocab_size, config.max_model_len)
    self.runner = Runner(model, config, replicas)
    self.requests: dict[str, Request] = {}  # unfinished, by id
    self._ids = itertools.count()
    self._seeds = random.Random(config.seed)
    self.num_steps = 0
    self.last_step: StepStats | None = None
    self._grammars: structured.Grammars | None = None
    self._grammars_lock = threading.Lock()

  def validate(self, token_ids: Sequence[int], params: SamplingParams) -> None:
    """Raises ValueError naming the field when a request cannot be served. Reads only the
    configuration, so any thread may call it."""
    self.limits.check(token_ids, params, prompt="token_ids")

  @property
  def grammars(self) -> structured.Grammars:
    """The model's constraint compiler, built on first use (0.3 s for SmolLM2's 49k-token
    vocabulary); a server builds it while warming up."""
    with self._grammars_lock:
      if self._grammars is None:
        eos = self.model.config.eos_token_ids
        self._grammars = structured.Grammars(self.tokenizer, self.model.config.vocab_size, eos)
      return self._grammars

  def constrain(self, params: SamplingParams, output_ids: Sequence[int] = ()) -> structured.Matcher:
    """A matcher for `params.constraint` that has consumed `output_ids` (a request continued
    from another stage); ConstraintError naming `constraint.<kind>` where it does not compile.
    Any thread may call it: front ends compile off the engine's thread."""
    return self.grammars.resume(params.constraint, output_ids)

  def validate_state(self, state: RequestState) -> None:
    """Raises ValueError naming the field when a hand-off's state cannot be continued here:
    it comes from another process, so nothing in it is trusted. Field names are those of
    the hand-off message (stages.proto)."""
    self.limits.check(
      state.prompt_ids, state.params, prompt="prompt_token_ids", sampling="sampling."
    )
    vocab, limit = self.limits.vocab_size, self.limits.max_model_len
    if not state.output_ids:
      raise ValueError("output_token_ids: a hand-off carries at least the first token")
    if min(state.output_ids) < 0 or max(state.output_ids) >= vocab:
      raise ValueError(f"output_token_ids: ids must lie in [0, {vocab})")
    total = len(state.prompt_ids) + len(state.output_ids)
    if total >= limit:
      raise ValueError(f"output_token_ids: {total} tokens leave no room within {limit}")
    if len(state.output_ids) >= state.params.max_tokens:
      raise ValueError(
        f"output_token_ids: {len(state.output_ids)} tokens already reach max_tokens "
        f"{state.params.max_tokens}"
      )
    if not (isinstance(state.seed, int) and 0 <= state.seed < 2**32):
      raise ValueError(f"seed: must be an integer in [0, 2**32), got {state.seed!r}")
    if not 0 <= state.num_cached_tokens <= len(state.prompt_ids):
      raise ValueError(
        f"num_cached_tokens: {state.num_cached_tokens} is not in [0, {len(state.prompt_ids)}]"
      )

  def add_request(
    self,
    token_ids: Sequence[int],
    params: SamplingParams | None = None,
    request_id: str | None = None,
    *,
    arrival: float | None = None,
    cache_salt: str = "",
    matcher: structured.Matcher | None = None,
  ) -> str:
    """Queues a request; returns its id. Raises ValueError naming the offending field for bad
    input. `arrival` (a time.perf_counter() reading) is when its timings start; `cache_salt`
    scopes its prefix-cache pages (see PageAllocator.match_prefix). A constrained request's
    `matcher` comes from `constrain` (compiled here when not given)."""
    params = params or SamplingParams()
    if request_id is None:
      request_id = f"req-{next(self._ids)}"
    if request_id in self.requests:
      raise ValueError(f"request_id: {request_id!r} is already in use")
    ids = [int(t) for t in token_ids]
    self.validate(ids, params)
    # An unseeded request's seed comes from the config's seed in arrival order, so every
    # process of a multi-host engine draws the same tokens and keeps the same schedule.
    seed = params.seed if params.seed is not None else self._seeds.getrandbits(31)
    if params.constraint is not None and matcher is None:
      matcher = self.constrain(params)
    request = Request(request_id, ids, len(ids), params, seed, cache_salt)
    request.matcher = matcher if params.constraint is not None else None
    if arrival is not None:
      request.arrival = arrival
    self.requests[request_id] = request
    self.scheduler.add(request)
    return request_id

  def abort(self, request_id: str) -> TokenDelta | None:
    """Stops a request and frees its pages at once, wherever it is (reserved for an import
    included); its last delta, or None if it was not running."""
    if self.scheduler.unreserve(request_id):
      return None
    request = self.requests.pop(request_id, None)
    if request is None:
      return None
    self.scheduler.remove(request)
    request.finish("abort")
    return request.delta()

  def has_unfinished(self) -> bool:
    return bool(self.requests)

  def detach(self, request_id: str) -> tuple[Request, list[int]]:
    """Takes a running request out of the engine with the pages that hold its prompt's KV,
    which stay allocated until `free` (a prefill stage hands it off meanwhile)."""
    request = self.requests.pop(request_id)
    self.scheduler.detach(request)
    pages = self.allocator.table(request_id)
    return request, pages[: -(-request.prompt_len // self.config.page_size)]

  def free(self, request_id: str) -> None:
    """Returns a detached request's pages to the pool (full ones stay in the prefix cache)."""
    self.allocator.free(request_id)

  def has_batch_slot(self) -> bool:
    """Whether one more request could join the batch (a reserved one keeps a slot too)."""
    return len(self.scheduler.running) + len(self.scheduler.reserved) < self.config.max_batch

  def reserve(self, request_id: str, num_tokens: int) -> list[int] | None:
    """Decode: the pages to write the KV of a request's `num_tokens` prompt tokens into, or
    None while the pool has too few free. One more token's room is reserved too, for its first
    decode step. Nothing runs in them until `admit`; `abort` returns them."""
    if request_id in self.requests or request_id in self.scheduler.reserved:
      raise ValueError(f"request_id: {request_id!r} is already in use")
    pages = self.scheduler.reserve(request_id, num_tokens)
    return None if pages is None else pages[: -(-num_tokens // self.config.page_size)]

  def admit(
    self,
    request_id: str,
    state: RequestState,
    *,
    arrival: float | None = None,
    matcher: structured.Matcher | None = None,
  ) -> None:
    """Decode: continues a request whose prompt KV is now in its reserved pages. A constrained
    request's `matcher` has consumed its output tokens (`constrain`; done here when not
    given)."""
    num_tokens = self.scheduler.reserved[request_id]
    if num_tokens != len(state.prompt_ids):
      raise ValueError(f"state: {len(state.prompt_ids)} prompt tokens, {num_tokens} reserved")
    request = state.resume(request_id)
    if state.params.constraint is not None:
      request.matcher = matcher or self.constrain(state.params, state.output_ids)
    if arrival is not None:
      request.arrival = arrival
    request.scheduled_at = time.perf_counter()
    self.requests[request_id] = request
    self.scheduler.attach(request)  # straight into the batch: the core keeps it a slot

  def step(self) -> list[TokenDelta]:
    """Runs one step; returns a delta for every request that produced a token or ended."""
    start = time.perf_counter()
    schedule = self.scheduler.schedule()
    if schedule.empty:
      return []
    results = self.runner.execute(schedule)
    self.scheduler.update(schedule)
    outputs = []
    for chunk, sampled in results:
      request = chunk.request
      self._append(request, sampled)
      if request.finished:
        self.scheduler.remove(request)
        del self.requests[request.request_id]
      outputs.append(request.delta())
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
      compilations=self.runner.num_compiles,
      reserved=len(self.scheduler.reserved),
    )

  def _append(self, request: Request, sampled) -> None:
    """Adds a sampled token to the request and settles whether it is finished: by an EOS or
    stop token, or by length. Stop strings and logprob formatting are the front end's
    (OutputProcessor): no text is made on this thread."""
    token, params = int(sampled.tokens), request.params
    request.token_ids.append(token)
    if request.first_token_at is None:
      request.first_token_at = time.perf_counter()
    if params.logprobs is not None:  # numpy views: the front end formats them
      n = params.logprobs
      request.logprobs.append((sampled.logprob, sampled.top_ids[:n], sampled.top_logprobs[:n]))
    if request.matcher is not None and not request.matcher.consume_token(token):
      # The mask allowed only tokens the grammar accepts: this is a bug, not the caller's.
      log.error("request %s: constraint refused token %d: %s", request.request_id, token,
                request.matcher.get_error())  # fmt: skip
      request.finish("abort")
      return
    # A constrained request's mask lets an EOS through only once its grammar is complete (and
    # nothing else once the grammar allows no more): there the EOS ends it, ignore_eos or not.
    eos = token in self.model.config.eos_token_ids and (
      not params.ignore_eos or request.matcher is not None
    )
    if eos or token in params.stop_token_ids:
      request.finish("stop")
    elif request.num_output >= params.max_tokens or request.num_tokens >= self.config.max_model_len:
      request.finish("length")


def _check_replicas(config: EngineConfig, replicas: int) -> None:
  """What a pool slice per data replica needs of the config, each named."""
  if replicas & (replicas - 1):
    raise ValueError(f"layout: dp={replicas}; a pool per replica needs dp a power of two")
  if config.max_batch % replicas:
    raise ValueError(f"max_batch ({config.max_batch}) must be a multiple of dp ({replicas})")
  if config.prefill_row_buckets[-1] < replicas:
    raise ValueError(
      f"max_prefill_seqs ({config.max_prefill_seqs}) must be at least dp ({replicas})"
    )
  if config.segment and config.segment_row_buckets[-1] < replicas:
    raise ValueError(
      f"max_num_batched_tokens ({config.max_num_batched_tokens}) must hold dp ({replicas}) "
      f"prefill rows of {config.segment} tokens"
    )
  slice_pages = config.num_pages // replicas - 1  # each slice keeps a sink page
  if slice_pages * config.page_size < config.max_model_len:
    raise ValueError(
      f"num_pages ({config.num_pages}): each of the dp={replicas} slices holds "
      f"{slice_pages * config.page_size} tokens, less than max_model_len ({config.max_model_len})"
    )
