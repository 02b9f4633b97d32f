"""Prefill and decode as separate stages in one process (DisaggregatedEngine): the same tokens
as the colocated engine, and no page lost on either side whatever callers do."""

import asyncio
import dataclasses
import random
import threading

import jax
import jax.numpy as jnp
import pytest
from constraints import KINDS, PROMPT

from meshserve.engine import (
  Constraint,
  Engine,
  EngineConfig,
  RequestIdInUseError,
  SamplingParams,
)
from meshserve.engine.disaggregated import DisaggregatedEngine
from meshserve.engine.handoff import Handoff
from meshserve.engine.request import RequestState
from tests.conftest import assert_equal_until_a_near_tie, assert_greedy_equal, penalized_greedy

CONFIG = EngineConfig(num_pages=64, max_model_len=128, max_batch=4, max_num_batched_tokens=32)


@pytest.fixture
def make(stage_models):
  engines = []

  def make(prefill=CONFIG, decode=CONFIG, **kw) -> DisaggregatedEngine:
    p, d = stage_models
    engine = DisaggregatedEngine(
      Engine(p, prefill, role="prefill"), Engine(d, decode, role="decode"), **kw
    )
    engines.append(engine)
    return engine

  yield make
  for engine in engines:
    engine.shutdown(30)


async def collect(stream) -> tuple[list[int], object]:
  ids, last = [], None
  async for delta in stream:
    ids += delta.new_token_ids
    last = delta
  return ids, last


async def every_page_back(engine: DisaggregatedEngine) -> dict[str, dict]:
  """Each stage's counters (open and reserved included) once every page is back."""
  for _ in range(300):  # bounded: 15 s
    stages = {"prefill": engine.prefill.stats(), "decode": engine.decode.stats()}
    if all(
      s["free_pages"] == s["total_pages"]
      and s["open"] == s["pinned"] == s["reserved"] == 0
      and s["importing"] == 0
      for s in stages.values()
    ):
      return stages
    await asyncio.sleep(0.05)
  pytest.fail(f"pages not returned: {[engine.prefill.stats(), engine.decode.stats()]}")


def test_greedy_and_seeded_tokens_equal_the_colocated_engine(make, llm, model, golden):
  engine = make()
  cases = [golden.case(i) for i in (0, golden.chat_cases()[0])]  # all of them: over gRPC
  seeded = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=7)
  prompts = [list(map(int, c["ids"])) for c in cases]
  greedy = [SamplingParams(max_tokens=len(c["greedy"]), ignore_eos=True) for c in cases]

  async def main():
    runs = [engine.generate(p, g) for p, g in zip(prompts, greedy, strict=True)]
    runs += [engine.generate(p, seeded) for p in prompts]
    return await asyncio.gather(*map(collect, runs))

  results = asyncio.run(main())
  want_seeded = llm.generate(prompts, seeded)
  for i, c in enumerate(cases):
    ids, last = results[i]
    assert_greedy_equal(model, prompts[i], list(map(int, c["greedy"])), ids)
    assert last.timing.transfer_s is not None and last.timing.transfer_s >= 0
    assert last.num_output_tokens == len(ids)
    assert results[len(cases) + i][0] == want_seeded[i].token_ids
  stages = asyncio.run(every_page_back(engine))
  assert stages["decode"]["kv_transfers"] == 2 * len(cases)
  assert stages["decode"]["kv_transfer_bytes"] > 0


def test_text_and_stop_strings_carry_across_the_hand_off(make, llm):
  engine = make()
  params = SamplingParams(max_tokens=40, stop=("Paris",))  # the stop string may begin at token 1
  prompt = "Question: What is the capital of France? Answer: The capital of France is"

  async def main():
    text = ""
    async for delta in engine.generate(prompt, params):
      text += delta.new_text
      last = delta
    return text, last.finish_reason

  want = llm.generate(prompt, params)[0]
  assert asyncio.run(main()) == (want.text, want.finish_reason)


def test_a_request_the_first_token_finishes_never_reaches_decode(make):
  engine = make()
  ids, last = asyncio.run(collect(engine.generate("Hello", SamplingParams(max_tokens=1))))
  assert len(ids) == 1 and last.finish_reason == "length" and last.timing.transfer_s is None
  stages = dict(asyncio.run(every_page_back(engine)))
  assert stages["decode"]["kv_transfers"] == 0


def test_penalties_count_the_prompt_after_the_hand_off(make, model):
  """The decode stage writes a handed-off prompt's tokens beside its KV, so a penalized
  request decodes there as a numpy reference does, the prompt's tokens penalized too."""
  engine = make()
  prompt = model.tokenizer.encode("The cat sat on the mat, and the cat sat on the mat again. The")
  params = SamplingParams(
    max_tokens=16, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3,
    ignore_eos=True,
  )  # fmt: skip
  ids, _ = asyncio.run(collect(engine.generate(prompt, params)))
  [(want, margins)] = penalized_greedy(model, [prompt], params, 16)
  assert_equal_until_a_near_tie(want, margins, ids)


def test_every_constraint_kind_crosses_the_hand_off(make, monkeypatch):
  """The prefill stage picks the first token under the constraint; the decode stage's front
  end rebuilds the matcher from it, on an executor thread (never a core's), so the whole
  output is valid and ends with "stop"."""
  config = dataclasses.replace(CONFIG, max_model_len=256)
  engine = make(config, config)
  compiled_on = []
  for stage in (engine.prefill.engine, engine.decode.engine):
    constrain = stage.constrain

    def spy(params, output_ids=(), constrain=constrain):
      compiled_on.append((threading.current_thread().name, len(output_ids)))
      return constrain(params, output_ids)

    monkeypatch.setattr(stage, "constrain", spy)

  async def text(params):
    out = [d async for d in engine.generate(PROMPT, params)]
    return "".join(d.new_text for d in out), out[-1]

  async def main():
    runs = [SamplingParams(max_tokens=160, constraint=Constraint(*args)) for _, args, _ in KINDS]
    return await asyncio.gather(*map(text, runs))

  for (oneof, _, valid), (got, last) in zip(KINDS, asyncio.run(main()), strict=True):
    assert last.finish_reason == "stop" and valid(got), (oneof, got)
  assert sorted(n for _, n in compiled_on) == [0] * len(KINDS) + [1] * len(KINDS)
  assert all(not name.startswith("meshserve-engine-core") for name, _ in compiled_on)
  asyncio.run(every_page_back(engine))


def test_a_small_decode_pool_makes_imports_wait_and_preempts_yet_every_output_is_right(make, llm):
  """A decode pool far too small for the batch: imports wait (their KV pinned on the prefill
  side) until pages free up, running requests are preempted and recomputed on the decode
  stage, and every request still gives its colocated tokens."""
  decode = EngineConfig(num_pages=12, max_model_len=128, max_batch=4, max_num_batched_tokens=32)
  engine = make(decode=decode)
  params = SamplingParams(max_tokens=40, ignore_eos=True)  # 4 pages each; 11 in the pool
  prompts = [f"Story number {i}: once upon a time" for i in range(4)]

  async def main():
    return await asyncio.gather(*(collect(engine.generate(p, params)) for p in prompts))

  results = asyncio.run(main())
  for (ids, _), want in zip(results, llm.generate(prompts, params), strict=True):
    assert ids == want.token_ids
  stages = dict(asyncio.run(every_page_back(engine)))
  assert stages["decode"]["preemptions"] > 0


def test_a_client_id_stays_taken_across_both_stages(make):
  engine = make()

  async def main():
    stream = engine.generate("Count to ten:", SamplingParams(max_tokens=30), "same")
    await anext(stream)  # the first token: the request is moving to the decode stage
    with pytest.raises(RequestIdInUseError, match="request_id"):
      await anext(engine.generate("Other", SamplingParams(max_tokens=4), "same"))
    await collect(stream)
    await collect(engine.generate("Other", SamplingParams(max_tokens=4), "same"))

  asyncio.run(main())
  asyncio.run(every_page_back(engine))


def test_abort_between_or_in_the_stages_ends_the_stream_and_frees_both(make):
  """`abort` after the first token (the request on its way to, or in, the decode stage) ends
  the stream with finish_reason "abort", and both stages get every page back."""
  engine = make()

  async def main():
    stream = engine.generate("Count to ten:", SamplingParams(max_tokens=30, ignore_eos=True), "a")
    first = await anext(stream)
    assert await engine.abort("a")
    rest = [d async for d in stream]
    assert not await engine.abort("a")
    return first, rest

  first, rest = asyncio.run(main())
  assert rest and rest[-1].finish_reason == "abort"
  assert rest[-1].num_output_tokens == first.num_output_tokens + sum(
    len(d.new_token_ids) for d in rest
  )
  asyncio.run(every_page_back(engine))


@jax.jit
def _slow(kv):
  """kv, unchanged, after ~0.1 s of device work: a transfer still in flight."""
  m = jax.lax.fori_loop(0, 100, lambda _, m: jnp.tanh(m @ m), jnp.eye(256) * 0.5)
  return kv + 0.0 * m[0, 0]


class HeldTransfer:
  """A KV copy that stays in flight until the test lets it land: the seam that puts a cancel
  mid-transfer by construction, whatever the machine's speed. The decode core sees a copy
  only through `is_ready()` until it lands; a cancelled one is never read."""

  def __init__(self, kv: jax.Array):
    self.kv, self.landed = kv, threading.Event()

  def is_ready(self) -> bool:
    return self.landed.is_set()


async def until(condition, what: str) -> None:
  for _ in range(600):  # bounded: 30 s
    if condition():
      return
    await asyncio.sleep(0.05)
  pytest.fail(f"never happened: {what}")


def decode_stats(engine: DisaggregatedEngine) -> dict:
  return engine.decode.stats()


def test_a_cancel_while_the_kv_moves_frees_every_page_in_both_stages(make, monkeypatch):
  fetch, held = Handoff.fetch, []

  def hold(self, sharding, shape):
    held.append(HeldTransfer(fetch(self, sharding, shape)))
    return held[-1]

  monkeypatch.setattr(Handoff, "fetch", hold)
  engine = make()

  async def main():
    stream = engine.generate("Count to ten:", SamplingParams(max_tokens=30, ignore_eos=True))
    await anext(stream)  # the first token: the prefill stage hands the request over
    await until(lambda: held and decode_stats(engine)["importing"] == 1, "the copy started")
    await stream.aclose()  # while the copy is in flight: it has not landed, by construction
    await until(lambda: decode_stats(engine)["kv_transfers_cancelled"] == 1, "the cancel")
    held[0].landed.set()  # the copy lands after its request has gone: nothing reads it
    return await every_page_back(engine)

  stages = dict(asyncio.run(main()))
  assert len(held) == 1
  assert stages["decode"]["kv_transfers_cancelled"] == 1
  assert stages["decode"]["kv_transfers"] == 0


def test_random_cancels_and_deadlines_free_every_page_in_both_stages(make, monkeypatch):
  """50 requests, each left at a random point: before its first token, while its KV moves
  (transfers are slowed), or while decoding, by cancelling the task or by a deadline. Both
  stages end with every page free and nothing pinned. Where each request is when it is left
  depends on the machine's speed, so only that invariant is asserted; the test above puts a
  cancel mid-transfer by construction."""
  fetch = Handoff.fetch
  monkeypatch.setattr(Handoff, "fetch", lambda self, s, shape: _slow(fetch(self, s, shape)))
  engine = make()
  rng = random.Random(0)
  outcomes = []

  async def one(i: int):
    params = SamplingParams(max_tokens=rng.randint(2, 40), ignore_eos=True)
    prompt = " ".join(["word"] * rng.randint(1, 60))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + rng.uniform(0.05, 3.0) if i % 2 else None
    leave_after = rng.choice([0, 1, 1, 2, 5, None])  # deltas to read before cancelling
    linger = rng.uniform(0.0, 0.4)  # after the first token: often while the KV moves
    stream = engine.generate(prompt, params, f"r{i}", deadline=deadline)
    seen = 0
    try:
      async for _ in stream:
        seen += 1
        if leave_after is not None and seen > leave_after:
          if seen == 1:
            await asyncio.sleep(linger)
          break
      outcomes.append("left" if leave_after is not None and seen > leave_after else "done")
    except TimeoutError:
      outcomes.append("deadline")
    finally:
      await stream.aclose()

  async def main():
    tasks = [asyncio.create_task(one(i)) for i in range(50)]
    await asyncio.sleep(0.5)
    for t in rng.sample(tasks, 10):  # cancelled from outside, wherever they are
      t.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(r is None or isinstance(r, asyncio.CancelledError) for r in results), results
    return await every_page_back(engine)

  stages = dict(asyncio.run(main()))
  assert set(outcomes) <= {"left", "done", "deadline"}
  assert stages["prefill"]["free_pages"] == stages["prefill"]["total_pages"]


def test_a_reserved_import_keeps_its_batch_slot(stage_models):
  """While an import's KV is on its way, the decode batch does not fill its slot with a
  waiting request: once landed it joins the batch, which never outgrows max_batch."""
  config = EngineConfig(num_pages=64, max_model_len=128, max_batch=2, max_num_batched_tokens=32)
  decode = Engine(stage_models[1], config, role="decode")
  params = SamplingParams(max_tokens=4, ignore_eos=True)
  prompt = decode.tokenizer.encode("The capital of France is")
  assert decode.reserve("import", len(prompt)) is not None
  decode.add_request(prompt, params, "waiting-1")
  decode.add_request(prompt, params, "waiting-2")
  decode.step()
  assert len(decode.scheduler.running) == 1  # one slot is the import's
  decode.admit("import", RequestState(prompt, [7042], params, seed=0))
  while decode.requests:
    decode.step()
    assert len(decode.scheduler.running) <= config.max_batch
  assert decode.allocator.num_free == config.num_pages - 1
