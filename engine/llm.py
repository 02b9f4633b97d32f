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

from meshserve.engine.config import EngineConfig
from meshserve.engine.engine import Engine
from meshserve.engine.output import OutputProcessor, RequestOutput
from meshserve.engine.sampling import SamplingParams
from meshserve.models import DEFAULT_MODEL, Model, load_model

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
    engine, results, outputs = self.engine, {}, {}
    try:
      for prompt, sp in zip(prompts, params, strict=True):
        # A text prompt gets BOS where the tokenizer's metadata asks for it, as HF does.
        ids = (
          self.tokenizer.encode(prompt, add_special_tokens=True)
          if isinstance(prompt, str)
          else list(prompt)
        )
        request_id = engine.add_request(ids, sp)
        results[request_id] = RequestOutput(request_id, [int(t) for t in ids])
        outputs[request_id] = OutputProcessor(self.tokenizer, sp)
    except ValueError:
      for request_id in results:
        engine.abort(request_id)
      raise
    order = {request_id: i for i, request_id in enumerate(results)}
    start, steps, unfinished = time.perf_counter(), engine.num_steps, len(results)
    while unfinished:
      for core_delta in engine.step():
        out = results.get(core_delta.request_id)
        if out is None or (delta := outputs[core_delta.request_id].process(core_delta)) is None:
          continue
        if delta.finished and not core_delta.finished:  # a stop string: the core stops too
          engine.abort(delta.request_id)
        out.add(delta)
        if on_delta and delta.new_text:
          on_delta(order[delta.request_id], delta.new_text)
        unfinished -= delta.finished
    results = list(results.values())
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
