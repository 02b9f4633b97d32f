"""Structured output: every constrained output parses and validates (jsonschema), greedy and
sampled at temperature 1; constrained and unconstrained rows share a batch without changing
each other's tokens; and nothing compiles for it."""

import json
import re

import jsonschema
import pytest
from conftest import assert_greedy_equal
from constraints import ARITHMETIC, CHOICES, PERSON, PROMPT, REGEXES, arithmetic

from meshserve.engine import LLM, Constraint, EngineConfig, SamplingParams


def _shape(kind: str, size: str) -> dict:
  """One alternative of a tagged union: {"kind": kind, size: 1..9}."""
  digit = {"type": "integer", "minimum": 1, "maximum": 9}
  return {
    "type": "object",
    "properties": {"kind": {"const": kind}, size: digit},
    "required": ["kind", size],
    "additionalProperties": False,
  }


SCHEMAS = [
  # objects: required fields, closed and open, nested three deep
  PERSON,
  {
    "type": "object",
    "properties": {
      "user": {
        "type": "object",
        "properties": {
          "id": {"type": "integer", "minimum": 1, "maximum": 9999},
          "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org)$"},
        },
        "required": ["id", "email"],
        "additionalProperties": False,
      },
      "active": {"type": "boolean"},
    },
    "required": ["user", "active"],
    "additionalProperties": False,
  },
  {
    "type": "object",
    "properties": {
      "a": {
        "type": "object",
        "properties": {
          "b": {
            "type": "object",
            "properties": {"c": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["c"],
            "additionalProperties": False,
          }
        },
        "required": ["b"],
        "additionalProperties": False,
      }
    },
    "required": ["a"],
    "additionalProperties": False,
  },  # fmt: skip
  {
    "type": "object",
    "properties": {
      "id": {"type": "integer", "minimum": 0, "maximum": 100},
      "note": {"type": "string", "maxLength": 10},
      "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
    },
    "required": ["id"],
    "additionalProperties": False,
  },
  # arrays with bounds
  {
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "maximum": 9},
    "minItems": 1,
    "maxItems": 4,
  },
  {
    "type": "array",
    "items": {
      "type": "object",
      "properties": {
        "x": {"type": "integer", "minimum": -9, "maximum": 9},
        "y": {"type": "integer", "minimum": -9, "maximum": 9},
      },
      "required": ["x", "y"],
      "additionalProperties": False,
    },
    "minItems": 1,
    "maxItems": 3,
  },
  {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 2},
  {"type": "array", "items": {"enum": ["x", "y", "z"]}, "minItems": 2, "maxItems": 3},
  # enums and constants
  {"type": "string", "enum": ["red", "green", "blue"]},
  {"const": "ok"},
  {
    "type": "object",
    "properties": {
      "status": {"enum": ["open", "closed", "pending"]},
      "priority": {"type": "integer", "enum": [1, 2, 3]},
    },
    "required": ["status", "priority"],
    "additionalProperties": False,
  },
  # anyOf
  {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "integer", "minimum": 0, "maximum": 99}]},
  {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": -5, "maximum": 5}]},
  {"anyOf": [_shape("circle", "r"), _shape("square", "side")]},
  # string patterns
  {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
  {"type": "string", "pattern": "^[A-Z][a-z]{2,6}$"},
  # numbers with ranges (a float's digits bounded by multipleOf: a JSON number may otherwise
  # run on, and at temperature 1 a small model's do; binary fractions, which jsonschema's
  # float arithmetic checks exactly)
  {"type": "integer", "minimum": -50, "maximum": 50},
  {"type": "number", "minimum": 0, "maximum": 100, "multipleOf": 0.25},
  {
    "type": "object",
    "properties": {
      "lat": {"type": "number", "minimum": -90, "maximum": 90, "multipleOf": 0.5},
      "lon": {"type": "number", "minimum": -180, "maximum": 180, "multipleOf": 0.25},
    },
    "required": ["lat", "lon"],
    "additionalProperties": False,
  },
  # references
  {
    "$defs": {
      "point": {
        "type": "object",
        "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["x"],
        "additionalProperties": False,
      }
    },
    "type": "object",
    "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
    "required": ["from", "to"],
    "additionalProperties": False,
  },
]

SAMPLES = 8  # seeded samples at temperature 1, besides the greedy run


@pytest.fixture(scope="module")
def llm(model):
  return LLM(model, EngineConfig(num_pages=512, max_model_len=512, max_batch=64))


def _runs(constraint: Constraint, samples: int, max_tokens: int = 160) -> list[SamplingParams]:
  greedy = SamplingParams(max_tokens=max_tokens, constraint=constraint)
  sampled = [
    SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=s, constraint=constraint)
    for s in range(samples)
  ]
  return [greedy, *sampled]


@pytest.mark.parametrize("samples", [0, pytest.param(SAMPLES, marks=pytest.mark.slow)])
def test_every_output_parses_and_validates(llm, samples):
  """20 JSON Schemas, 3 regexes, an arithmetic grammar and a choice, greedy (and in the slow
  case 8 seeded samples at temperature 1 each), in batches of up to 64: every output is whole
  and valid. Any JSON object, greedy only: its keys and strings have no bound, and sampled at
  temperature 1 the default model's run past any max_tokens."""
  cases = [("schema", s, Constraint("json_schema", json.dumps(s))) for s in SCHEMAS]
  cases += [("regex", r, Constraint("regex", r)) for r in REGEXES]
  cases += [("grammar", None, Constraint("grammar", ARITHMETIC))]
  cases += [("choice", None, Constraint("choice", CHOICES))]
  runs = [(kind, spec, p) for kind, spec, c in cases for p in _runs(c, samples)]
  any_object = SamplingParams(max_tokens=160, constraint=Constraint("json_object"))
  runs.append(("object", None, any_object))
  outs = llm.generate([PROMPT] * len(runs), [p for _, _, p in runs])
  assert llm.engine.allocator.num_free == llm.config.num_pages - 1
  for (kind, spec, params), out in zip(runs, outs, strict=True):
    text = out.text
    assert out.finish_reason == "stop", (params, text)
    if kind == "schema":
      jsonschema.validate(json.loads(text), spec)
    elif kind == "object":
      assert isinstance(json.loads(text), dict), text
    elif kind == "regex":
      assert re.fullmatch(spec, text), (spec, text)
    elif kind == "grammar":
      assert arithmetic(text), text
    else:
      assert text in CHOICES, text


@pytest.mark.slow  # default: greedy outputs of every kind validated, in one batch
def test_constrained_and_free_rows_share_a_batch_unchanged(llm, model):
  """64 rows, half constrained: the free rows give what they give in a batch with no
  constraint; the constrained rows what they give alone. Greedy and seeded alike; and running
  the mixed batch again compiles nothing and gives the same tokens."""
  ids = model.tokenizer.encode("The weather report for the coast says that tomorrow will be")
  prompts = [ids[: 4 + i % 9] for i in range(32)]
  schema = Constraint("json_schema", json.dumps(SCHEMAS[0]))
  constraints = [schema, Constraint("regex", REGEXES[0]), Constraint("choice", CHOICES)]

  def params(i, constraint=None):
    if i % 2:
      return SamplingParams(max_tokens=16, ignore_eos=True, constraint=constraint)
    return SamplingParams(  # no top-p: its sort costs ~10 ms a row on this CPU
      max_tokens=16, temperature=0.9, seed=i, ignore_eos=True, constraint=constraint
    )

  free = [params(i) for i in range(32)]
  bound = [params(i, constraints[i % 3]) for i in range(32)]
  unconstrained = llm.generate(prompts + prompts, free + free)[:32]
  mixed = llm.generate(prompts + prompts, free + bound)
  compiles = llm.runner.num_compiles
  again = llm.generate(prompts + prompts, free + bound)
  assert llm.runner.num_compiles == compiles
  assert [o.token_ids for o in again] == [o.token_ids for o in mixed]
  for i, (prompt, got, want) in enumerate(zip(prompts, mixed[:32], unconstrained, strict=True)):
    if i % 2:
      assert_greedy_equal(model, prompt, want.token_ids, got.token_ids)
    else:
      assert got.token_ids == want.token_ids
  for i in range(0, 32, 5):  # alone, one at a time: every kind, greedy and seeded
    alone = llm.generate(prompts[i], bound[i])[0]
    if i % 2:
      assert_greedy_equal(model, prompts[i], alone.token_ids, mixed[32 + i].token_ids)
    else:
      assert mixed[32 + i].token_ids == alone.token_ids


@pytest.mark.slow  # a minute: two engines, 8 requests each run alone too
def test_preemption_and_the_prefix_cache_keep_each_matcher(model):
  """8 seeded constrained requests sharing a 32-token prefix grow to 7 pages each in a pool of
  24: some are preempted and recomputed (their matchers keep what they consumed), prefix-cache
  pages are reused, and each output is valid and exactly what it is alone."""
  shared = model.tokenizer.encode("The weather report for the coast says that tomorrow " * 4)[:32]
  prompts = [shared + model.tokenizer.encode(f" Row {i}, twelve numbers:") for i in range(8)]
  numbers = {
    "type": "array",
    "items": {"type": "integer", "minimum": 100, "maximum": 999},
    "minItems": 12,
    "maxItems": 12,
  }
  constraint = Constraint("json_schema", json.dumps(numbers))
  params = [
    SamplingParams(max_tokens=96, temperature=1.0, seed=i, constraint=constraint) for i in range(8)
  ]
  llm = LLM(model, EngineConfig(num_pages=25, max_model_len=160, max_batch=8))
  outs = llm.generate(prompts, params)
  stats = llm.engine.stats()
  assert stats["preemptions"] > 0 and stats["cached_tokens"] > 0, stats
  assert stats["free_pages"] == stats["total_pages"]
  alone = LLM(model, EngineConfig(num_pages=16, max_model_len=160, max_batch=1))
  for prompt, p, out in zip(prompts, params, outs, strict=True):
    assert out.finish_reason == "stop", out.text
    jsonschema.validate(json.loads(out.text), numbers)
    assert out.token_ids == alone.generate(prompt, p)[0].token_ids


@pytest.mark.parametrize(
  ("constraint", "message"),
  [
    (Constraint("json_schema", "{not json"), "constraint.json_schema: not JSON"),
    (Constraint("json_schema", "[1, 2]"), "constraint.json_schema: a schema is a JSON object"),
    (Constraint("regex", "a("), "constraint.regex: "),
    (Constraint("grammar", "start: undefined_rule"), "constraint.grammar: "),
  ],
)
def test_a_constraint_that_does_not_compile_is_refused_by_field(llm, constraint, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    llm.generate("x", SamplingParams(constraint=constraint))
  assert llm.engine.allocator.num_free == llm.config.num_pages - 1


def test_a_malformed_constraint_is_refused_by_field():
  for kwargs, message in [
    (dict(kind="xml"), "constraint: kind 'xml'"),
    (dict(kind="regex"), "constraint.regex: a regular expression"),
    (dict(kind="choice", value=()), "constraint.choice: give one or more"),
    (dict(kind="json_object", value="{}"), "constraint.json_object: takes no value"),
  ]:
    with pytest.raises(ValueError, match=re.escape(message)):
      Constraint(**kwargs)


def test_the_async_front_end_compiles_off_the_engine_thread_within_a_time_bound(model, monkeypatch):
  """A stream's constraint compiles on an executor thread, not the core's; one that takes too
  long is refused by field, and the engine goes on serving."""
  import asyncio
  import threading
  import time

  from meshserve.engine import AsyncEngine, Engine
  from meshserve.engine import async_engine as front

  engine = AsyncEngine(Engine(model, EngineConfig(num_pages=64, max_model_len=256, max_batch=4)))
  compiled_on = []
  constrain = engine.engine.constrain

  def spy(params, output_ids=()):
    compiled_on.append(threading.current_thread().name)
    if params.constraint.kind == "regex":
      time.sleep(3.0)  # a compile that takes too long
    return constrain(params, output_ids)

  monkeypatch.setattr(engine.engine, "constrain", spy)
  monkeypatch.setattr(front, "CONSTRAINT_COMPILE_TIMEOUT", 1.0)

  async def text(constraint):
    params = SamplingParams(max_tokens=40, constraint=constraint)
    return "".join([d.new_text async for d in engine.generate("Colour: ", params)])

  try:
    assert asyncio.run(text(Constraint("choice", CHOICES))) in CHOICES
    with pytest.raises(ValueError, match=r"constraint\.regex: did not compile within 1s"):
      asyncio.run(text(Constraint("regex", "[a-z]+")))
    assert asyncio.run(text(Constraint("choice", CHOICES))) in CHOICES
  finally:
    engine.shutdown(30)
  assert compiled_on and "meshserve-engine-core" not in compiled_on
  assert compiled_on[0] != threading.main_thread().name


@pytest.mark.slow
def test_the_benchmark_prints_its_table(capsys):
  """scripts/bench_structured.py, tiny: both ways at two concurrencies, one row each."""
  import importlib.util
  import pathlib
  import sys

  scripts = pathlib.Path(__file__).parents[1] / "scripts"
  sys.path.insert(0, str(scripts))
  try:
    spec = importlib.util.spec_from_file_location(
      "bench_structured", scripts / "bench_structured.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    fill, append = bench.structured.fill, bench.Engine._append
    try:
      bench.main(["--concurrency", "1", "4", "--output-len", "6", "--rounds", "1"])
    finally:  # it times them by wrapping
      bench.structured.fill, bench.Engine._append = fill, append
  finally:
    sys.path.remove(str(scripts))
  rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()]
  rows = [[c.strip() for c in r] for r in rows if r and r[0].strip().isdigit()]
  assert [(r[0], r[1]) for r in rows] == [
    ("1", "free"),
    ("1", "json_schema"),
    ("4", "free"),
    ("4", "json_schema"),
  ]
  for r in rows:
    assert float(r[2]) > 0 and float(r[4]) > 0
    assert (float(r[5]) > 0) == (r[1] == "json_schema")  # mask fill: constrained rows only
