"""A request's sampling parameters, checked on construction (ValueError names the field), and
the bounds the server reports in GetModelInfo. Plain data: no JAX."""

from __future__ import annotations

import dataclasses

MAX_LOGPROBS = 20  # the most alternatives a request may ask logprobs for
# Bounds on a request's stop conditions, so one request's cost per token stays small for the
# engine thread that serves every request (GetModelInfo reports them).
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_CONSTRAINT_CHARS = 64 * 1024  # a schema, regex or grammar's text; all choices together
MAX_CHOICES = 256

# What a constraint's `value` is, per kind (engine/structured.py compiles each with llguidance).
CONSTRAINT_KINDS = {
  "json_schema": "a JSON Schema, as JSON text",
  "json_object": "nothing (any JSON object)",
  "regex": "a regular expression the whole output matches",
  "grammar": "a Lark grammar, as llguidance reads it",
  "choice": "a list of strings, one of which is the whole output",
}


class ConstraintError(ValueError):
  """A constraint that did not compile (or not in time). Its message starts with the field
  relative to the sampling parameters, `constraint.<kind>`, and quotes the library's."""


@dataclasses.dataclass(frozen=True, slots=True)
class Constraint:
  """What the output must be (structured output). `kind` is one of CONSTRAINT_KINDS; `value`
  the schema, regex or grammar text, or for "choice" a tuple of strings. Checked here for shape;
  whether it compiles is the engine's to say (Engine.constrain), with the library's message."""

  kind: str
  value: str | tuple[str, ...] = ""

  def __post_init__(self):
    if self.kind not in CONSTRAINT_KINDS:
      raise ValueError(
        f"constraint: kind {self.kind!r} is not one of {', '.join(CONSTRAINT_KINDS)}"
      )
    field = f"constraint.{self.kind}"
    if self.kind == "choice":
      value = (self.value,) if isinstance(self.value, str) else tuple(self.value)
      object.__setattr__(self, "value", value)
      if not value or any(not isinstance(c, str) or not c for c in value):
        raise ValueError(f"{field}: give one or more non-empty strings")
      if len(value) > MAX_CHOICES:
        raise ValueError(f"{field}: {len(value)} choices, at most {MAX_CHOICES}")
      size = sum(map(len, value))
    elif self.kind == "json_object":
      if self.value:
        raise ValueError(f"{field}: takes no value")
      size = 0
    else:
      if not isinstance(self.value, str) or not self.value.strip():
        raise ValueError(f"{field}: {CONSTRAINT_KINDS[self.kind]} is required")
      size = len(self.value)
    if size > MAX_CONSTRAINT_CHARS:
      raise ValueError(f"{field}: {size} characters, at most {MAX_CONSTRAINT_CHARS}")


@dataclasses.dataclass(frozen=True, slots=True)
class SamplingParams:
  """How to pick tokens for one request. temperature 0 means greedy."""

  max_tokens: int = 64
  temperature: float = 0.0
  top_k: int = 0  # 0 = no limit
  top_p: float = 1.0
  min_p: float = 0.0  # drop tokens less likely than min_p * the likeliest one's probability
  repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and output (HF style)
  presence_penalty: float = 0.0  # subtracted once from each token already in the output
  frequency_penalty: float = 0.0  # subtracted per occurrence in the output
  seed: int | None = None  # None: the engine draws one from EngineConfig.seed, in arrival order
  stop: tuple[str, ...] = ()
  stop_token_ids: tuple[int, ...] = ()
  ignore_eos: bool = False
  logprobs: int | None = None  # None: none; n: the chosen token's and the top-n alternatives'
  # of the model's own distribution, before any constraint's mask (as vLLM's default)
  constraint: Constraint | None = None  # structured output: what the whole output must be

  def __post_init__(self):
    for name in ("stop", "stop_token_ids"):
      value = getattr(self, name)
      object.__setattr__(self, name, (value,) if isinstance(value, str | int) else tuple(value))
    if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
      raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
    if not self.temperature >= 0.0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"top_k must be a non-negative integer, got {self.top_k!r}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
    if not 0.0 <= self.min_p <= 1.0:
      raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
    if not self.repetition_penalty > 0.0:
      raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
    for name in ("presence_penalty", "frequency_penalty"):
      if not -2.0 <= getattr(self, name) <= 2.0:
        raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
    if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**32):
      raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
    if len(self.stop) > MAX_STOP_STRINGS:
      raise ValueError(f"stop: {len(self.stop)} stop strings, at most {MAX_STOP_STRINGS}")
    if any(not isinstance(s, str) or not s for s in self.stop):
      raise ValueError("stop: stop strings must be non-empty")
    if (longest := max(map(len, self.stop), default=0)) > MAX_STOP_STRING_CHARS:
      raise ValueError(
        f"stop: a stop string of {longest} characters, at most {MAX_STOP_STRING_CHARS}"
      )
    if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
      raise ValueError(
        f"stop_token_ids: {len(self.stop_token_ids)} ids, at most {MAX_STOP_TOKEN_IDS}"
      )
    if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
      raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids}")
    if self.logprobs is not None and not (
      isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS
    ):
      raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
    if self.constraint is not None and not isinstance(self.constraint, Constraint):
      raise ValueError(f"constraint must be a Constraint, got {type(self.constraint).__name__}")

  @property
  def penalized(self) -> bool:
    return (
      self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0
    )


@dataclasses.dataclass(frozen=True, slots=True)
class RequestLimits:
  """What an engine accepts of a request beyond its parameters' own bounds: the one check every
  entry point runs (the offline API, the async front end, the server, a hand-off's landing)."""

  vocab_size: int
  max_model_len: int

  def room(self, prompt_len: int) -> int:
    """How many tokens a prompt of `prompt_len` leaves to generate."""
    return self.max_model_len - prompt_len

  def check(
    self,
    token_ids,
    params: SamplingParams,
    *,
    prompt: str = "prompt",
    sampling: str = "",
    max_tokens_fit: bool = False,
  ) -> None:
    """Raises ValueError naming the field: `prompt` is the prompt's field and `sampling` the
    prefix of the parameters' ("sampling." in a gRPC request). max_tokens_fit: max_tokens beyond
    the context's room is an error (the server's rule, for parameters the caller set); else
    generation stops at max_model_len with finish "length" (the offline API's)."""
    if len(token_ids) == 0:
      raise ValueError(f"{prompt}: the prompt is empty")
    if min(token_ids) < 0 or max(token_ids) >= self.vocab_size:
      raise ValueError(f"{prompt}: ids must lie in [0, {self.vocab_size})")
    room = self.room(len(token_ids))
    if room <= 0:
      raise ValueError(
        f"{prompt}: {len(token_ids)} tokens leave no room to generate within max_model_len "
        f"{self.max_model_len}"
      )
    if any(t >= self.vocab_size for t in params.stop_token_ids):
      raise ValueError(f"{sampling}stop_token_ids: ids must lie in [0, {self.vocab_size})")
    if max_tokens_fit and params.max_tokens > room:
      raise ValueError(
        f"{sampling}max_tokens: {prompt} ({len(token_ids)} tokens) plus {params.max_tokens} "
        f"tokens exceed max_model_len {self.max_model_len}"
      )
