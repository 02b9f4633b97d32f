"""`meshserve.v1.Inference` over an `EngineClient`: protos in, engine calls, protos out.

Every failure has one status code, and its message names the field at fault:
  INVALID_ARGUMENT    bad input (the message starts with the field, e.g. "sampling.top_p")
  ALREADY_EXISTS      a request_id that is still streaming
  RESOURCE_EXHAUSTED  the queue is full
  DEADLINE_EXCEEDED   the call's deadline passed
  UNAVAILABLE         the engine has failed or is shutting down
  INTERNAL            anything else: a bug (the message has the request id, the log a traceback)
A request whose client disconnects or cancels is aborted and its KV pages freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import logging
import time

import grpc

from meshserve.engine.api import (
  MAX_LOGPROBS,
  MAX_STOP_STRING_CHARS,
  MAX_STOP_STRINGS,
  MAX_STOP_TOKEN_IDS,
  Constraint,
  ConstraintError,
  EngineClient,
  EngineDeadError,
  QueueFullError,
  RequestDelta,
  RequestIdInUseError,
  RequestTiming,
  Role,
  SamplingParams,
  StageStats,
  TransferError,
)
from meshserve.server.metrics import Metrics
from meshserve.server.proto.meshserve.v1 import inference_pb2 as pb
from meshserve.server.proto.meshserve.v1 import inference_pb2_grpc

log = logging.getLogger("meshserve.requests")

MAX_TEXT_BYTES = 1 << 20  # a longer text cannot fit any context; refuse it before tokenizing
MAX_CACHE_SALT_BYTES = 256
# The authenticated caller's name (server.serve.BearerTokenAuth sets it; "" when unnamed or
# without auth): its own prefix-cache scope and request-id namespace.
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("meshserve_caller", default="")


def scoped(caller: str, value: str) -> str:
  """`value` in `caller`'s namespace: two callers' equal values never meet, whatever either
  sends (the unnamed caller's too: its values are prefixed as well)."""
  return f"{caller}\x1f{value}"


def scoped_salt(caller: str, salt: str) -> str:
  """A cache salt in `caller`'s scope, no longer than a salt may be (a router forwards it)."""
  return hashlib.sha256(scoped(caller, salt).encode()).hexdigest()


DEFAULT_MAX_TOKENS = 64
CHAT_ROLES = ("system", "user", "assistant")
FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


class InvalidArgument(ValueError):
  pass


class SlowReader(TimeoutError):
  """The client stopped reading its stream."""


async def send(context: grpc.aio.ServicerContext, response, timeout: float | None) -> None:
  """Writes one response of a stream, waiting at most `timeout` seconds for the client to make
  room for it (HTTP/2 flow control): a client that stops reading cannot hold a request, its
  batch slot and its pages for longer."""
  try:
    await asyncio.wait_for(context.write(response), timeout)
  except TimeoutError:
    raise SlowReader(
      f"the client read nothing for {timeout:g}s (--slow-reader-timeout): request cancelled"
    ) from None


class EngineNotReady(RuntimeError):
  pass


class WrongStage(RuntimeError):
  pass


def status_of(e: Exception, request_id: str = "") -> tuple[grpc.StatusCode, str]:
  """The status code and message a failed call ends with. An error nobody expected is logged
  with its traceback and ends the call INTERNAL, naming the request."""
  if isinstance(e, ConstraintError):  # "constraint.<kind>: ..." of the request's sampling
    return grpc.StatusCode.INVALID_ARGUMENT, f"sampling.{e}"
  if isinstance(e, ValueError):  # InvalidArgument, or the engine's own checks
    return grpc.StatusCode.INVALID_ARGUMENT, str(e)
  if isinstance(e, RequestIdInUseError):
    return grpc.StatusCode.ALREADY_EXISTS, str(e)
  if isinstance(e, QueueFullError):
    return grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
  if isinstance(e, TimeoutError):
    return grpc.StatusCode.DEADLINE_EXCEEDED, str(e) or "the deadline passed"
  if isinstance(e, EngineDeadError | EngineNotReady | TransferError):
    return grpc.StatusCode.UNAVAILABLE, str(e)
  if isinstance(e, WrongStage):
    return grpc.StatusCode.FAILED_PRECONDITION, str(e)
  log.error("request %r failed", request_id or "-", exc_info=e)
  return grpc.StatusCode.INTERNAL, (
    f"internal error in request {request_id or '(no id)'}: {type(e).__name__}: {e}"
  )


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
  """The call's deadline on the running loop's clock."""
  remaining = context.time_remaining()
  return None if remaining is None else asyncio.get_running_loop().time() + remaining


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
  """Over any EngineClient: colocated, both stages in this process, or a stage worker (which
  answers Tokenize and GetModelInfo, and sends Generate to its router)."""

  def __init__(self, engine: EngineClient, metrics: Metrics, *, slow_reader_timeout: float = 30.0):
    self.engine, self.metrics = engine, metrics
    self.info = engine.info
    self.config = self.info.config
    self.slow_reader_timeout = slow_reader_timeout

  async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
    start, status, delta = time.perf_counter(), grpc.StatusCode.UNKNOWN, None
    try:
      if self.engine.role in (Role.PREFILL, Role.DECODE):
        raise WrongStage(
          f"this is a {self.engine.role} worker: send Generate to the router in front of it"
        )
      ids, params = await self.parse(request)
      caller = CALLER.get()
      stream = self.engine.generate(
        ids, params, scoped(caller, request.request_id) if request.request_id else None,
        deadline=deadline_of(context), cache_salt=scoped_salt(caller, request.cache_salt),
      )  # fmt: skip
      async with contextlib.aclosing(stream):
        async for delta in stream:
          if delta.finish_reason == "abort":
            raise EngineDeadError("the request was aborted: the server is shutting down")
          response = response_proto(delta)
          response.request_id = request.request_id or delta.request_id  # unscoped
          await send(context, response, self.slow_reader_timeout)
      status = grpc.StatusCode.OK
    except asyncio.CancelledError:  # the client went away
      status = grpc.StatusCode.CANCELLED
      raise
    except RequestIdInUseError:  # its message has the scoped id
      status = grpc.StatusCode.ALREADY_EXISTS
      message = f"request_id: {request.request_id!r} is already in flight"
    except Exception as e:
      status, message = status_of(e, request.request_id or (delta and delta.request_id))
    finally:
      record(self.metrics, request.request_id, delta, status, time.perf_counter() - start)
    if status != grpc.StatusCode.OK:
      await context.abort(status, message)

  async def parse(self, request: pb.GenerateRequest) -> tuple[list[int], SamplingParams]:
    """The prompt's token ids and the sampling parameters; InvalidArgument names the field."""
    if not self.engine.ready.is_set():
      raise EngineNotReady("the server is warming up; health turns SERVING when it is done")
    # What costs nothing to check comes first: tokenizing a long text may take a while.
    check_size(request.cache_salt, "cache_salt", MAX_CACHE_SALT_BYTES)
    sampling_of(request.sampling)
    self.engine.check_queue()
    field, ids = await self._prompt(request.text, request.token_ids, request.messages)
    # Unset, max_tokens is 64 or what room the context leaves; set, it must fit.
    room = max(min(DEFAULT_MAX_TOKENS, self.info.limits.room(len(ids))), 1)
    params = sampling_of(request.sampling, room)
    try:
      self.info.limits.check(ids, params, prompt=field, sampling="sampling.", max_tokens_fit=True)
    except ValueError as e:
      raise InvalidArgument(str(e)) from None
    return ids, params

  async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext):
    try:
      if bool(request.text) == bool(request.messages):
        raise InvalidArgument("input: set exactly one of text and messages")
      if request.messages:
        text, ids = await asyncio.to_thread(self.engine.encode_chat, _messages(request.messages))
      else:
        check_size(request.text)
        text, ids = request.text, await asyncio.to_thread(self.engine.encode, request.text)
    except ValueError as e:
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    return pb.TokenizeResponse(token_ids=ids, text=text)

  async def GetModelInfo(self, request: pb.GetModelInfoRequest, context):
    cfg, info = self.config, self.info
    return pb.ModelInfo(
      model=info.model,
      vocab_size=info.vocab_size,
      max_model_len=cfg.max_model_len,
      max_batch=cfg.max_batch,
      max_queue=info.max_queue if info.max_queue is not None else -1,
      page_size=cfg.page_size,
      max_logprobs=MAX_LOGPROBS,
      eos_token_ids=info.eos_token_ids,
      layout=self.info.layout,
      num_devices=self.info.num_devices,
      platform=self.info.platform,
      attention=self.info.attention,
      dtype=self.info.dtype,
      stages=[pb.Stage(role=s.role, stats=stage_stats(s)) for s in self.engine.stages()],
      max_num_batched_tokens=cfg.max_num_batched_tokens,
      max_stop_strings=MAX_STOP_STRINGS,
      max_stop_string_chars=MAX_STOP_STRING_CHARS,
      max_stop_token_ids=MAX_STOP_TOKEN_IDS,
      max_text_bytes=MAX_TEXT_BYTES,
    )

  async def _prompt(self, text: str, token_ids, messages) -> tuple[str, list[int]]:
    """(the input field given, its token ids). Tokenizing and templating run on a worker
    thread: a long text must not stall the other streams."""
    given = [name for name, v in (("text", text), ("token_ids", token_ids), ("messages", messages))
             if v]  # fmt: skip
    if len(given) != 1:
      got = " and ".join(given) if given else "none"
      raise InvalidArgument(f"input: set exactly one of text, token_ids and messages (got {got})")
    field = given[0]
    if messages:
      ids = (await asyncio.to_thread(self.engine.encode_chat, _messages(messages)))[1]
    elif text:
      check_size(text)
      ids = await asyncio.to_thread(self.engine.encode, text)
    else:
      ids = list(token_ids)
    return field, ids


def record(
  metrics: Metrics, request_id: str, last: RequestDelta | None, status, seconds: float
) -> None:
  """A Generate call's log line and metrics, once it is over however it ended."""
  metrics.request_done(status.name, last)
  request_id = request_id or (last.request_id if last else "-")
  if last is None:
    log.info("request %r: %s after %.3fs", request_id, status.name, seconds)
    return
  t = last.timing
  transfer = "" if t.transfer_s is None else f" transfer={t.transfer_s:.3f}s"
  log.info(
    "request %r: %s finish=%s prompt=%d cached=%d output=%d queue=%s ttft=%s%s total=%.3fs",
    request_id, status.name, last.finish_reason, last.num_prompt_tokens,
    last.num_cached_tokens, last.num_output_tokens, _seconds(t.queued_s),
    _seconds(t.first_token_s), transfer, seconds,
  )  # fmt: skip


def stage_stats(s: StageStats) -> pb.StageStats:
  return pb.StageStats(
    running=s.running,
    waiting=s.waiting,
    free_kv_pages=s.free_pages,
    total_kv_pages=s.total_pages,
    cached_prompt_tokens=s.cached_tokens,
    preemptions=s.preemptions,
    steps=s.steps,
    compilations=s.compilations,
    pinned=s.pinned,
    importing=s.importing,
    kv_transfers=s.kv_transfers,
    kv_transfer_bytes=s.kv_transfer_bytes,
    kv_transfer_seconds=s.kv_transfer_seconds,
  )


def stats_of(stage: str, role: str, s: pb.StageStats) -> StageStats:
  """The inverse of stage_stats (a router reads its workers' stats)."""
  return StageStats(
    stage, Role(role), running=s.running, waiting=s.waiting, free_pages=s.free_kv_pages,
    total_pages=s.total_kv_pages, cached_tokens=s.cached_prompt_tokens,
    preemptions=s.preemptions, steps=s.steps, compilations=s.compilations, pinned=s.pinned,
    importing=s.importing, kv_transfers=s.kv_transfers, kv_transfer_bytes=s.kv_transfer_bytes,
    kv_transfer_seconds=s.kv_transfer_seconds,
  )  # fmt: skip


def response_proto(delta: RequestDelta) -> pb.GenerateResponse:
  out = pb.GenerateResponse(
    request_id=delta.request_id, token_ids=delta.new_token_ids, text=delta.new_text
  )
  for lp in delta.new_logprobs or ():
    top = [pb.TopLogprob(token_id=i, logprob=p) for i, p in lp.top]
    out.logprobs.append(pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, top=top))
  if delta.finished:
    out.finish_reason = FINISH_REASONS[delta.finish_reason]
    out.usage.CopyFrom(
      pb.Usage(
        prompt_tokens=delta.num_prompt_tokens,
        completion_tokens=delta.num_output_tokens,
        cached_prompt_tokens=delta.num_cached_tokens,
      )
    )
    out.timing.CopyFrom(timing_proto(delta.timing))
  return out


def sampling_of(
  s: pb.SamplingParams, default_max_tokens: int = DEFAULT_MAX_TOKENS
) -> SamplingParams:
  """The engine's parameters from the request's; unset fields get their defaults."""
  try:
    return SamplingParams(
      max_tokens=s.max_tokens if s.HasField("max_tokens") else default_max_tokens,
      temperature=s.temperature,
      top_k=s.top_k,
      top_p=s.top_p if s.HasField("top_p") else 1.0,
      min_p=s.min_p,
      repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
      presence_penalty=s.presence_penalty,
      frequency_penalty=s.frequency_penalty,
      seed=s.seed if s.HasField("seed") else None,
      stop=tuple(s.stop),
      stop_token_ids=tuple(s.stop_token_ids),
      ignore_eos=s.ignore_eos,
      logprobs=s.logprobs if s.HasField("logprobs") else None,
      constraint=constraint_of(s),
    )
  except ValueError as e:  # SamplingParams' messages start with the field name
    raise InvalidArgument(f"sampling.{e}") from None


def constraint_of(s: pb.SamplingParams) -> Constraint | None:
  """The request's `constraint` oneof; None when unset (json_object: false is unset too)."""
  kind = s.WhichOneof("constraint")
  if kind is None or (kind == "json_object" and not s.json_object):
    return None
  if kind == "json_object":
    return Constraint("json_object")
  if kind == "choice":
    return Constraint("choice", tuple(s.choice.choices))
  return Constraint(kind, getattr(s, kind))


def constraint_proto(c: Constraint | None, out: pb.SamplingParams) -> None:
  """Sets `out`'s constraint oneof from `c` (the inverse of constraint_of)."""
  if c is None:
    return
  if c.kind == "json_object":
    out.json_object = True
  elif c.kind == "choice":
    out.choice.choices.extend(c.value)
  else:
    setattr(out, c.kind, c.value)


def sampling_proto(p: SamplingParams) -> pb.SamplingParams:
  """The inverse of sampling_of, for resolved parameters (a Handoff's)."""
  out = pb.SamplingParams(
    max_tokens=p.max_tokens, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
    min_p=p.min_p, repetition_penalty=p.repetition_penalty, presence_penalty=p.presence_penalty,
    frequency_penalty=p.frequency_penalty, seed=p.seed, stop=p.stop,
    stop_token_ids=p.stop_token_ids, ignore_eos=p.ignore_eos, logprobs=p.logprobs,
  )  # fmt: skip
  constraint_proto(p.constraint, out)
  return out


def timing_proto(t: RequestTiming) -> pb.Timing:
  queued, first, total = t.queued_s or 0.0, t.first_token_s or 0.0, t.finished_s or 0.0
  transfer = t.transfer_s or 0.0
  return pb.Timing(
    queue_s=queued,
    prefill_s=max(first - queued, 0.0),
    transfer_s=transfer,
    time_to_first_token_s=first,
    decode_s=max(total - first - transfer, 0.0),
    total_s=total,
  )


def _messages(messages) -> list[dict[str, str]]:
  out = []
  for i, m in enumerate(messages):
    if m.role not in CHAT_ROLES:
      raise InvalidArgument(f"messages[{i}].role: {m.role!r} is not one of {', '.join(CHAT_ROLES)}")
    check_size(m.content, f"messages[{i}].content")
    out.append({"role": m.role, "content": m.content})
  return out


def check_size(text: str, field: str = "text", limit: int = MAX_TEXT_BYTES) -> None:
  size = len(text.encode())
  if size > limit:
    raise InvalidArgument(f"{field}: {size} bytes exceed the limit of {limit}")


def _seconds(x: float | None) -> str:
  return "-" if x is None else f"{x:.3f}s"
