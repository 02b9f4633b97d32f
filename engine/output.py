"""What a request produces, and the host-side text stream that honours stop strings."""

from __future__ import annotations

import dataclasses

from meshserve.engine.api import (  # noqa: F401 - re-exported
  FinishReason,
  RequestDelta,
  RequestTiming,
  TokenLogprob,
)
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
