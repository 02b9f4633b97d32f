"""Structured output: a request's Constraint compiled by llguidance into a matcher, which says
before each of the request's tokens which tokens may come next.

The host fills one row of a [B, ceil(V/32)] int32 bitmask per sampling row (all bits set for
an unconstrained row); the jitted sampler drops every token whose bit is clear before any
sampling rule (sampling.sample), so the mask's shape is fixed per batch bucket and nothing
recompiles. After each sampled token the engine advances the matcher. The mask lets an EOS
through only once the grammar is complete (and nothing else once it allows no more): that EOS
ends the request with "stop", its text not shown, as any EOS.

A constraint compiles on the caller's side (the offline API's thread, the async front end's
executor, bounded in time), never on the engine's thread. A decode stage rebuilds a handed-off
request's matcher the same way, from its constraint and the tokens the prefill stage chose
(`Grammars.resume`): a matcher is not carried across processes. A server builds the tokenizer
view while warming up.
"""

from __future__ import annotations

import json
import logging
import time

import llguidance
import llguidance.numpy
import numpy as np

from meshserve.engine.params import Constraint, ConstraintError

log = logging.getLogger(__name__)

Matcher = llguidance.LLMatcher

# JSON as llguidance writes it, but with at most 16 whitespace characters between tokens
# (enough to pretty-print a few levels deep): unbounded whitespace lets a sampled output run
# to max_tokens in newlines. A schema's own "x-guidance" options override these.
JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,16}"}


class Grammars:
  """One model's constraint compiler. Its llguidance view of the tokenizer (every token's
  bytes, and the EOS ids that end a complete output) is built once, here."""

  def __init__(self, tokenizer, vocab_size: int, eos_token_ids):
    start = time.perf_counter()
    self.vocab_size = vocab_size
    self.tokenizer = llguidance.LLTokenizer(
      tokenizer.hf.to_str(), n_vocab=vocab_size, eos_token=list(eos_token_ids)
    )
    log.info("structured output: tokenizer view built in %.2fs", time.perf_counter() - start)

  def matcher(self, constraint: Constraint, field: str = "constraint") -> Matcher:
    """A fresh matcher for `constraint`; ConstraintError naming `field`.<kind> and quoting
    llguidance's message where it does not compile."""
    name = f"{field}.{constraint.kind}"
    grammar = _grammar(constraint, name)
    matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
    if matcher.is_error():
      raise ConstraintError(f"{name}: {_message(matcher.get_error())}")
    return matcher

  def resume(self, constraint: Constraint, output_ids) -> Matcher:
    """A matcher that has consumed `output_ids` (a request continued elsewhere); ValueError
    naming `output_token_ids` where the constraint refuses them."""
    matcher = self.matcher(constraint)
    if output_ids and not matcher.consume_tokens(list(output_ids)):
      raise ValueError(f"output_token_ids: {_message(matcher.get_error())}")
    return matcher


_executor: llguidance.LLExecutor | None = None


def fill(bitmask: np.ndarray, rows: list[tuple[Matcher, int]]) -> None:
  """Writes each (matcher, row)'s allowed next tokens into `bitmask` [B, ceil(V/32)] int32,
  on llguidance's own thread pool where there are several."""
  global _executor
  if len(rows) == 1:
    llguidance.numpy.fill_next_token_bitmask(rows[0][0], bitmask, rows[0][1])
  elif rows:
    _executor = _executor or llguidance.LLExecutor()
    llguidance.numpy.fill_next_token_bitmask_par(_executor, rows, bitmask)


def _grammar(constraint: Constraint, name: str) -> str:
  """The llguidance grammar of a constraint (not yet checked against the tokenizer)."""
  kind, value = constraint.kind, constraint.value
  if kind == "json_schema":
    try:
      schema = json.loads(value)
    except json.JSONDecodeError as e:
      raise ConstraintError(f"{name}: not JSON: {e}") from None
    if not isinstance(schema, dict | bool):
      raise ConstraintError(f"{name}: a schema is a JSON object, got {type(schema).__name__}")
    try:
      return Matcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as e:
      raise ConstraintError(f"{name}: {_message(str(e))}") from None
  if kind == "json_object":
    return Matcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
  if kind == "regex":
    return Matcher.grammar_from_regex(value)
  if kind == "grammar":
    return Matcher.grammar_from_lark(value)
  # choice: one Lark rule of quoted literals (JSON string syntax, which Lark reads).
  literals = " | ".join(json.dumps(c, ensure_ascii=False) for c in value)
  return Matcher.grammar_from_lark(f"start: {literals}")


def _message(text: str) -> str:
  """llguidance's message, whole (it points into the grammar on the lines after the first)."""
  return text.strip() or "does not compile"
