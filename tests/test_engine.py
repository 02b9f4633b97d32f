"""The engine with the real model: continuous batching must never change what a request gets.

"Alone" below means the request run by itself on an engine without prefix caching; greedy
outputs are compared up to the first reference near-tie (see conftest.first_near_tie). The
batching, preemption and prefix-cache cases run on both model families (`family`).
"""

import asyncio
import itertools
import random

import jax
import numpy as np
import pytest
from conftest import assert_equal_until_a_near_tie, assert_greedy_equal, penalized_greedy

from meshserve.engine import LLM, AsyncEngine, Engine, EngineConfig, SamplingParams

TEXT = (
  "The old lighthouse keeper climbed the spiral stairs every evening to light the great lamp. "
  "Ships far out at sea relied on its beam to avoid the rocks hidden beneath the waves. One "
  "stormy night the lamp flickered and went dark, and the keeper had to find a way to bring it "
  "back before the fishing boats returned to the harbour. Meanwhile, in the village below, the "
  "baker was preparing bread for the morning market, and the children were asleep, dreaming of "
  "summer. Photosynthesis is the process by which green plants turn sunlight, water and carbon "
  "dioxide into sugar and oxygen. The French Revolution began in 1789 and changed Europe for "
  "ever. To make a good cup of tea, warm the pot first, then use fresh water just off the boil."
)


@pytest.fixture(scope="module", params=["smollm2", pytest.param("gemma3", marks=pytest.mark.slow)])
def family(request):
  """SmolLM2 (Llama) and Gemma 3 (sliding-window layers, QK-norm, a 262k vocabulary; slow: its
  cases take about five minutes here)."""
  return request.getfixturevalue("model" if request.param == "smollm2" else "gemma")


@pytest.fixture(scope="module")
def alone(family):
  """Runs one request at a time, with nothing to share: the reference for batched runs."""
  config = EngineConfig(num_pages=64, max_model_len=256, max_batch=1, prefix_caching=False)
  llm = LLM(family, config)
  return lambda prompt, params: llm.generate(prompt, params)[0]


@pytest.fixture(scope="module")
def big(family):
  return LLM(family, EngineConfig(num_pages=600, max_model_len=256, max_batch=64))


def _prompts(model, n: int, seed: int = 0) -> list[list[int]]:
  ids = model.tokenizer.encode(TEXT)
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    length = rng.choice([rng.randrange(3, 24), rng.randrange(24, len(ids) // 2)])
    start = rng.randrange(0, len(ids) - length)
    out.append(ids[start : start + length])
  return out


@pytest.mark.slow  # 48 prompts, each also run alone; the golden tests cover the default run
def test_batch_invariance_greedy_and_seeded(big, alone, family):
  """48 requests in one batch, greedy and seeded sampling (temperature, top-p, a seed each)
  alternating: each gets what it gets alone."""
  prompts = _prompts(family, 48)
  greedy = SamplingParams(max_tokens=12, ignore_eos=True)
  params = [
    greedy if i % 2 else SamplingParams(
      max_tokens=8, temperature=0.9, top_p=0.95, seed=100 + i, ignore_eos=True
    )
    for i in range(len(prompts))
  ]  # fmt: skip
  batched = big.generate(prompts, params)
  assert big.engine.allocator.num_free == big.config.num_pages - 1
  for prompt, p, out in zip(prompts, params, batched, strict=True):
    if p is greedy:
      assert_greedy_equal(family, prompt, alone(prompt, p).token_ids, out.token_ids)
    else:
      assert out.token_ids == alone(prompt, p).token_ids


@pytest.mark.slow  # default: test_scheduler preempts, test_disaggregated recomputes
def test_preemption_keeps_every_output(family, alone):
  """8 requests growing to 5 pages each in a pool of 16: some are preempted and recomputed."""
  config = EngineConfig(num_pages=17, max_model_len=128, max_batch=8, prefix_caching=False)
  llm = LLM(family, config)
  prompts = _prompts(family, 8, seed=2)
  prompts = [(p * 4)[:40] for p in prompts]
  params = SamplingParams(max_tokens=36, ignore_eos=True)
  outs = llm.generate(prompts, params)
  assert llm.engine.stats()["preemptions"] > 0
  assert llm.engine.allocator.num_free == 16
  for prompt, out in zip(prompts, outs, strict=True):
    assert len(out.token_ids) == 36
    assert_greedy_equal(family, prompt, alone(prompt, params).token_ids, out.token_ids)


def test_prefix_cache_skips_shared_pages(family):
  llm = LLM(family, EngineConfig(num_pages=64, max_model_len=256, max_batch=4))
  prompt = family.tokenizer.encode(TEXT)[:100]
  params = SamplingParams(max_tokens=10, ignore_eos=True)
  first = llm.generate(prompt, params)[0]
  second = llm.generate(prompt, params)[0]
  assert first.num_cached_tokens == 0
  assert second.num_cached_tokens == 96  # six full pages of 16; the last 4 tokens recomputed
  assert second.token_ids == first.token_ids
  # A prompt that shares the first 40 tokens reuses the two full pages inside them.
  other = llm.generate(prompt[:40] + [11, 12, 13], params)[0]
  assert other.num_cached_tokens == 32


def test_chunked_prefill_runs_beside_decodes(family, alone):
  config = EngineConfig(num_pages=64, max_model_len=256, max_batch=4, max_num_batched_tokens=48)
  llm = LLM(family, config)
  steps = []
  execute = llm.engine.runner.execute
  llm.engine.runner.execute = lambda s: (steps.append(s), execute(s))[1]
  ids = family.tokenizer.encode(TEXT)
  short, long = ids[:10], ids[20:150]  # 130 tokens: three chunks under a budget of 48
  params = SamplingParams(max_tokens=16, ignore_eos=True)
  outs = llm.generate([short, long], params)
  long_chunks = [
    (c.start, c.length, len(s.decodes))
    for s in steps
    for c in s.prefills
    if len(c.request.token_ids) >= 130
  ]
  # The long prompt is computed in order, in several steps, none over the budget; after the
  # first step the short request decodes in every one of them.
  assert len(long_chunks) >= 3
  assert [start for start, _, _ in long_chunks] == list(
    itertools.accumulate([length for _, length, _ in long_chunks[:-1]], initial=0)
  )
  assert sum(length for _, length, _ in long_chunks) == 130
  assert all(length <= 48 for _, length, _ in long_chunks)
  assert all(decodes == 1 for _, _, decodes in long_chunks[1:])
  for prompt, out in zip([short, long], outs, strict=True):
    assert_greedy_equal(family, prompt, alone(prompt, params).token_ids, out.token_ids)


@pytest.mark.slow  # default: test_scheduler fuzzes both layouts
def test_segmented_prefill_matches_a_row_per_chunk(model):
  """Prefill rows of 16 tokens (the CPU default) against one row per chunk: the same tokens
  and log-probabilities, in calls that hold less padding."""
  prompts = _prompts(model, 12, seed=3)
  params = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=0)
  runs = {}
  for segment in (0, 16):
    config = EngineConfig(num_pages=200, max_model_len=256, max_batch=12, prefill_segment=segment)
    llm = LLM(model, config)
    shapes = []
    execute = llm.engine.runner.execute

    def record(schedule, execute=execute, llm=llm, shapes=shapes):
      out = execute(schedule)
      if schedule.prefills:
        B, T, _ = llm.engine.runner.last_shapes[0]
        shapes.append((B * T, sum(c.length for c in schedule.prefills)))
      return out

    llm.engine.runner.execute = record
    outs = llm.generate(prompts, params)
    runs[segment] = outs, shapes
    assert llm.engine.allocator.num_free == config.num_pages - 1
  (whole, whole_shapes), (split, split_shapes) = runs[0], runs[16]
  for a, b in zip(whole, split, strict=True):
    assert a.token_ids == b.token_ids
    np.testing.assert_allclose(
      [t.logprob for t in a.logprobs], [t.logprob for t in b.logprobs], atol=1e-4
    )
  slots = {k: sum(s for s, _ in v[1]) for k, v in runs.items()}
  tokens = sum(t for _, t in split_shapes)
  assert tokens == sum(t for _, t in whole_shapes) == sum(map(len, prompts))
  assert slots[16] < slots[0], slots  # fewer padded token slots
  assert slots[16] - tokens < 16 * 12 + 7 * 16 * len(split_shapes)  # < a row per prompt + bucket


def test_stop_string_across_token_boundary_never_leaks(llm, golden):
  prompt = golden.case(2)["ids"].tolist()  # continues " a wise and kind woman named Elara."
  deltas = []
  params = SamplingParams(max_tokens=32, stop=("d wom",))
  out = llm.generate(prompt, params, on_delta=lambda i, t: deltas.append(t))[0]
  assert out.finish_reason == "stop" and out.text == " a wise and kin"
  assert "".join(deltas) == out.text
  assert not any("wom" in d for d in deltas)


def test_stop_token_ids_end_the_request(llm, golden):
  case = golden.case(2)
  ref = case["greedy"].tolist()
  out = llm.generate(case["ids"].tolist(), SamplingParams(max_tokens=32, stop_token_ids=[ref[3]]))
  assert out[0].token_ids == ref[:4] and out[0].finish_reason == "stop"


def test_logprobs_equal_log_softmax_of_reference_logits(llm, model, golden):
  prompt = golden.case(1)["ids"].tolist()
  out = llm.generate(prompt, SamplingParams(max_tokens=6, logprobs=5))[0]
  logits = model.logits(prompt + out.token_ids)[len(prompt) - 1 : -1]
  ref = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
  ref -= logits.max(-1, keepdims=True)
  assert len(out.logprobs) == len(out.token_ids) == 6
  for row, lp, token in zip(ref, out.logprobs, out.token_ids, strict=True):
    assert lp.token_id == token
    assert abs(lp.logprob - row[token]) < 1e-3
    assert len(lp.top) == 5
    ids, values = zip(*lp.top, strict=True)
    np.testing.assert_allclose(values, np.sort(row)[::-1][:5], atol=1e-3)
    np.testing.assert_allclose(row[list(ids)], values, atol=1e-3)
  plain = llm.generate(prompt, SamplingParams(max_tokens=6))[0]
  assert plain.logprobs is None and plain.token_ids == out.token_ids


def test_penalties_read_every_token_wherever_it_was_written(model):
  """Penalties count the tokens the step wrote beside their KV on the device: prompts
  prefilled in chunks, requests preempted and recomputed, and a prefix-cache hit (its pages
  written by an earlier request) all decode as a numpy reference does, penalizing prompt and
  output tokens alike."""
  ids = model.tokenizer.encode(TEXT)
  prompts = [ids[i * 40 : i * 40 + 40] for i in range(4)]
  params = SamplingParams(
    max_tokens=24, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3,
    ignore_eos=True,
  )  # fmt: skip
  config = EngineConfig(num_pages=12, max_model_len=64, max_batch=4, max_num_batched_tokens=32)
  llm = LLM(model, config)
  outs = llm.generate(prompts, params)
  assert llm.engine.stats()["preemptions"] > 0
  again = llm.generate(prompts[3], params)[0]
  assert llm.engine.stats()["cached_tokens"] >= 32
  want = penalized_greedy(model, prompts, params, 24)
  for (tokens, margins), out in zip(want, outs, strict=True):
    assert_equal_until_a_near_tie(tokens, margins, out.token_ids)
  assert_equal_until_a_near_tie(*want[3], again.token_ids)
  plain = llm.generate(prompts[0], SamplingParams(max_tokens=24, ignore_eos=True))[0]
  assert plain.token_ids != outs[0].token_ids  # the penalties changed something


def test_a_decode_step_sends_no_history_to_the_device(model):
  """The host arrays of a penalized decode step: of all of them only the page table (one int
  per page of context a row may reach) grows with max_model_len. The tokens the penalties
  count stay on the device."""
  prompt = model.tokenizer.encode(TEXT)[:20]

  def bytes_per_decode_step(max_model_len: int) -> set[int]:
    llm = LLM(model, EngineConfig(num_pages=160, max_model_len=max_model_len, max_batch=4))
    place, sent = llm.runner._place, set()

    def spy(inputs):
      if inputs[0].shape[1] == 1:  # a decode call: tokens [B, 1]
        sent.add(sum(x.nbytes for x in jax.tree.leaves(inputs) if isinstance(x, np.ndarray)))
      return place(inputs)

    llm.runner._place = spy
    llm.generate([prompt] * 4, SamplingParams(max_tokens=4, repetition_penalty=1.2))
    return sent

  (short,), (long,) = bytes_per_decode_step(256), bytes_per_decode_step(2048)
  assert long - short == 4 * (2048 - 256) // 16 * 4  # B rows x the extra pages x int32


def test_penalties_change_the_output(llm, golden):
  prompt = golden.case(0)["ids"].tolist()
  plain = llm.generate(prompt, SamplingParams(max_tokens=24))[0]
  penalized = llm.generate(prompt, SamplingParams(max_tokens=24, frequency_penalty=2.0))[0]
  assert penalized.token_ids != plain.token_ids
  counts = np.bincount(penalized.token_ids)
  assert counts.max() <= np.bincount(plain.token_ids).max()


@pytest.mark.slow  # default: test_async_engine cancels at random points
def test_random_adds_and_aborts_lose_nothing(family, alone):
  """Requests arrive and are aborted at random steps in a small pool; the ones that finish get
  what they get alone, and every page comes back."""
  engine = Engine(family, EngineConfig(num_pages=33, max_model_len=128, max_batch=6))
  rng = random.Random(3)
  prompts = _prompts(family, 24, seed=3)
  params = SamplingParams(max_tokens=10, ignore_eos=True)
  pending, finished, aborted, tokens = list(enumerate(prompts)), {}, set(), {}
  while pending or engine.has_unfinished():
    if pending and rng.random() < 0.5:
      i, prompt = pending.pop(0)
      engine.add_request(prompt, params, request_id=str(i))
    if engine.requests and rng.random() < 0.1:
      victim = rng.choice(sorted(engine.requests))
      assert engine.abort(victim).finish_reason == "abort"
      aborted.add(int(victim))
    for out in engine.step():
      tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
      if out.finished:
        finished[int(out.request_id)] = tokens[out.request_id]
  assert engine.allocator.num_free == 32 and not engine.allocator.tables
  assert len(finished) > 10 and aborted
  for i, ids in finished.items():
    assert_greedy_equal(family, prompts[i], alone(prompts[i], params).token_ids, ids)


def test_async_engine_streams_and_cancels(model, golden):
  engine = AsyncEngine(Engine(model, EngineConfig(num_pages=64, max_model_len=256, max_batch=4)))
  case = golden.case(3)

  async def main():
    outs = [o async for o in engine.generate(case["ids"].tolist(), SamplingParams(max_tokens=32))]
    assert outs[-1].finished and all(not o.finished for o in outs[:-1])
    ids = sum((o.new_token_ids for o in outs), [])
    assert ids == case["greedy"].tolist() and outs[-1].num_output_tokens == len(ids)
    assert "".join(o.new_text for o in outs) == model.tokenizer.decode(ids, True)
    timing = outs[-1].timing
    assert 0 <= timing.queued_s <= timing.first_token_s <= timing.finished_s

    # A consumer that stops listening aborts its request and frees its pages.
    stream = engine.generate("Tell me a long story.", SamplingParams(max_tokens=200))
    async for _ in stream:
      break
    await stream.aclose()
    with pytest.raises(ValueError, match="prompt"):
      async for _ in engine.generate(""):
        pass
    # The abort travels through the core's inbox: wait (bounded) for the pages to return.
    for _ in range(100):
      stats = engine.stats()
      if stats["free_pages"] == stats["total_pages"]:
        break
      await asyncio.sleep(0.05)

  try:
    asyncio.run(main())
    stats = engine.stats()
    assert stats["running"] == stats["waiting"] == stats["open"] == 0
    assert stats["free_pages"] == stats["total_pages"]
  finally:
    engine.shutdown()
