import atexit
import json
import os
import pathlib
import shutil
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The TPU compiles (libtpu, no chips) take libtpu's process lock; a second test run or a layout
# explorer on this machine then fails to load it. Compiling only, there are no chips to share.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Eight fake CPU devices for the sharding tests, whatever else XLA_FLAGS already says.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  os.environ["XLA_FLAGS"] = flags.strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data"
# scripts/serving.py, the process launcher the benchmarks use too, imports as `serving`.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
pytest_plugins = ("topologies",)  # the server topologies' fixtures (stub, offline)


class Golden:
  """tests/data/*.npz: HF transformers float32 on the same GGUF weights (layout: the README in
  the golden data's source folder; one per model)."""

  def __init__(self, path: pathlib.Path):
    self.d = np.load(path)
    self.n, self.ntok = int(self.d["n"]), int(self.d["ntok"])

  def __getitem__(self, key):
    return self.d[key]

  def case(self, i: int) -> dict:
    arrays = ("ids", "top_ids", "top_logits", "last_logits", "greedy")
    strings = ("kind", "source", "greedy_text")
    return {k: self.d[f"{i}_{k}"] for k in arrays} | {k: str(self.d[f"{i}_{k}"]) for k in strings}

  def chat_cases(self):
    return [i for i in range(self.n) if str(self.d[f"{i}_kind"]) == "chat"]

  def messages(self, i: int) -> list[dict]:
    return json.loads(str(self.d[f"{i}_source"]))


@pytest.fixture(scope="session")
def golden() -> Golden:
  return Golden(DATA / "smollm2_135m_instruct.npz")


@pytest.fixture(scope="session")
def model():
  from meshserve.models import load_model

  return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma_golden() -> Golden:
  return Golden(DATA / "gemma3_270m.npz")


@pytest.fixture(scope="session")
def gemma():
  """Gemma 3 270M: sliding-window and global layers, QK-norm, GeGLU, a 262k vocabulary."""
  from meshserve.models import load_model

  return load_model("gemma3-270m")


def variant(model, attention=None, **config):
  """The same weights under another attention backend or config (e.g. a smaller window),
  without loading them again."""
  import dataclasses

  from flax import nnx

  from meshserve.models import AttentionBackend, Model

  module = nnx.merge(model.graphdef, model.state)
  if attention is not None:
    module.attention = AttentionBackend(attention) if isinstance(attention, str) else attention
  module.cfg = dataclasses.replace(model.config, **config)
  return Model(module.cfg, model.tokenizer, module, model.layout, model.mesh)


@pytest.fixture(scope="session")
def stage_models():
  """The default model twice, as a disaggregated server runs it on 8 devices: prefill tp=2 on
  devices 0-1, decode tp=4 on devices 2-5."""
  from meshserve.models import load_model
  from meshserve.sharding import Layout, split_devices

  layouts = Layout.parse("tp=2"), Layout.parse("tp=4")
  devices = split_devices(*layouts)
  return tuple(load_model(layout=lay, devices=d) for lay, d in zip(layouts, devices, strict=True))


@pytest.fixture(scope="session")
def compilation_cache() -> pathlib.Path:
  """The JAX compilation cache of this test run: its servers' and CLI runs', and this
  process's own, so a step one of them compiled the others load."""
  return CACHE


def _cache_root() -> pathlib.Path:
  """What meshserve caches, for this test run only ($MESHSERVE_CACHE of every process it
  starts): the JAX compilation cache and the CPU kernel it builds. scripts/test gives both of
  its pytest processes one ($MESHSERVE_TEST_CACHE), so the slow cases load what the others
  compiled; never the user's ~/.cache/meshserve."""
  import tempfile

  import jax

  root = os.environ.get("MESHSERVE_TEST_CACHE")
  if not root:  # this process's own, gone with it
    root = tempfile.mkdtemp(prefix="meshserve-test-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
  os.environ["MESHSERVE_CACHE"] = root
  jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(root) / "jax"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return pathlib.Path(root) / "jax"


CACHE = _cache_root()


@pytest.fixture(scope="session")
def router_topology(tmp_path_factory, compilation_cache):
  """A router over a prefill and a decode worker, shared by the two files that test it
  (tests/topologies.py); the last of them stops it with SIGTERM."""
  from topologies import start, start_router_topology

  logs = tmp_path_factory.mktemp("router")
  t = start_router_topology(logs, compilation_cache)
  t.name, t.logs, t.cache = "router", logs, compilation_cache
  try:
    yield start(t)
  finally:
    t.stop()


@pytest.fixture(scope="session")
def llm(model):
  from meshserve.engine import LLM, EngineConfig

  return LLM(model, EngineConfig(num_pages=256, max_model_len=512, max_batch=8))


def first_near_tie(model, prompt_ids, continuation, margin=1e-3) -> int:
  """Index of the first continuation token whose top-2 logit margin is below `margin`:
  past it, float rounding may legitimately pick the other token."""
  ids = list(prompt_ids) + list(continuation)
  logits = model.logits(ids)[len(prompt_ids) - 1 : len(ids) - 1]  # predicts each continuation token
  top2 = np.sort(logits, axis=-1)[:, -2:]
  close = np.nonzero(top2[:, 1] - top2[:, 0] < margin)[0]
  return int(close[0]) if close.size else len(continuation)


def assert_greedy_equal(model, prompt, expected, got):
  """Greedy token ids equal, except past a reference near-tie where either pick is right."""
  if got == expected:
    return
  differ = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b), None)
  if differ is None:  # one is a prefix of the other: a finish differs
    assert len(expected) == len(got), (expected, got)
    return
  assert differ >= first_near_tie(model, prompt, expected), (differ, expected, got)


def pytest_xdist_make_scheduler(config, log):
  """scripts/test runs the suite on two pytest-xdist workers. A file's cases run on one worker,
  so its module fixtures (a server, an engine) start once, and the two files over the router
  topology (a session fixture of three processes) share one, so it starts once."""
  from xdist.scheduler import LoadScopeScheduling

  class ByFile(LoadScopeScheduling):
    def _split_scope(self, nodeid: str) -> str:
      file = nodeid.split("::", 1)[0]
      return "router topology" if "/test_server_disaggregated" in file else file

  return ByFile(config, log)


def penalized_greedy(model, prompts, params, n: int) -> list[tuple[list[int], list[float]]]:
  """Greedy decoding under `params`' penalties on the no-cache forward, with the penalties in
  numpy: for each prompt, (its n tokens, each step's margin between the two best penalized
  logits). Every prompt and step is padded to one length (the forward is causal, so what
  follows a position never changes its logits): one compile."""
  width = max(map(len, prompts)) + n
  out = []
  for prompt in prompts:
    ids, tokens, margins = list(prompt), [], []
    for _ in range(n):
      logits = model.logits(ids + [0] * (width - len(ids)))[len(ids) - 1].astype(np.float64)
      rep = params.repetition_penalty
      for t in set(ids):
        logits[t] = logits[t] / rep if logits[t] > 0 else logits[t] * rep
      for t in set(tokens):
        logits[t] -= params.presence_penalty + params.frequency_penalty * tokens.count(t)
      second, first = np.sort(logits)[-2:]
      margins.append(first - second)
      tokens.append(int(logits.argmax()))
      ids.append(tokens[-1])
    out.append((tokens, margins))
  return out


def assert_equal_until_a_near_tie(want, margins, got, margin=1e-3):
  """Token ids equal, except from a step where the reference's best two were within `margin`
  (float rounding between paths may pick either)."""
  for i, (a, b) in enumerate(zip(want, got, strict=False)):
    if a != b:
      assert margins[i] < margin, (i, margins[i], want, got)
      return
  assert len(want) == len(got), (want, got)
