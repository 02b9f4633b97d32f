"""What a request produces, and the front end's output processing: detokenization and stop
strings, off the engine core's thread (as vLLM v1's OutputProcessor)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from meshserve.engine.api import (  # noqa: F401 - re-exported
  FinishReason,
  RequestDelta,
  RequestTiming,
  TokenLogprob,
)
from meshserve.engine.params import SamplingParams
from meshserve.engine.request import SampledLogprobs, TokenDelta
from meshserve.models import IncrementalDetokenizer, Tokenizer


@dataclasses.dataclass
class RequestOutput:
  """A whole request: its deltas added up."""

  request_id: str
  prompt_token_ids: list[int]
  token_ids: list[int] = dataclasses.field(default_factory=list)
  text: str = ""
  finish_reason: FinishReason | None = None
  logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked
  num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
  timing: RequestTiming = RequestTiming()

  @property
  def finished(self) -> bool:
    return self.finish_reason is not None

  def add(self, delta: RequestDelta) -> None:
    self.token_ids += delta.new_token_ids
    self.text += delta.new_text
    if delta.new_logprobs is not None:
      if self.logprobs is None:
        self.logprobs = []
      self.logprobs.extend(delta.new_logprobs)
    self.finish_reason = delta.finish_reason
    self.num_cached_tokens, self.timing = delta.num_cached_tokens, delta.timing


class _StopMatcher:
  """Knuth-Morris-Pratt over one stop string: fed the text one character at a time, it knows
  the longest prefix of the stop string that the text ends with, at O(1) amortized cost per
  character, however long the text grows."""

  def __init__(self, stop: str):
    self.stop, self.matched = stop, 0
    self.fail = [0] * len(stop)  # fail[i]: the longest proper border of stop[: i + 1]
    k = 0
    for i in range(1, len(stop)):
      while k and stop[i] != stop[k]:
        k = self.fail[k - 1]
      if stop[i] == stop[k]:
        k += 1
      self.fail[i] = k

  def feed(self, char: str) -> bool:
    """Advances by one character; True when the text now ends with the whole stop string."""
    k = self.matched
    if k == len(self.stop):
      k = self.fail[k - 1]
    while k and char != self.stop[k]:
      k = self.fail[k - 1]
    if char == self.stop[k]:
      k += 1
    self.matched = k
    return k == len(self.stop)


class TextStream:
  """Detokenizes a request's tokens and cuts the text at the first stop string.

  Text that could still turn out to be the start of a stop string is held back, so a stream
  never shows part of a stop string and the final text never contains one. Each token costs
  O(its characters x stop strings): only the new text is scanned (SamplingParams bounds the
  number and length of stop strings).
  """

  def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
    self.detok = IncrementalDetokenizer(tokenizer)
    self.matchers = [_StopMatcher(s) for s in stop]
    self.text = ""  # emitted so far
    self.stopped = False
    self._scanned = 0  # characters of the detokenized text fed to the matchers

  def add(self, token_id: int) -> str:
    """Adds one token; returns the text that may now be shown."""
    self.detok.add([token_id])
    full = self.detok.text
    end = None  # where the earliest stop string that completes in the new text starts
    for i in range(self._scanned, len(full)):
      for m in self.matchers:
        if m.feed(full[i]):
          start = i + 1 - len(m.stop)
          end = start if end is None else min(end, start)
    self._scanned = len(full)
    if end is not None:
      self.stopped = True
      end = max(end, len(self.text))  # never take back text already shown
    else:
      end = len(full) - max((m.matched for m in self.matchers), default=0)
    delta, self.text = full[len(self.text) : end], full[:end]
    return delta

  def flush(self) -> str:
    """At the end of the request, held-back text that never became a stop string."""
    if self.stopped:
      return ""
    delta = self.detok.text[len(self.text) :]
    self.text = self.detok.text
    return delta


class OutputProcessor:
  """The front end's half of one request's output, as in vLLM v1: the engine core emits token
  deltas; this turns them into text and formats their logprobs (TokenLogprob), cuts the text at
  the first stop string and says when that
  ended the request (the caller then aborts it in the core, which may have run ahead a token
  or two: those are dropped here). Runs on the caller's thread, never the engine core's.

  `output_ids`: tokens already produced elsewhere (a decode stage continuing a hand-off): they
  prime the detokenizer and stop strings, and are not reported again."""

  def __init__(
    self,
    tokenizer: Tokenizer,
    params: SamplingParams,
    *,
    arrival: float | None = None,
    output_ids: Sequence[int] = (),
  ):
    self.stream = TextStream(tokenizer, params.stop)
    self.arrival = time.perf_counter() if arrival is None else arrival
    for token in output_ids:
      self.stream.add(token)
    self.num_output = len(output_ids)
    self.finished = False

  def process(self, delta: TokenDelta) -> RequestDelta | None:
    """The delta with its text, cut at a stop string; None once the request has finished here
    (what the core sent after it). `stopped` tells whether a stop string finished it."""
    if self.finished:
      return None
    ids, text = [], []
    finish = delta.finish_reason
    for i, token in enumerate(delta.new_token_ids):
      ids.append(token)
      last = i == len(delta.new_token_ids) - 1
      if last and finish == "stop":  # an EOS or stop token: its text is not shown
        text.append(self.stream.flush())
        break
      text.append(self.stream.add(token))
      if self.stream.stopped:
        finish = "stop"
        break
      if last and finish == "length":  # held-back text that never became a stop string
        text.append(self.stream.flush())
    self.num_output += len(ids)
    logprobs = None
    if delta.new_logprobs is not None:
      logprobs = list(map(token_logprob, ids, delta.new_logprobs))
    timing = delta.timing
    if finish is not None and timing.finished_s is None:  # finished here, not in the core
      timing = dataclasses.replace(timing, finished_s=time.perf_counter() - self.arrival)
    self.finished = finish is not None
    return RequestDelta(
      request_id=delta.request_id, new_token_ids=ids, new_text="".join(text),
      new_logprobs=logprobs, finish_reason=finish, num_prompt_tokens=delta.num_prompt_tokens,
      num_output_tokens=self.num_output, num_cached_tokens=delta.num_cached_tokens,
      timing=timing,
    )  # fmt: skip

  @property
  def stopped(self) -> bool:
    """A stop string ended the request: the core still runs it until aborted."""
    return self.stream.stopped


def token_logprob(token_id: int, sampled: SampledLogprobs) -> TokenLogprob:
  """One token's logprobs as a caller reads them, from the sampler's numpy rows."""
  logprob, top_ids, top_logprobs = sampled
  top = zip(top_ids.tolist(), top_logprobs.tolist(), strict=True)
  return TokenLogprob(token_id, float(logprob), tuple(top))
