"""Layouts, rules and sharded placement on 8 fake CPU devices (see conftest.py): a sharded model
must compute the single-device numbers, with its weights really split and only the expected
collectives in the compiled step."""

import functools
import math
import re

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from meshserve.engine import LLM, EngineConfig, SamplingParams
from meshserve.engine.kv_manager import ReplicaAllocator
from meshserve.models import KVCache, Model, load_model
from meshserve.models import checkpoint as ckpt
from meshserve.sharding import (
  MEGATRON,
  Layout,
  Rules,
  batch_sharding,
  distributed,
  kv_cache_sharding,
  param_shardings,
  shard_state,
  spec_for,
)

# tp=8 is slow (CI runs it): dp=2,tp=4 spans the 8 devices in the default run. tp=2 is slow
# too: it splits what tp=4 splits (the MLP; SmolLM2's heads stay whole), which the default runs.
LAYOUTS = [
  "tp=1",
  pytest.param("tp=2", marks=pytest.mark.slow),
  "tp=3",
  "tp=4",
  pytest.param("tp=8", marks=pytest.mark.slow),
  "dp=2,tp=4",
]
# Split reductions (e.g. over F/tp columns, then an all-reduce) add in another order: float32
# logits of magnitude ~20 then differ from the one-device run by up to ~1.3e-4.
ATOL = 2e-4
ATTENTION = {"wq", "wk", "wv", "wo"}
MLP = {"w_gate", "w_up", "w_down"}
# SmolLM2-135M: 9 query heads and 3 kv heads split only under tp=3 (the fallback replicates them
# otherwise); F=1536 splits under every tp.
SPLIT = {"tp=1": set(), "tp=3": ATTENTION | MLP} | {k: MLP for k in ("tp=2", "tp=4", "tp=8")}
SPLIT["dp=2,tp=4"] = MLP


@pytest.fixture(scope="session", autouse=True)
def eight_devices():
  assert jax.device_count() >= 8, (
    f"needs 8 devices, found {jax.device_count()}: XLA_FLAGS sets another device count"
  )


@pytest.fixture(scope="module")
def model() -> Model:
  """The one-device model with the XLA attention that `load_model(layout=...)` builds (XLA
  cannot split the native kernel's custom call over a mesh)."""
  return load_model("smollm2-135m-instruct", attention="xla")


@pytest.fixture(scope="module")
def llm(model) -> LLM:
  return LLM(model, EngineConfig(num_pages=256, max_model_len=512, max_batch=8))


def reshard(model: Model, layout: str) -> Model:
  """`model` placed by `layout` (what load_model(layout=...) does, minus the GGUF parsing)."""
  lay = Layout.parse(layout)
  mesh = lay.make_mesh()
  state = shard_state(model.state, param_shardings(model.state, lay, mesh))
  return Model(model.config, model.tokenizer, nnx.merge(model.graphdef, state), lay, mesh)


@pytest.fixture(scope="module", params=LAYOUTS)
def sharded(request, model) -> Model:
  # Module scope: pytest runs every test of one layout before building the next.
  return reshard(model, request.param)


# --- Layout and rules ---


def test_layout_parse():
  assert Layout.parse("tp=8") == Layout.tp(8) == Layout(data=1, model=8)
  assert Layout.parse("dp=2,tp=4") == Layout.dp_tp(2, 4) == Layout.parse(" tp=4 , dp=2 ")
  assert Layout.parse("tp=1").num_devices == 1
  assert str(Layout.dp_tp(2, 4)) == "dp=2,tp=4" and str(Layout.tp(8)) == "tp=8"
  assert Layout.tp(8).rules is MEGATRON


@pytest.mark.parametrize(
  ("text", "message"),
  [
    ("", "bad piece ''"),
    ("tp", "bad piece 'tp'"),
    ("pp=2", "bad piece 'pp=2'"),
    ("tp=x", "bad piece 'tp=x'"),
    ("tp=0", "bad piece 'tp=0'"),
    ("dp=2;tp=4", "bad piece 'dp=2;tp=4'"),
    ("tp=2,tp=4", "tp is given twice"),
  ],
)
def test_layout_parse_rejects(text, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    Layout.parse(text)


def test_make_mesh():
  mesh = Layout.dp_tp(2, 4).make_mesh()
  assert mesh.axis_names == ("data", "model") and dict(mesh.shape) == {"data": 2, "model": 4}
  assert Layout.tp(3).make_mesh().devices.size == 3
  with pytest.raises(ValueError, match="needs 16 devices, found 8"):
    Layout.tp(16).make_mesh()


def test_spec_for_megatron_and_fallback():
  mesh = Layout.tp(4).make_mesh()
  wq = ("layers", "embed", "heads", "head_dim")
  assert spec_for(wq, MEGATRON, (30, 576, 8, 64), mesh) == P(None, None, "model", None)
  assert spec_for(wq, MEGATRON, (30, 576, 9, 64), mesh) == P(None, None, None, None)  # 4 ∤ 9
  assert spec_for(("layers", "mlp", "embed"), MEGATRON, (30, 1536, 576), mesh) == P(
    None, "model", None
  )
  assert spec_for(("vocab", "embed"), MEGATRON, (49152, 576), mesh) == P(None, None)


def test_rules_reject_collisions_and_unknown_axes():
  mesh = Layout.tp(2).make_mesh()
  greedy = Rules(embed="model", mlp="model")
  with pytest.raises(ValueError, match="'embed' and 'mlp' .* both map to mesh axis 'model'"):
    spec_for(("layers", "embed", "mlp"), greedy, (30, 576, 1536), mesh)
  with pytest.raises(ValueError, match="unknown logical axis 'experts'"):
    spec_for(("experts",), MEGATRON, (8,), mesh)
  with pytest.raises(ValueError, match="not an axis of mesh"):
    spec_for(("mlp",), Rules(mlp="tensor"), (8,), mesh)


def test_cache_and_batch_shardings():
  shape = (30, 16, 8, 3, 64)  # [L, N, Z, K, D]
  for layout, spec in [("tp=3", P(None, None, None, "model", None)), ("tp=4", P(*[None] * 5))]:
    lay = Layout.parse(layout)
    assert kv_cache_sharding(shape, lay, lay.make_mesh()).spec == spec
  lay = Layout.dp_tp(2, 4)
  mesh = lay.make_mesh()
  assert batch_sharding(4, lay, mesh).spec == P("data")
  assert batch_sharding(1, lay, mesh).spec == P(None)  # 2 ∤ 1: replicated


def test_distributed_initialize_is_a_noop_for_one_process(monkeypatch):
  for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES):
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize() is False
  assert distributed.initialize(num_processes=1) is False
  monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
  with pytest.raises(ValueError, match="coordinator address"):
    distributed.initialize()


# --- A sharded model computes the single-device numbers ---


def test_weights_are_split(sharded, model):
  tp = sharded.layout.model
  split = set()
  for (name,), v in nnx.to_flat_state(sharded.state):
    array = v.get_value()
    assert len(array.addressable_shards) == sharded.layout.num_devices
    if array.addressable_shards[0].data.shape != array.shape:
      split.add(name)
  assert split == SPLIT[str(sharded.layout)]
  w_gate = sharded.state["w_gate"].get_value()  # [L, E, F]
  host = np.asarray(model.state["w_gate"].get_value())
  for shard in w_gate.addressable_shards:  # each device holds its own F/tp columns
    assert shard.data.shape == (30, 576, 1536 // tp)
    np.testing.assert_array_equal(np.asarray(shard.data), host[shard.index])


def test_logits_match_single_device(sharded, model, golden):
  for i in range(golden.n):
    ids = golden.case(i)["ids"]
    ref, got = model.logits(ids), sharded.logits(ids)
    np.testing.assert_allclose(got, ref, atol=ATOL)
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))


@functools.partial(jax.jit, static_argnums=0, donate_argnames="cache")
def step(graphdef, state, cache, tokens, positions, page_table, logits_at):
  """The engine's step without sampling: (logits [B, V], cache)."""
  return nnx.merge(graphdef, state)(tokens, positions, cache, page_table, logits_at=logits_at)


def paged_run(m: Model, prompts: list[np.ndarray], page_size=8) -> np.ndarray:
  """Prefill of the prompts into a paged cache, then one greedy decode step: logits [2, B, V]."""
  B, T = len(prompts), max(len(p) for p in prompts)
  pages = -(-(T + 1) // page_size)  # per sequence, room for the decoded token
  cache = KVCache.zeros(m.config, num_pages=1 + B * pages, page_size=page_size)
  page_table = 1 + np.arange(B * pages, dtype=np.int32).reshape(B, pages)  # page 0: the sink
  tokens = np.zeros((B, T), np.int32)
  positions = np.full((B, T), -1, np.int32)
  for b, p in enumerate(prompts):
    tokens[b, : len(p)], positions[b, : len(p)] = p, np.arange(len(p))
  lengths = np.array([len(p) for p in prompts], np.int32)
  put = lambda x: x  # noqa: E731
  if m.mesh is not None:
    cache = jax.device_put(cache, kv_cache_sharding(cache.k.shape, m.layout, m.mesh))
    put = lambda x: jax.device_put(x, batch_sharding(B, m.layout, m.mesh))  # noqa: E731
  prefill, cache = step(
    m.graphdef, m.state, cache, put(tokens), put(positions), put(page_table), put(lengths - 1)
  )
  next_ids = np.asarray(prefill).argmax(-1).astype(np.int32)[:, None]  # [B, 1]
  decode, _ = step(
    m.graphdef, m.state, cache, put(next_ids), put(lengths[:, None]), put(page_table),
    put(np.zeros(B, np.int32)),
  )  # fmt: skip
  return np.stack([np.asarray(prefill), np.asarray(decode)])


def test_paged_cache_forward_matches_single_device(sharded, model, golden):
  prompts = [golden.case(i)["ids"] for i in range(4)]
  ref, got = paged_run(model, prompts), paged_run(sharded, prompts)
  np.testing.assert_allclose(got, ref, atol=ATOL)
  np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
  # and the prefill agrees with the no-cache reference path
  np.testing.assert_allclose(ref[0, 0], model.logits(prompts[0])[-1], atol=ATOL)


# The whole engine, on every layout but tp=4: its pool is placed as tp=8's (3 kv heads do not
# split four ways) and its MLP split four ways as dp=2,tp=4's, which both run the engine.
ENGINE_LAYOUTS = [p for p in LAYOUTS if p != "tp=4"]


@pytest.mark.parametrize("sharded", ENGINE_LAYOUTS, indirect=True)
def test_engine_greedy_matches_single_device(sharded, llm, model, golden):
  """The whole engine on a sharded model (pool split by the rules, rows over `data`) gives
  exactly the single-device tokens."""
  prompts = [golden.case(i)["ids"].tolist() for i in range(golden.n)]
  params = SamplingParams(max_tokens=16)
  want = llm.generate(prompts, params)
  engine = LLM(sharded, EngineConfig(num_pages=64, max_model_len=256, max_batch=8))
  assert engine.runner.cache.k.sharding == kv_cache_sharding(
    engine.runner.cache.k.shape, sharded.layout, sharded.mesh
  )
  replicas = []
  if sharded.layout.data > 1:  # each data replica keeps its own requests' pages
    allocator = engine.engine.allocator
    assert isinstance(allocator, ReplicaAllocator)
    assert engine.runner.cache.k.sharding.spec[1] == "data"
    match = allocator.match_prefix

    def spy(request_id, *args, **kw):
      cached = match(request_id, *args, **kw)
      replicas.append(allocator.replica_of(request_id))
      return cached

    allocator.match_prefix = spy
  got = engine.generate(prompts, params)
  assert [g.token_ids for g in got] == [w.token_ids for w in want]
  if sharded.layout.data > 1:
    assert set(replicas) == {0, 1}  # both replicas served some of the prompts
    assert engine.engine.allocator.num_free == 64 - 2  # every page back; a sink per replica
    # The compiled steps move no KV between replicas: besides the blocks' all-reduces, no
    # collective carries as much as one page (what is gathered is the sampled rows).
    page = math.prod(engine.runner.cache.k.shape[2:])
    for executable in engine.runner.executables.values():
      moved = [
        (op, shape) for op, shape in _collectives(executable.as_text())
        if op != "all-reduce" and _elements(shape) >= page
      ]  # fmt: skip
      assert not moved, moved


def test_load_model_with_layout(model, golden):
  assert model.layout is None and model.mesh is None
  m = load_model(layout="tp=4")
  assert m.layout == Layout.tp(4) and dict(m.mesh.shape) == {"data": 1, "model": 4}
  expected = param_shardings(m.state, m.layout, m.mesh)
  for (name,), v in nnx.to_flat_state(m.state):
    assert v.get_value().sharding == expected[name], name
  ids = golden.case(0)["ids"]
  np.testing.assert_allclose(m.logits(ids), model.logits(ids), atol=ATOL)


# --- The compiled decode step holds only the expected collectives ---


def _collectives(hlo: str) -> list[tuple[str, str]]:
  """(op, result shape) of every collective in HLO text."""
  ops = r"(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?"
  return [(op, shape) for shape, op in re.findall(rf"= (\w+\[[\d,]*\])\S* {ops}\(", hlo)]


def _elements(shape: str) -> int:
  """Elements of an HLO result shape such as bf16[8,20]."""
  return math.prod(int(d) for d in re.findall(r"\d+", shape.split("[", 1)[1]))


def _loop_bodies(hlo: str) -> list[str]:
  """The body computation of every while loop: the layer scan, and the decode attention's scan
  over pages nested in it."""
  names = re.findall(r" while\(.*?body=%?([\w.\-]+)", hlo)
  return [re.search(rf"^%?{re.escape(n)} .*?^\}}", hlo, re.M | re.S).group(0) for n in names]


@pytest.mark.parametrize(("layout", "per_layer"), [("tp=4", 1), ("tp=3", 2)])
def test_decode_step_collectives(model, layout, per_layer):
  """Megatron: one all-reduce of [B, T, E] per split block (the MLP; also attention under
  tp=3); nothing outside the layer loop, and no weight is ever gathered."""
  lay = Layout.parse(layout)
  mesh = lay.make_mesh()
  abstract = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
  state = jax.tree.map(
    lambda v, s: v.replace(abstract(v.get_value(), s)),
    model.state,
    param_shardings(model.state, lay, mesh),
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )
  cache = KVCache.zeros(model.config, num_pages=16, page_size=8)
  cache = jax.tree.map(lambda x: abstract(x, kv_cache_sharding(x.shape, lay, mesh)), cache)
  B = 2
  ints = lambda *shape: abstract(np.zeros(shape, np.int32), batch_sharding(B, lay, mesh))  # noqa: E731
  hlo = (
    step.lower(model.graphdef, state, cache, ints(B, 1), ints(B, 1), ints(B, 4), ints(B))
    .compile()
    .as_text()
  )
  E = model.config.embed_dim
  per_loop = [_collectives(body) for body in _loop_bodies(hlo)]
  # One loop body (the layer scan) holds the block all-reduces; no other loop has any.
  assert sorted(per_loop, key=len)[-1] == [("all-reduce", f"f32[{B},1,{E}]")] * per_layer
  assert sum(map(len, per_loop)) == per_layer
  assert len(_collectives(hlo)) == per_layer  # all of them inside the layer loop


# --- Orbax checkpoints ---


def test_checkpoint_restores_into_another_layout(model, golden, tmp_path, monkeypatch):
  import orbax.checkpoint as ocp

  dst = ckpt.save_checkpoint(reshard(model, "tp=1"), tmp_path / "ckpt")
  assert ckpt.is_checkpoint(dst)
  targets = []
  restore = ocp.StandardCheckpointer.restore

  def spy(self, directory, target=None, **kw):
    targets.append(target)
    return restore(self, directory, target, **kw)

  monkeypatch.setattr(ocp.StandardCheckpointer, "restore", spy)
  m = load_model(str(dst), layout="tp=4")
  assert m.config == model.config and m.layout == Layout.tp(4)
  expected = param_shardings(m.state, m.layout, m.mesh)
  # Orbax was handed the target sharding of every array, and the arrays came back in it with
  # each device holding exactly its own slice.
  (target,) = targets
  assert {k: (v.shape, v.sharding) for k, v in target.items()} == {
    name: (v.get_value().shape, expected[name]) for (name,), v in nnx.to_flat_state(m.state)
  }
  for (name,), v in nnx.to_flat_state(m.state):
    array, host = v.get_value(), np.asarray(model.state[name].get_value())
    assert array.sharding == expected[name], name
    for shard in array.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), host[shard.index])
  assert m.state["w_gate"].get_value().addressable_shards[0].data.shape == (30, 576, 384)
  ids = golden.case(1)["ids"]
  np.testing.assert_array_equal(m.logits(ids), reshard(model, "tp=4").logits(ids))
  # Without a layout it restores onto one device, with the same numbers as the GGUF model.
  single = load_model(str(dst))
  assert single.mesh is None
  np.testing.assert_array_equal(single.logits(ids), model.logits(ids))


def test_checkpoint_carries_the_tokenizer(model, golden, tmp_path):
  ckpt.save_checkpoint(model, tmp_path)  # an existing empty directory is fine
  config, tok = ckpt.read_meta(tmp_path)
  assert config == model.config
  for i in range(golden.n):
    case = golden.case(i)
    if case["kind"] == "chat":
      messages = golden.messages(i)
      text = tok.apply_chat_template(messages)
      assert text == model.tokenizer.apply_chat_template(messages)
    else:
      text = case["source"]
    assert tok.encode(text) == model.tokenizer.encode(text) == list(case["ids"])
    assert tok.decode(case["greedy"]) == case["greedy_text"]
  with pytest.raises(ValueError, match="not an empty directory"):
    ckpt.save_checkpoint(model, tmp_path)
