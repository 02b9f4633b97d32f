"""The engine as a server sees it: the one module of `meshserve.engine` that `meshserve.server`
imports.

- `EngineClient`: what a serving front end offers (generate as a stream, abort, stats, model
  info, tokenization). `AsyncEngine` (colocated, or one stage of a disaggregated pair) and
  `DisaggregatedEngine` (both stages in one process) implement it; `launch` builds one.
- `StageWorker`: what a prefill or decode worker behind a router offers, in plain data
  (`KVTicket` names the KV a prefill worker holds for the decode side).
- Typed stats (`StageStats`), one `Role` enum, and the plain data a stream carries
  (`RequestDelta`, `RequestTiming`, `TokenLogprob`, `SamplingParams`).
- The errors a call can end with.

Importing this module loads no JAX: a router process, which holds no model, imports only it.
"""

from __future__ import annotations

import dataclasses
import enum
import pathlib
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Literal, Protocol

from meshserve.engine.config import EngineConfig
from meshserve.engine.params import (
  MAX_LOGPROBS,
  MAX_STOP_STRING_CHARS,
  MAX_STOP_STRINGS,
  MAX_STOP_TOKEN_IDS,
  Constraint,
  ConstraintError,
  RequestLimits,
  SamplingParams,
)

__all__ = [
  "MAX_LOGPROBS",
  "MAX_STOP_STRINGS",
  "MAX_STOP_STRING_CHARS",
  "MAX_STOP_TOKEN_IDS",
  "Constraint",
  "ConstraintError",
  "EngineClient",
  "EngineConfig",
  "EngineDeadError",
  "EngineInfo",
  "FinishReason",
  "KVTicket",
  "Landed",
  "LaunchSpec",
  "QueueFullError",
  "RequestDelta",
  "RequestIdInUseError",
  "RequestTiming",
  "Role",
  "SamplingParams",
  "StageStats",
  "StageWorker",
  "TokenLogprob",
  "TransferError",
  "enable_compilation_cache",
  "follow",
  "launch",
  "process_index",
  "new_request_id",
]


class Role(enum.StrEnum):
  """What a process, or an engine in it, does."""

  COLOCATED = "colocated"  # prefill and decode interleaved on one mesh
  DISAGGREGATED = "disaggregated"  # a prefill stage and a decode stage, one process
  PREFILL = "prefill"  # a worker that takes requests to their first token, then hands off
  DECODE = "decode"  # a worker that continues requests prefilled elsewhere
  ROUTER = "router"  # holds no model: routes to prefill and decode workers


# Errors. Each maps to one gRPC status in meshserve.server.servicer.status_of.
class EngineDeadError(RuntimeError):
  """The engine core has stopped (a failed step, or shutdown); no request can be served."""


class QueueFullError(RuntimeError):
  """The engine's queue is full; retry later."""


class RequestIdInUseError(RuntimeError):
  """A request with this client id is still streaming."""


class TransferError(RuntimeError):
  """A request's KV could not be moved between the stages."""


def new_request_id() -> str:
  """A server-assigned request id: random, so no client can guess (and take) it ahead."""
  return uuid.uuid4().hex


# What a stream carries.
FinishReason = Literal["stop", "length", "abort"]


@dataclasses.dataclass(frozen=True, slots=True)
class TokenLogprob:
  """A sampled token's log-probability and, when asked, the likeliest alternatives'."""

  token_id: int
  logprob: float
  top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), likeliest first


@dataclasses.dataclass(frozen=True, slots=True)
class RequestTiming:
  """Seconds from the request's arrival (None: not reached yet)."""

  queued_s: float | None = None  # until first scheduled
  first_token_s: float | None = None
  finished_s: float | None = None
  transfer_s: float | None = None  # disaggregated: the KV's move between the stages


@dataclasses.dataclass(frozen=True, slots=True)
class RequestDelta:
  """What one step added to a request. Its size does not grow with the request, so a stream
  of deltas costs O(n) however slowly it is consumed."""

  request_id: str
  new_token_ids: list[int]
  new_text: str
  new_logprobs: list[TokenLogprob] | None  # one per new token id, when the request asked
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


@dataclasses.dataclass(frozen=True)
class Landed:
  """A decode stream's first event: the KV is in the decode pool and the request runs."""

  request_id: str
  seconds: float  # from the import's arrival, waiting for pages included
  bytes: int
  final = False


@dataclasses.dataclass(frozen=True, slots=True)
class StageStats:
  """One stage's live counters, as GetModelInfo and /metrics report them."""

  stage: str  # the label: the role, or for a router's worker "ROLE ADDRESS"
  role: Role
  running: int = 0
  waiting: int = 0
  free_pages: int = 0
  total_pages: int = 0
  cached_tokens: int = 0  # prompt tokens served from the prefix cache, since start
  preemptions: int = 0
  steps: int = 0
  compilations: int = 0
  pinned: int = 0  # prefill: handed-off requests whose pages wait for the decode side
  importing: int = 0  # decode: requests whose KV is on its way
  kv_transfers: int = 0  # decode: hand-offs landed
  kv_transfer_bytes: int = 0
  kv_transfer_seconds: float = 0.0

  @property
  def used_pages(self) -> int:
    return self.total_pages - self.free_pages

  @classmethod
  def of(cls, stage: str, role: Role, counters: dict) -> StageStats:
    """From an engine's counters (`Engine.stats()`); keys it does not know are left out."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(stage, role, **{k: v for k, v in counters.items() if k in known})


@dataclasses.dataclass(frozen=True, slots=True)
class EngineInfo:
  """What a server reports of the engine behind it, and checks requests against."""

  model: str
  vocab_size: int
  eos_token_ids: tuple[int, ...]
  config: EngineConfig
  max_queue: int | None
  layout: str  # "tp=4", "single device", or per stage "prefill tp=2, decode tp=4"
  num_devices: int
  platform: str
  attention: str
  dtype: str

  @property
  def limits(self) -> RequestLimits:
    return RequestLimits(self.vocab_size, self.config.max_model_len)


@dataclasses.dataclass(frozen=True, slots=True)
class KVTicket:
  """A prefill worker's hand-off, in plain data: where the decode side pulls the KV from, and
  the request's state to continue it with. The decode side checks every field."""

  transfer_address: str  # host:port of the prefill worker's transfer server
  transfer_id: int
  piece_shape: tuple[int, ...]  # one kv-head shard of the packed KV
  dtype: str
  num_pieces: int
  prompt_token_ids: tuple[int, ...]
  output_token_ids: tuple[int, ...]
  params: SamplingParams  # resolved: every field set
  seed: int
  num_cached_tokens: int
  cache_salt: str
  queued_s: float
  first_token_s: float


class EngineClient(Protocol):
  """A serving front end. Streams end early by closing them: that aborts the request wherever
  it is and frees its pages."""

  role: Role
  info: EngineInfo
  ready: threading.Event  # set once warm (or failed: see `error`)

  @property
  def error(self) -> EngineDeadError | None: ...

  def check_queue(self) -> None:
    """Raises QueueFullError or EngineDeadError if a request arriving now would be refused."""

  def encode(self, text: str) -> list[int]: ...

  def encode_chat(self, messages: Sequence[dict[str, str]]) -> tuple[str, list[int]]: ...

  def generate(
    self,
    prompt: str | Sequence[int],
    params: SamplingParams | None = None,
    request_id: str | None = None,
    *,
    deadline: float | None = None,
    cache_salt: str = "",
  ) -> AsyncIterator[RequestDelta]: ...

  async def abort(self, request_id: str) -> bool:
    """Ends the request streaming under `request_id` (its stream ends with finish_reason
    "abort"); False when there is none."""

  def stages(self) -> list[StageStats]: ...

  def shutdown(self, timeout: float | None = None) -> None: ...


class StageWorker(EngineClient, Protocol):
  """One stage of a disaggregated pair in a process of its own, behind a router."""

  kv_shards: int  # how many kv-head pieces this stage's layout splits the KV into
  transfer_address: str

  def prefill(
    self,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    request_id: str | None,
    *,
    kv_shards: int,
    deadline: float | None = None,
    cache_salt: str = "",
  ) -> AsyncIterator[RequestDelta | KVTicket]:
    """Prefill role: the first token's delta, then (unless that finished the request) a
    ticket for the KV, held until `release_kv` or until the stream is closed."""

  def release_kv(self, ticket: KVTicket) -> None:
    """Prefill role: the decode side has the KV; its pages here may go."""

  def decode(
    self, ticket: KVTicket, request_id: str | None, *, deadline: float | None = None
  ) -> AsyncIterator[RequestDelta | Landed]:
    """Decode role: checks the ticket (ValueError names the field), pulls the KV into pages
    reserved for it, then streams `Landed` and the rest of the request."""


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
  """What `launch` builds: the model, where it runs, and the engine's settings."""

  model: str  # a registered name, a .gguf path, an HF directory or an Orbax checkpoint
  role: Role = Role.COLOCATED  # COLOCATED, DISAGGREGATED, PREFILL or DECODE
  dtype: str = "auto"  # weights and KV cache: float32, bfloat16, or auto (bfloat16 off CPU)
  layout: str | None = None  # COLOCATED, PREFILL, DECODE; None: one device
  prefill_layout: str = "tp=1"  # DISAGGREGATED: each stage on devices of its own
  decode_layout: str = "tp=1"
  engine: EngineConfig = EngineConfig()
  max_queue: int | None = 256  # requests that may wait beyond the batch
  warmup: bool = True  # compile every step shape before `ready`
  transfer_host: str = "127.0.0.1"  # PREFILL, DECODE: where the KV transfer server listens

  def __post_init__(self):
    if self.role == Role.ROUTER:
      raise ValueError("role: a router holds no model; it launches no engine")
    object.__setattr__(self, "role", Role(self.role))


def launch(spec: LaunchSpec, *, on_dead: Callable[[Exception], None] | None = None):
  """Loads the model (one per stage) and starts the engine `spec` describes; warms up in the
  background (`ready`). Returns an EngineClient, a StageWorker for a stage worker."""
  from meshserve.engine.launch import launch as start

  return start(spec, on_dead=on_dead)


def process_index() -> int:
  """This process's index among the processes of a multi-host mesh (jax.distributed); 0 when
  alone. Process 0 serves; the others follow it (`follow`)."""
  import jax

  return jax.process_index()


def follow(spec: LaunchSpec) -> None:
  """Multi-host, every process but 0: loads the model, compiles every step shape and runs
  process 0's schedule in lockstep (meshserve.engine.lockstep) until process 0 stops."""
  from meshserve.engine.launch import follow as run

  run(spec)


def enable_compilation_cache(path: str | None = None) -> pathlib.Path:
  """Turns on JAX's persistent compilation cache, so a restarted server loads its compiled
  steps instead of compiling them again; returns its folder (see meshserve.engine.launch)."""
  from meshserve.engine.launch import enable_compilation_cache as enable

  return enable(path)
