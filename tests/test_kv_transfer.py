"""KV hand-off between a prefill and a decode pool: different layouts, different page numbers,
the same bits. Within a process (jax.device_put) and through jax.experimental.transfer."""

import dataclasses
import types

import jax
import numpy as np
import pytest

from meshserve.engine import Engine, EngineConfig, SamplingParams
from meshserve.engine.handoff import Handoff
from meshserve.engine.request import RequestState
from meshserve.engine.runner import Runner
from meshserve.engine.transfer import TransferServer, kv_head_shards
from meshserve.models import KVCache
from meshserve.sharding import Layout, put, split_devices

CONFIG = EngineConfig(page_size=8, num_pages=64, max_model_len=128, max_batch=4)
PAIRS = [("tp=2", "tp=4"), ("tp=1", "tp=2"), ("tp=4", "tp=1")]


def runner(model_config, layout: Layout, devices) -> Runner:
  """A runner over a random-filled pool: the page movers never look at the weights."""
  mesh = layout.make_mesh(devices)
  model = types.SimpleNamespace(config=model_config, mesh=mesh, layout=layout, platform="cpu")
  r = Runner(model, CONFIG)
  rng = np.random.default_rng(len(devices))
  shape = r.cache.k.shape
  k, v = (rng.standard_normal(shape, np.float32) for _ in range(2))
  r.cache = KVCache(k=put(k, r.shardings.cache), v=put(v, r.shardings.cache))
  return r


@pytest.fixture(scope="module")
def four_heads(model):
  """SmolLM2's shape but 4 kv heads, so tp=2 and tp=4 really split the pool (its own 3 heads
  are kept whole under both)."""
  return dataclasses.replace(model.config, num_heads=8, num_kv_heads=4, num_layers=3)


def pages_of(r: Runner, pages) -> np.ndarray:
  return np.stack([np.asarray(r.cache.k)[:, pages], np.asarray(r.cache.v)[:, pages]])


@pytest.fixture(scope="module")
def transfer_servers():
  return TransferServer(), TransferServer()


@pytest.mark.parametrize("via", ["device_put", "transfer"])
@pytest.mark.parametrize(("src", "dst"), PAIRS)
def test_pages_cross_layouts_bit_for_bit(four_heads, transfer_servers, src, dst, via):
  src, dst = Layout.parse(src), Layout.parse(dst)
  a_devices, b_devices = split_devices(src, dst)
  a, b = runner(four_heads, src, a_devices), runner(four_heads, dst, b_devices)
  a_pages, b_pages = [5, 9, 2], [17, 3, 40]  # three pages: packed into a bucket of four
  kv = a.export_pages(a_pages)
  n = kv.shape[2]
  assert n == 4 and kv.shape == b.kv_shape(n)
  before = pages_of(b, [1, 4])
  if via == "device_put":
    fetch = Handoff("r", None, kv, len(a_pages), None).fetch
  else:
    prefill, decode = transfer_servers
    offer = prefill.offer(kv, kv_head_shards(b.kv_sharding, b.kv_shape(n)))
    fetch = decode.fetch(prefill.address, offer)
  moved = fetch(b.kv_sharding, b.kv_shape(n))
  assert moved.sharding.is_equivalent_to(b.kv_sharding, moved.ndim)
  ids = list(range(7, 7 + 3 * b.config.page_size - 5))  # the last page not full
  b.import_pages(moved, b_pages, ids)
  np.testing.assert_array_equal(pages_of(b, b_pages), pages_of(a, a_pages))
  tokens = np.asarray(b.page_tokens)[b_pages].reshape(-1)  # the ids in page order, -1 after
  np.testing.assert_array_equal(tokens, ids + [-1] * 5)
  np.testing.assert_array_equal(pages_of(b, [1, 4]), before)  # nothing else was written
  assert b.cache.k.sharding.is_equivalent_to(b.shardings.cache, 5)


def test_kv_head_shards(four_heads):
  layout = Layout.parse("tp=4")
  r = runner(four_heads, layout, jax.devices()[:4])
  assert kv_head_shards(r.kv_sharding, r.kv_shape(2)) == 4
  r3 = runner(
    dataclasses.replace(four_heads, num_kv_heads=3, num_heads=9), layout, jax.devices()[:4]
  )
  assert kv_head_shards(r3.kv_sharding, r3.kv_shape(2)) == 1  # 3 heads: kept whole


def test_a_prefilled_request_lands_in_the_decode_pool_bit_for_bit(stage_models):
  """The real model, through the engine's primitives: a prefill engine (tp=2) detaches a
  request at its first token; a decode engine (tp=4, other devices, a pool already in use)
  reserves pages, takes the KV and reads back the same bits."""
  prefill = Engine(stage_models[0], CONFIG, role="prefill")
  decode = Engine(stage_models[1], CONFIG, role="decode")
  assert decode.reserve("other", 20) is not None  # so the page numbers differ
  prompt = prefill.tokenizer.encode("The KV cache of this prompt crosses two layouts intact.")
  prefill.add_request(prompt, SamplingParams(max_tokens=4), "r")
  while not prefill.step():  # the first token
    pass
  request, p_pages = prefill.detach("r")
  assert not prefill.requests and len(p_pages) == -(-len(prompt) // CONFIG.page_size)
  kv = prefill.runner.export_pages(p_pages)
  d_pages = decode.reserve("r", len(prompt))
  assert set(d_pages).isdisjoint(p_pages)
  decode.runner.import_pages(jax.device_put(kv, decode.runner.kv_sharding), d_pages, prompt)
  np.testing.assert_array_equal(pages_of(decode.runner, d_pages), pages_of(prefill.runner, p_pages))
  np.testing.assert_array_equal(  # the tokens too, which the penalties read
    np.asarray(decode.runner.page_tokens)[d_pages], np.asarray(prefill.runner.page_tokens)[p_pages]
  )
  decode.admit("r", RequestState.of(request))
  prefill.free("r")
  assert prefill.allocator.num_free == CONFIG.num_pages - 1
  while decode.requests:
    decode.step()
  decode.abort("other")
  assert decode.allocator.num_free == CONFIG.num_pages - 1
