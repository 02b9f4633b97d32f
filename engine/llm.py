"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))`.

Requests are batched statically: a group of prompts is prefilled together and decoded together
until every member finishes. Each sequence owns a contiguous run of pages in the pool; page 0
is never handed out (padding tokens write there).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import time
from collections.abc import Callable, Sequence

import numpy as np

from engine.output import RequestOutput, TextStream
from engine.runner import EngineConfig, Runner, bucket
from engine.sampling import SamplingBatch, SamplingParams
from models import DEFAULT_MODEL, Model, load_model

log = logging.getLogger(__name__)

Prompt = str | Sequence[int]
Message = dict[str, str]


@dataclasses.dataclass
class _Request:
  prompt_ids: list[int]
  params: SamplingParams
  seed: int
  stream: TextStream
  output: list[int] = dataclasses.field(default_factory=list)
  finish_reason: str | None = None


class LLM:
  """Loads a model once and generates text for batches of prompts."""

  def __init__(self, model: str | Model = DEFAULT_MODEL, config: EngineConfig | None = None):
    self.model = load_model(model) if isinstance(model, str) else model
    self.tokenizer = self.model.tokenizer
    self.config = config or EngineConfig(
      max_model_len=min(2048, self.model.config.max_context // 16 * 16)
    )
    self.runner = Runner(self.model, self.config)
    self.last_timing: dict[str, float] = {}  # of the last batch run: prefill_s, decode_s, steps

  def generate(
    self,
    prompts: Prompt | Sequence[Prompt],
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    on_delta: Callable[[int, str], None] | None = None,
  ) -> list[RequestOutput]:
    """Completes each prompt (text, or token ids). `on_delta(i, text)` streams prompt i's text
    as it is produced."""
    if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], int | np.integer)):
      prompts = [prompts]
    if not prompts:
      raise ValueError("prompts: nothing to generate for")
    params = params or SamplingParams()
    params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(params) != len(prompts):
      raise ValueError(f"params: got {len(params)} for {len(prompts)} prompts")
    requests = [self._make_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    on_delta = on_delta or (lambda i, text: None)
    for start in range(0, len(requests), self.config.max_batch):
      group = requests[start : start + self.config.max_batch]
      self._run_group(group, lambda i, text, s=start: on_delta(s + i, text))
    return [RequestOutput(r.prompt_ids, r.output, r.stream.text, r.finish_reason) for r in requests]

  def chat(
    self,
    conversations: Sequence[Message] | Sequence[Sequence[Message]],
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    on_delta: Callable[[int, str], None] | None = None,
  ) -> list[RequestOutput]:
    """Applies the model's chat template to each conversation, then generates."""
    if conversations and isinstance(conversations[0], dict):
      conversations = [conversations]
    template = self.tokenizer.apply_chat_template
    ids = [self.tokenizer.encode(template(c, add_generation_prompt=True)) for c in conversations]
    return self.generate(ids, params, on_delta)

  def _make_request(self, prompt: Prompt, params: SamplingParams) -> _Request:
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
    seed = params.seed if params.seed is not None else secrets.randbits(31)
    return _Request(ids, params, seed, TextStream(self.tokenizer, params.stop))

  def _run_group(self, group: list[_Request], on_delta: Callable[[int, str], None]) -> None:
    cfg, runner = self.config, self.runner
    B = bucket(len(group), cfg.batch_buckets)
    T = bucket(max(len(r.prompt_ids) for r in group), cfg.prefill_buckets)
    longest = max(min(len(r.prompt_ids) + r.params.max_tokens, cfg.max_model_len) for r in group)
    P = bucket(math.ceil(longest / cfg.page_size), cfg.page_buckets)
    pages_needed, allocatable = B * P, cfg.num_pages - 1  # page 0 is the padding sink
    if pages_needed > allocatable:  # the pool cannot hold the whole group: split it
      half = len(group) // 2
      if half == 0:
        raise ValueError(f"a request needs {P} pages but the pool has {cfg.num_pages}")
      self._run_group(group[:half], on_delta)
      self._run_group(group[half:], lambda i, text: on_delta(i + half, text))
      return

    page_table = np.arange(1, B * P + 1, dtype=np.int32).reshape(B, P)  # page 0 is the sink
    sampling = SamplingBatch.build([r.params for r in group], [r.seed for r in group], B)
    lens = np.array([len(r.prompt_ids) for r in group] + [1] * (B - len(group)), np.int32)
    tokens = np.zeros((B, T), np.int32)
    positions = np.full((B, T), -1, np.int32)
    for i, r in enumerate(group):
      tokens[i, : lens[i]] = r.prompt_ids
      positions[i, : lens[i]] = np.arange(lens[i])

    start = time.perf_counter()
    next_tokens = runner.step(
      tokens, positions, page_table, lens - 1, sampling, np.zeros(B, np.int32)
    )
    prefill_s, decode_start, steps = time.perf_counter() - start, time.perf_counter(), 0
    while self._update(group, next_tokens, on_delta):
      live = np.array([r.finish_reason is None for r in group] + [False] * (B - len(group)))
      num_out = np.array([len(r.output) for r in group] + [0] * (B - len(group)), np.int32)
      # Feed each live row its newest token, at the position after everything cached so far.
      positions = np.where(live, lens + num_out - 1, -1).astype(np.int32)[:, None]
      next_tokens = runner.step(
        next_tokens[:, None], positions, page_table, np.zeros(B, np.int32), sampling, num_out
      )
      steps += 1
    decode_s = time.perf_counter() - decode_start
    self.last_timing = dict(prefill_s=prefill_s, decode_s=decode_s, steps=steps)
    log.info(
      "batch of %d: prefill %.2fs (%d tokens), decode %.2fs (%d steps, %.1f tok/s)",
      len(group), prefill_s, int(lens[: len(group)].sum()), decode_s, steps,
      sum(len(r.output) for r in group) / max(decode_s, 1e-9),
    )  # fmt: skip

  def _update(self, group: list[_Request], next_tokens: np.ndarray, on_delta) -> bool:
    """Appends the sampled tokens and settles finished requests; True while any is live."""
    eos = set(self.model.config.eos_token_ids)
    any_live = False
    for i, r in enumerate(group):
      if r.finish_reason is not None:
        continue
      token = int(next_tokens[i])
      r.output.append(token)
      if token in eos and not r.params.ignore_eos:
        r.finish_reason = "stop"
      else:
        delta = r.stream.add(token)
        if delta:
          on_delta(i, delta)
        if r.stream.stopped:
          r.finish_reason = "stop"
        elif (
          len(r.output) >= r.params.max_tokens
          or len(r.prompt_ids) + len(r.output) >= self.config.max_model_len
        ):
          r.finish_reason = "length"
      if r.finish_reason is not None:
        tail = r.stream.flush()
        if tail:
          on_delta(i, tail)
      any_live |= r.finish_reason is None
    return any_live
