"""The async front end over the engine core thread: faults become errors, never hangs, and no
page is lost whatever a caller does."""

import asyncio
import dataclasses
import re
import resource
import threading

import pytest

from meshserve.engine import (
  AsyncEngine,
  Engine,
  EngineConfig,
  EngineDeadError,
  QueueFullError,
  RequestIdInUseError,
  SamplingParams,
)
from meshserve.engine.handoff import Handoff, TransferError
from meshserve.engine.request import RequestState

CONFIG = EngineConfig(num_pages=64, max_model_len=128, max_batch=4)
PARAMS = SamplingParams(max_tokens=24, ignore_eos=True)


@pytest.fixture
def make(model):
  engines = []

  def make(step_hook=None, **kw) -> AsyncEngine:
    """step_hook: runs before each step, on the core's thread (the test's own seam: it wraps
    this engine's step)."""
    engine = Engine(model, CONFIG)
    if step_hook is not None:
      step = engine.step

      def hooked_step():
        step_hook()
        return step()

      engine.step = hooked_step
    engines.append(AsyncEngine(engine, **kw))
    return engines[-1]

  yield make
  for engine in engines:
    engine.shutdown(30)


async def drain(stream) -> list[int]:
  return [t async for delta in stream for t in delta.new_token_ids]


async def all_pages_back(engine: AsyncEngine) -> dict:
  for _ in range(200):  # bounded: 10 s
    stats = engine.stats()
    if stats["free_pages"] == stats["total_pages"] and stats["open"] == 0:
      return stats
    await asyncio.sleep(0.05)
  pytest.fail(f"pages not returned: {engine.stats()}")


def test_a_client_id_is_refused_while_streaming_then_reusable(make):
  engine = make()
  other = SamplingParams(max_tokens=12)

  async def main():
    want = [
      t async for d in engine.generate("The capital of France is", other) for t in d.new_token_ids
    ]
    first = engine.generate("Count:", PARAMS, "same")
    head = await anext(first)
    with pytest.raises(RequestIdInUseError, match="request_id"):
      await anext(engine.generate("Other", PARAMS, "same"))
    rest = await drain(first)
    assert len(head.new_token_ids) + len(rest) == 24
    # Reused at once: the new stream gets its own tokens, none of the old request's.
    again = [d async for d in engine.generate("The capital of France is", other, "same")]
    assert {d.request_id for d in again} == {"same"}
    assert [t for d in again for t in d.new_token_ids] == want
    await all_pages_back(engine)

  asyncio.run(main())


def test_add_and_abort_never_wait_for_a_step(make):
  """With a step stuck inside the core, adding and cancelling requests still return."""
  entered, release = threading.Event(), threading.Event()

  def hook():
    entered.set()
    assert release.wait(30)

  engine = make(step_hook=hook)

  async def main():
    running = asyncio.ensure_future(drain(engine.generate("Hello", PARAMS)))
    assert await asyncio.to_thread(entered.wait, 30)  # the core is now inside a step
    queued = engine.generate("World", PARAMS)
    task = asyncio.ensure_future(anext(queued))
    await asyncio.sleep(0.05)  # the add went through while the step is still stuck
    assert engine.stats()["open"] == 2
    task.cancel()  # an abort, queued behind the stuck step: it returns at once
    with pytest.raises(asyncio.CancelledError):
      await task
    assert engine.stats()["open"] == 1
    release.set()
    assert len(await running) == 24
    await all_pages_back(engine)

  asyncio.run(main())


def test_a_failed_step_fails_every_stream_and_refuses_new_ones(make):
  fail, dead = threading.Event(), []

  def hook():
    if fail.is_set():
      raise RuntimeError("boom")

  engine = make(step_hook=hook, on_dead=dead.append)

  async def main():
    heads = asyncio.Queue()

    async def consume(i):
      async for delta in engine.generate(f"Story {i}", SamplingParams(max_tokens=100)):
        heads.put_nowait(delta)

    tasks = [asyncio.ensure_future(consume(i)) for i in range(6)]  # 4 running, 2 waiting
    for _ in range(4):
      await asyncio.wait_for(heads.get(), 60)
    assert engine.stats()["open"] == 6
    fail.set()
    for task in tasks:
      with pytest.raises(EngineDeadError, match="boom"):
        await asyncio.wait_for(task, 10)
    with pytest.raises(EngineDeadError):
      await anext(engine.generate("After", PARAMS))

  asyncio.run(main())
  assert len(dead) == 1 and engine.error is not None


def test_deadlines_and_cancels_anywhere_return_every_page(make):
  engine = make()

  async def one(i: int):
    params = SamplingParams(max_tokens=200, ignore_eos=True)  # outlives every deadline
    if i % 3 == 0:  # a deadline: some pass while queued, some while decoding
      deadline = asyncio.get_running_loop().time() + 0.02 * i
      with pytest.raises(TimeoutError):
        await drain(engine.generate(f"Request {i}", params, deadline=deadline))
      return
    task = asyncio.ensure_future(drain(engine.generate(f"Request {i} says", params)))
    await asyncio.sleep(0.01 * i)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
      await task

  async def main():
    await asyncio.gather(*(one(i) for i in range(1, 30)))
    stats = await all_pages_back(engine)
    assert stats["running"] == stats["waiting"] == 0
    assert len(await drain(engine.generate("Still serving", PARAMS))) == 24

  asyncio.run(main())


def test_a_closed_event_loop_does_not_stop_the_core(make):
  engine = make()

  async def abandon():
    stream = engine.generate("Left behind", SamplingParams(max_tokens=100, ignore_eos=True))
    await anext(stream)
    # Leaving with the stream open: asyncio.run closes the loop under it.

  loop = asyncio.new_event_loop()
  loop.run_until_complete(abandon())
  loop.close()

  async def main():
    assert len(await drain(engine.generate("Next", PARAMS))) == 24
    await all_pages_back(engine)

  asyncio.run(main())
  assert engine.error is None


def test_the_queue_limit_refuses_the_overflow(make):
  engine = make(max_queue=1)  # max_batch 4 + 1 waiting

  async def main():
    streams = [engine.generate(f"Q{i}", PARAMS) for i in range(5)]
    heads = asyncio.gather(*(anext(s) for s in streams))
    await asyncio.sleep(0.05)  # all five are in
    with pytest.raises(QueueFullError, match="queue"):
      await anext(engine.generate("one too many", PARAMS))
    await heads
    assert [len(await drain(s)) for s in streams] == [23] * 5
    await all_pages_back(engine)

  asyncio.run(main())


def test_server_assigned_ids_are_random_and_never_collide_with_client_ids(make):
  engine = make()

  async def main():
    held = [engine.generate("Count to a hundred:", PARAMS, f"req#{i}") for i in range(3)]
    for stream in held:  # a client squatting on what used to be the next anonymous ids
      await anext(stream)
    firsts = [await anext(engine.generate("Hi", SamplingParams(max_tokens=2))) for _ in range(3)]
    for stream in held:
      await stream.aclose()
    return [d.request_id for d in firsts]

  ids = asyncio.run(main())
  assert len(set(ids)) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids), ids
  asyncio.run(all_pages_back(engine))


def test_text_is_made_off_the_engine_thread_and_a_stop_string_aborts_in_the_core(
  make, model, golden, monkeypatch
):
  """Detokenization, logprob formatting and stop strings run in the front end (the consumer's
  thread), never on the engine core's: the core emits tokens and the sampler's logprob rows; a
  stop string found in the front end ends the stream and aborts the request in the core, which
  may have run a token past it."""
  from meshserve.engine import output

  threads, formatted = [], []

  def spy(record, real):
    def wrapper(*args, **kw):
      record.append(threading.current_thread().name)
      return real(*args, **kw)

    return wrapper

  monkeypatch.setattr(model.tokenizer, "decode", spy(threads, model.tokenizer.decode))
  monkeypatch.setattr(output, "token_logprob", spy(formatted, output.token_logprob))
  engine = make()
  prompt = golden.case(2)["ids"].tolist()  # continues " a wise and kind woman named Elara."
  params = SamplingParams(max_tokens=32, stop="d wom", logprobs=2)

  async def main():
    deltas = [d async for d in engine.generate(prompt, params)]
    return deltas, await all_pages_back(engine)

  deltas, _ = asyncio.run(main())
  assert deltas[-1].finish_reason == "stop" and "".join(d.new_text for d in deltas) == (
    " a wise and kin"
  )
  assert deltas[-1].num_output_tokens == sum(len(d.new_token_ids) for d in deltas)
  assert threads and "meshserve-engine-core" not in threads, set(threads)
  ids = [t for d in deltas for t in d.new_token_ids]
  logprobs = [lp for d in deltas for lp in d.new_logprobs]
  assert [lp.token_id for lp in logprobs] == ids and all(len(lp.top) == 2 for lp in logprobs)
  assert len(formatted) == len(ids) and "meshserve-engine-core" not in formatted, set(formatted)


def test_stop_limits_are_refused_naming_the_field():
  from meshserve.engine.sampling import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS

  SamplingParams(stop=["x" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS)  # the most allowed
  with pytest.raises(ValueError, match="^stop: 17 stop strings"):
    SamplingParams(stop=["x"] * (MAX_STOP_STRINGS + 1))
  with pytest.raises(ValueError, match="^stop: a stop string of 257 characters"):
    SamplingParams(stop=["x" * (MAX_STOP_STRING_CHARS + 1)])
  with pytest.raises(ValueError, match="^stop_token_ids: 65 ids"):
    SamplingParams(stop_token_ids=list(range(MAX_STOP_TOKEN_IDS + 1)))


def test_a_hand_off_the_engine_refuses_fails_alone(model):
  """A decode stage given a state that would break its step (a seed past uint32, no output
  token) fails that request with a ValueError naming the field, and serves on."""
  engine = AsyncEngine(Engine(model, CONFIG, role="decode"))
  good = RequestState([1, 2, 3], [4], SamplingParams(max_tokens=4, ignore_eos=True), seed=5)
  never = lambda sharding, shape: pytest.fail("a refused hand-off must fetch nothing")  # noqa: E731

  async def main():
    for bad, field in [
      (dataclasses.replace(good, seed=2**40), "seed"),
      (dataclasses.replace(good, output_ids=[]), "output_token_ids"),
      (dataclasses.replace(good, output_ids=[10**6]), "output_token_ids"),
      (dataclasses.replace(good, num_cached_tokens=9), "num_cached_tokens"),
    ]:
      with pytest.raises(ValueError, match=f"^{field}:"):
        await drain(engine.resume(bad, never))
    assert engine.error is None

  try:
    asyncio.run(main())
    asyncio.run(all_pages_back(engine))
  finally:
    engine.shutdown(30)


def test_an_engine_whose_requests_all_wait_blocks_instead_of_spinning(model):
  """A prefill stage whose pool is held by hand-offs nobody releases: the next request waits
  for pages, and the core thread sleeps meanwhile (measured as the process's CPU time)."""
  config = EngineConfig(num_pages=9, max_model_len=128, max_batch=4)
  engine = AsyncEngine(Engine(model, config, role="prefill"))

  def prompt(i: int) -> list[int]:  # 3 pages of 16, none shared: two leave 2 of the 8 free
    return list(range(100 + 50 * i, 140 + 50 * i))

  async def handoff(i: int) -> Handoff:
    async for event in engine.generate(prompt(i), PARAMS):
      if isinstance(event, Handoff):
        return event

  async def main():
    handoffs = [await handoff(i) for i in range(2)]
    waiting = asyncio.create_task(handoff(2))
    await asyncio.sleep(0.5)  # it is queued, and the core has found it cannot run
    assert engine.stats()["pinned"] == 2 and not waiting.done()
    before = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.sleep(2.0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    for h in handoffs:
      engine.release(h)
    engine.release(await waiting)  # pages came back: it ran
    return cpu

  try:
    cpu = asyncio.run(main())
    assert cpu < 0.2, f"{cpu:.2f} s of CPU in 2 s of waiting: the core spins"
  finally:
    engine.shutdown(30)


class _NeverLands:
  """A KV fetch still in flight for as long as the test runs."""

  def is_ready(self) -> bool:
    return False


def test_an_import_that_never_gets_pages_fails_in_bounded_time(model):
  """A decode pool held by an import whose KV never lands: the next import waits for pages
  only `import_timeout`, then its stream ends with an error, and every page comes back."""
  config = EngineConfig(num_pages=9, max_model_len=128, max_batch=4)
  engine = AsyncEngine(Engine(model, config, role="decode"))
  engine.core.stage.import_timeout = 0.5
  params = SamplingParams(max_tokens=8, ignore_eos=True)

  def state(i: int) -> RequestState:  # 7 of the 8 pages each
    return RequestState(list(range(100 * i, 100 * i + 100)), [5], params, seed=1)

  async def main():
    held = engine.resume(state(1), lambda sharding, shape: _NeverLands())
    holding = asyncio.create_task(drain(held))
    await asyncio.sleep(0.3)  # its pages are reserved, its KV on the way for ever
    with pytest.raises(TransferError, match="no free pages"):
      await asyncio.wait_for(drain(engine.resume(state(2), lambda s, shape: _NeverLands())), 30)
    holding.cancel()
    return await all_pages_back(engine)

  try:
    asyncio.run(main())
  finally:
    engine.shutdown(30)


def test_abort_ends_a_stream_wherever_its_request_is(model):
  """`abort` ends the stream with finish_reason "abort" and frees the pages: a running
  request, and a decode import whose KV is still on its way (the core reports nothing for
  it: the stream ends all the same)."""
  engine = AsyncEngine(Engine(model, CONFIG))
  decode = AsyncEngine(Engine(model, CONFIG, role="decode"))
  state = RequestState(list(range(100, 140)), [5], SamplingParams(max_tokens=8), seed=1)

  async def running():
    deltas = []
    async for delta in engine.generate("Tell me a story.", PARAMS, "r1"):
      if not deltas:  # it runs: abort it
        assert await engine.abort("r1")
      deltas.append(delta)
    return deltas[-1]

  async def moving():
    stream = decode.resume(state, lambda sharding, shape: _NeverLands(), "r2")
    aborted = asyncio.get_running_loop().call_later(0.3, asyncio.ensure_future, decode.abort("r2"))
    deltas = [d async for d in stream]
    aborted.cancel()
    return deltas[-1]

  async def main():
    last = await asyncio.wait_for(running(), 60)
    assert last.finish_reason == "abort" and 0 < last.num_output_tokens < PARAMS.max_tokens
    assert not await engine.abort("r1")  # nothing streams under it now
    last = await asyncio.wait_for(moving(), 60)
    assert last.finish_reason == "abort" and last.num_output_tokens == 1
    await all_pages_back(engine)
    await all_pages_back(decode)

  try:
    asyncio.run(main())
  finally:
    engine.shutdown(30)
    decode.shutdown(30)
