"""Per-request sampling parameters and the batched, jitted sampler.

Every row of a batch carries its own penalties, temperature, top-k, top-p, min-p and PRNG key,
so one compiled sampler serves any mix of requests. A request's key is derived from its seed
and the index of the token being sampled, never from its batch slot: the same seed and prompt
give the same output whatever else shares the batch.

Order of operations on a row's logits: a constraint's mask (structured output: tokens it does
not allow can never be drawn), repetition / presence / frequency penalties, then temperature,
then top-k, top-p and min-p, then the draw (argmax at temperature 0). Logprobs are those of the
model's own distribution (log_softmax of the raw logits, before the mask), as vLLM's default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from meshserve.engine.params import (  # noqa: F401 - re-exported
  MAX_LOGPROBS,
  MAX_STOP_STRING_CHARS,
  MAX_STOP_STRINGS,
  MAX_STOP_TOKEN_IDS,
  SamplingParams,
)


@dataclasses.dataclass(frozen=True)
class SamplingBatch:
  """SamplingParams of a batch as arrays, one row per slot (host side, numpy). The tokens a
  row's penalties count are not here: the step reads them on the device (`sample`'s history).
  """

  temperature: np.ndarray  # [B] float32
  top_k: np.ndarray  # [B] int32, 0 = off
  top_p: np.ndarray  # [B] float32
  min_p: np.ndarray  # [B] float32
  repetition_penalty: np.ndarray  # [B] float32
  presence_penalty: np.ndarray  # [B] float32
  frequency_penalty: np.ndarray  # [B] float32
  seed: np.ndarray  # [B] uint32
  logprobs: np.ndarray  # [B] int32: alternatives asked for, 0 = none
  prompt_len: np.ndarray  # [B] int32: the row's history from prompt_len on is output
  # [B, ceil(V/32)] int32: bit v % 32 of word v // 32 set where token v may be drawn; -1 (every
  # bit) on unconstrained rows. Its width is fixed (the vocabulary), so it adds no shape.
  allowed: np.ndarray

  @classmethod
  def build(
    cls,
    params: Sequence[SamplingParams],
    seeds: Sequence[int],
    batch: int,
    prompt_lens: Sequence[int] = (),
    mask_words: int = 1,
  ) -> SamplingBatch:
    """Rows for `params` (padded to `batch`); penalized rows need their `prompt_lens`. Every
    row may draw any token (`allowed`, of `mask_words` words a row, all set): the runner fills
    constrained rows' masks."""
    pad = batch - len(params)

    def column(name, fill, dtype):
      return np.array([getattr(p, name) for p in params] + [fill] * pad, dtype)

    lens = np.zeros(batch, np.int32)
    lens[: len(prompt_lens)] = prompt_lens
    return cls(
      temperature=column("temperature", 0.0, np.float32),
      top_k=column("top_k", 0, np.int32),
      top_p=column("top_p", 1.0, np.float32),
      min_p=column("min_p", 0.0, np.float32),
      repetition_penalty=column("repetition_penalty", 1.0, np.float32),
      presence_penalty=column("presence_penalty", 0.0, np.float32),
      frequency_penalty=column("frequency_penalty", 0.0, np.float32),
      seed=np.array(list(seeds) + [0] * pad, np.uint32),
      logprobs=np.array([p.logprobs or 0 for p in params] + [0] * pad, np.int32),
      prompt_len=lens,
      allowed=np.full((batch, mask_words), -1, np.int32),
    )


jax.tree_util.register_dataclass(
  SamplingBatch, data_fields=[f.name for f in dataclasses.fields(SamplingBatch)], meta_fields=[]
)


@dataclasses.dataclass(frozen=True)
class Sampled:
  """What the sampler returns per row (device arrays inside jit, numpy after the transfer)."""

  tokens: jax.Array  # [B] int32
  logprob: jax.Array  # [B] float32: log-probability of the chosen token
  top_ids: jax.Array  # [B, MAX_LOGPROBS] int32: the likeliest tokens (zeros unless asked)
  top_logprobs: jax.Array  # [B, MAX_LOGPROBS] float32


jax.tree_util.register_dataclass(
  Sampled, data_fields=["tokens", "logprob", "top_ids", "top_logprobs"], meta_fields=[]
)


def sample(
  logits: jax.Array,  # [B, V] float32
  params: SamplingBatch,
  step: jax.Array,  # [B] int32: index of the token being sampled within its request
  history: jax.Array | None = None,  # [B, W] int32: each row's tokens so far, -1 beyond
) -> Sampled:
  """Picks the next token of each row. Traced inside the model step, so sampling costs no host
  sync, and one compiled shape serves every mix of parameters. Penalties need the `history`
  (prompt, then output from `params.prompt_len` on); without one, no row may be penalized.

  The batch takes the cheapest branch that serves all its rows: argmax only; a draw from the
  full distribution; or the sort that top-k / top-p need (costly on CPU: ~10 ms a row).
  Penalties and the top alternatives' logprobs are computed only when some row asks.
  """
  raw = logits
  B, V = raw.shape

  def constrain(x):
    bits = (params.allowed[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [B, W, 32]
    return jnp.where(bits.reshape(B, -1)[:, :V] != 0, x, -jnp.inf)

  # A batch with no constrained row (every word -1) skips the mask entirely; one built
  # without mask words (narrower than the vocabulary) carries no constraint.
  if params.allowed.shape[1] * 32 >= V:
    logits = jax.lax.cond(jnp.any(params.allowed != -1), constrain, lambda x: x, logits)
  penalized = (
    (params.repetition_penalty != 1.0)
    | (params.presence_penalty != 0.0)
    | (params.frequency_penalty != 0.0)
  )
  if history is not None:
    logits = jax.lax.cond(
      jnp.any(penalized), lambda x: _apply_penalties(x, params, history), lambda x: x, logits
    )
  greedy = _argmax(logits)
  sampled = params.temperature > 0.0
  filtered = sampled & ((params.top_k > 0) | (params.top_p < 1.0))
  branch = jnp.where(jnp.any(filtered), 2, jnp.where(jnp.any(sampled), 1, 0))

  def draw_rows():
    scaled = logits / jnp.maximum(params.temperature, 1e-6)[:, None]
    masked = jax.lax.cond(
      branch == 2, lambda x: _top_k_top_p(x, params.top_k, params.top_p), lambda x: x, scaled
    )
    # min-p: keep tokens whose probability is at least min_p times the likeliest one's.
    cutoff = jnp.max(masked, axis=-1, keepdims=True) + jnp.log(params.min_p)[:, None]
    masked = jnp.where(masked >= cutoff, masked, -jnp.inf)

    def draw(seed, index, row):
      key = jax.random.fold_in(jax.random.key(seed), index)
      return jax.random.categorical(key, row)

    drawn = jax.vmap(draw)(params.seed, step, masked).astype(jnp.int32)
    return jnp.where(sampled, drawn, greedy)

  # An all-greedy batch (the common case) skips the scaling, filtering and draws entirely.
  tokens = jax.lax.cond(branch > 0, draw_rows, lambda: greedy)
  # log p(token) = logit - logsumexp: no [B, V] log_softmax unless alternatives are asked for.
  chosen = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(raw, axis=-1)
  n = min(MAX_LOGPROBS, V)

  def top(x):
    values, ids = jax.lax.top_k(jax.nn.log_softmax(x, axis=-1), n)
    return values, ids.astype(jnp.int32)

  def none(x):
    return jnp.zeros((B, n), x.dtype), jnp.zeros((B, n), jnp.int32)

  top_logprobs, top_ids = jax.lax.cond(jnp.any(params.logprobs > 0), top, none, raw)
  return Sampled(tokens, chosen, top_ids, top_logprobs)


def _argmax(x: jax.Array) -> jax.Array:
  """First index of each row's maximum, as `jnp.argmax`. Two plain reductions: XLA:CPU runs
  them ~5x faster than argmax's paired (value, index) reduction over a vocabulary."""
  V = x.shape[-1]
  top = jnp.max(x, axis=-1, keepdims=True)
  first = jnp.min(jnp.where(x == top, jnp.arange(V, dtype=jnp.int32), V), axis=-1)
  return jnp.minimum(first, V - 1)  # a NaN row has no index equal to its max


def _apply_penalties(logits: jax.Array, params: SamplingBatch, history: jax.Array) -> jax.Array:
  """Repetition penalty over prompt and output tokens; presence and frequency over output.
  history [B, W]: each row's tokens (-1 padding)."""
  B, V = logits.shape
  rows = jnp.broadcast_to(jnp.arange(B)[:, None], history.shape)
  ids = jnp.where(history >= 0, history, V)  # padding scatters out of bounds and is dropped
  is_output = jnp.arange(history.shape[1])[None, :] >= params.prompt_len[:, None]
  seen = jnp.zeros((B, V), bool).at[rows, ids].set(True, mode="drop")
  counts = jnp.zeros((B, V), jnp.float32).at[rows, ids].add(is_output, mode="drop")
  rep = params.repetition_penalty[:, None]
  logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
  logits -= params.frequency_penalty[:, None] * counts
  return logits - params.presence_penalty[:, None] * (counts > 0)


def _top_k_top_p(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """scaled [B, V] with every token outside the row's top-k and top-p set to -inf."""
  V = scaled.shape[-1]
  sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]  # [B, V] descending
  keep = jnp.arange(V)[None, :] < jnp.where(top_k > 0, top_k, V)[:, None]
  probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
  # Keep the smallest prefix whose mass reaches top_p (the first token always stays). A row
  # with top_p = 1 keeps everything: its float32 cumsum can reach 1.0 before the tail ends.
  keep &= ((jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]) | (top_p[:, None] >= 1.0)
  threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(scaled >= threshold, scaled, -jnp.inf)
