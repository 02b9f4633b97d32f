"""Structured-output cases the engine and server tests share, and grpcurl as users call the
server: a JSON request, through reflection alone."""

import json
import pathlib
import re
import subprocess
import sys

import jsonschema

REGEXES = [
  r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",  # a date
  r"[a-z]{1,10}@[a-z]{1,10}\.(com|org|net)",  # an email address
  r"[A-Za-z_][A-Za-z0-9_]{0,15}",  # an identifier
]
# Arithmetic expressions: numbers, + - * /, parentheses; bounded, so every output ends.
ARITHMETIC = r"""
start: expr
expr: term (("+" | "-") term){0,3}
term: factor (("*" | "/") factor){0,2}
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,3}/
"""
CHOICES = ("yes", "no", "maybe")
PERSON = {
  "type": "object",
  "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
  },
  "required": ["name", "age"],
  "additionalProperties": False,
}
PROMPT = "Answer with a short value only.\nValue: "


def arithmetic(text: str) -> bool:
  """Whether `text` is an expression of ARITHMETIC (a recursive-descent check)."""
  tokens = re.findall(r"[0-9]+|[-+*/()]", text)
  if "".join(tokens) != text:
    return False
  pos = 0

  def factor():
    nonlocal pos
    if pos < len(tokens) and tokens[pos].isdigit():
      pos += 1
      return True
    if pos < len(tokens) and tokens[pos] == "(":
      pos += 1
      if expr() and pos < len(tokens) and tokens[pos] == ")":
        pos += 1
        return True
    return False

  def chain(item, ops):
    nonlocal pos
    if not item():
      return False
    while pos < len(tokens) and tokens[pos] in ops:
      pos += 1
      if not item():
        return False
    return True

  def expr():
    return chain(lambda: chain(factor, "*/"), "+-")

  return expr() and pos == len(tokens)


def _valid_json(schema: dict):
  def check(text: str) -> bool:
    jsonschema.validate(json.loads(text), schema)
    return True

  return check


# One case per kind of the `constraint` oneof, as a JSON request sets it: (the oneof's JSON,
# the engine's Constraint arguments, whether a text is valid).
KINDS = [
  ({"json_schema": json.dumps(PERSON)}, ("json_schema", json.dumps(PERSON)), _valid_json(PERSON)),
  ({"json_object": True}, ("json_object",), lambda t: isinstance(json.loads(t), dict)),
  ({"regex": REGEXES[0]}, ("regex", REGEXES[0]), lambda t: bool(re.fullmatch(REGEXES[0], t))),
  ({"grammar": ARITHMETIC}, ("grammar", ARITHMETIC), arithmetic),
  ({"choice": {"choices": list(CHOICES)}}, ("choice", CHOICES), lambda t: t in CHOICES),
]
# Constraints that do not compile, and the start of the INVALID_ARGUMENT message each gets.
BAD = [
  ({"json_schema": "{not json"}, "sampling.constraint.json_schema: not JSON"),
  ({"json_schema": "[1, 2]"}, "sampling.constraint.json_schema: a schema is a JSON object"),
  ({"regex": "a("}, "sampling.constraint.regex: "),
  ({"grammar": "start: undefined_rule"}, "sampling.constraint.grammar: "),
  ({"choice": {"choices": []}}, "sampling.constraint.choice: give one or more"),
]

GRPCURL = pathlib.Path(sys.executable).with_name("grpcurl")  # the dev extra's static binary


def grpcurl(address: str, method: str, request: dict, timeout: float = 120.0):
  """(the JSON responses, grpcurl's stderr, its exit status) of one call, as a user makes it:
  the server's reflection tells grpcurl every message."""
  proc = subprocess.run(
      [str(GRPCURL), "-plaintext", "-max-time", f"{timeout:g}", "-d", json.dumps(request),
       address, method],
      capture_output=True, text=True, timeout=timeout + 30,
    )  # fmt: skip
  responses, decoder, text = [], json.JSONDecoder(), proc.stdout.strip()
  while text:
    value, end = decoder.raw_decode(text)
    responses.append(value)
    text = text[end:].strip()
  return responses, proc.stderr, proc.returncode
