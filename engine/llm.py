"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))`.

All prompts are queued on one `Engine` at once and run with continuous batching: requests join
the running batch as others finish, long prompts are prefilled in chunks between decode steps,
and prompts with a common prefix share its KV pages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np

from engine.config import EngineConfig
from engine.engine import Engine
from engine.output import RequestOutput
from engine.sampling import SamplingParams
from models import DEFAULT_MODEL, Model, load_model

log = logging.getLogger(__name__)

Prompt = str | Sequence[int]
Message = dict[str, str]


class LLM:
  """Loads a model once and generates text for batches of prompts."""

  def __init__(
    self,
    model: str | Model = DEFAULT_MODEL,
    config: EngineConfig | None = None,
    *,
    layout: str | None = None,
  ):
    """model: a name or path for `load_model` (placed by `layout`, e.g. "tp=4" or
    "dp=2,tp=4"), or an already loaded (and possibly sharded) Model."""
    if isinstance(model, str):
      model = load_model(model, layout=layout)
    elif layout is not None:
      raise ValueError("layout: pass it to load_model, or a model name instead of a Model")
    self.model = model
    self.tokenizer = self.model.tokenizer
    self.config = config or EngineConfig(
      max_model_len=min(2048, self.model.config.max_context // 16 * 16)
    )
    self.engine = Engine(self.model, self.config)
    self.runner = self.engine.runner
    self.last_timing: dict[str, float] = {}  # of the last generate call: seconds, steps

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
    if not len(prompts):
      raise ValueError("prompts: nothing to generate for")
    params = params or SamplingParams()
    params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(params) != len(prompts):
      raise ValueError(f"params: got {len(params)} for {len(prompts)} prompts")
    engine, index = self.engine, {}
    try:
      for i, (prompt, sp) in enumerate(zip(prompts, params, strict=True)):
        index[engine.add_request(prompt, sp)] = i
    except ValueError:
      for request_id in index:
        engine.abort(request_id)
      raise
    results: list[RequestOutput | None] = [None] * len(prompts)
    start, steps = time.perf_counter(), engine.num_steps
    while any(r is None for r in results):
      for out in engine.step():
        i = index.get(out.request_id)
        if i is None:
          continue
        if on_delta and out.new_text:
          on_delta(i, out.new_text)
        if out.finished:
          results[i] = out
    seconds, steps = time.perf_counter() - start, engine.num_steps - steps
    tokens = sum(len(r.token_ids) for r in results)
    self.last_timing = dict(seconds=seconds, steps=steps, output_tokens=tokens)
    log.info(
      "%d requests: %d output tokens in %.2fs (%d steps, %.1f tok/s)",
      len(results), tokens, seconds, steps, tokens / max(seconds, 1e-9),
    )  # fmt: skip
    return results

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
