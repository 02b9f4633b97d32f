"""The async front end over the engine core thread: faults become errors, never hangs, and no
page is lost whatever a caller does."""

import asyncio
import threading

import pytest

from engine import (
  AsyncEngine,
  Engine,
  EngineConfig,
  EngineDeadError,
  QueueFullError,
  RequestIdInUseError,
  SamplingParams,
)

CONFIG = EngineConfig(num_pages=64, max_model_len=128, max_batch=4)
PARAMS = SamplingParams(max_tokens=24, ignore_eos=True)


@pytest.fixture
def make(model):
  engines = []

  def make(**kw) -> AsyncEngine:
    engines.append(AsyncEngine(Engine(model, CONFIG), **kw))
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
