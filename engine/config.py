"""`EngineConfig` and the shape buckets it implies."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


def _powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
  out, b = [], lo
  while b < hi:
    out.append(b)
    b *= 2
  return (*out, hi)


@dataclasses.dataclass(frozen=True, slots=True)
class EngineConfig:
  """Memory, batching and shape budget of the engine."""

  page_size: int = 16  # tokens per KV page
  num_pages: int = 1024  # pages in the pool, shared by all running requests (page 0 reserved)
  max_model_len: int = 2048  # prompt + generated tokens of one request
  max_batch: int = 32  # requests running at once
  max_num_batched_tokens: int = 512  # token budget of one step (prefill chunks + decodes)
  max_prefill_seqs: int = 8  # prefill chunks in one step
  min_prefill: int = 16  # smallest prefill bucket
  prefix_caching: bool = True
  seed: int = 0  # requests without a seed get one drawn from this, in arrival order
  # Tokens per prefill row: a chunk is laid out as rows of this many tokens, so a step pads
  # each prompt by less than a row, not to the longest one. 0: one row per chunk (a fresh
  # prompt then takes the flash kernel on TPU). None: `min_prefill` tokens, except on TPU
  # (resolved for the model's platform by the Engine: `for_platform`).
  prefill_segment: int | None = None

  def __post_init__(self):
    for name in (
      "page_size", "num_pages", "max_model_len", "max_batch", "max_num_batched_tokens",
      "max_prefill_seqs", "min_prefill",
    ):  # fmt: skip
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.prefill_segment is not None and not 0 <= self.prefill_segment <= min(
      self.max_num_batched_tokens, self.max_model_len
    ):
      raise ValueError(
        f"prefill_segment must lie in [0, min(max_num_batched_tokens, max_model_len)], got "
        f"{self.prefill_segment}"
      )
    if self.max_model_len % self.page_size:
      raise ValueError("max_model_len must be a multiple of page_size")
    if self.num_pages - 1 < self.max_model_len // self.page_size:
      raise ValueError(
        f"num_pages: {self.num_pages} pages (one reserved) cannot hold one request of "
        f"max_model_len {self.max_model_len} tokens"
      )

  @property
  def batch_buckets(self) -> tuple[int, ...]:
    return _powers_of_two(1, self.max_batch)

  @property
  def prefill_buckets(self) -> tuple[int, ...]:  # tokens per prefill chunk
    longest = min(self.max_num_batched_tokens, self.max_model_len)
    return _powers_of_two(min(self.min_prefill, longest), longest)

  @property
  def prefill_row_buckets(self) -> tuple[int, ...]:  # prefill chunks are running requests
    return _powers_of_two(1, min(self.max_prefill_seqs, self.max_batch))

  @property
  def segment(self) -> int:
    """Tokens per prefill row; 0 for one row per chunk. The Engine resolves None for its
    model's platform (`for_platform`); an unresolved config takes JAX's default backend."""
    if self.prefill_segment is not None:
      return self.prefill_segment
    import jax

    return self.for_platform(jax.default_backend()).prefill_segment

  @property
  def segment_row_buckets(self) -> tuple[int, ...]:
    """Rows of a segmented prefill call: powers of two up to 8, then every 8 (padding a call
    by at most 7 rows), as far as the token budget holds. Every bucket from 8 rows up is a
    multiple of 8, so it splits evenly over up to 8 data-parallel replicas."""
    most = max(1, self.max_num_batched_tokens // self.segment)
    small = [b for b in (1, 2, 4, 8) if b <= most]
    return (*small, *range(16, most + 1, 8))

  def for_platform(self, platform: str) -> EngineConfig:
    """This config with `prefill_segment` resolved for a model on `platform` (None: rows of
    `min_prefill` tokens, except on TPU, where a chunk keeps one row)."""
    if self.prefill_segment is not None:
      return self
    segment = 0 if platform == "tpu" else min(self.min_prefill, self.prefill_buckets[-1])
    return dataclasses.replace(self, prefill_segment=segment)

  @property
  def page_buckets(self) -> tuple[int, ...]:  # pages per sequence
    return _powers_of_two(1, self.max_model_len // self.page_size)

  def step_shape(
    self, lengths: Sequence[int], pages: Sequence[int], *, prefill: bool, rows: int | None = None
  ) -> tuple[int, int, int]:
    """The (B, T, P) of a call over chunks of these token `lengths` whose page tables hold
    `pages` pages, in `rows` rows (default: one a chunk)."""
    rows = len(lengths) if rows is None else rows
    if not prefill:
      return bucket(rows, self.batch_buckets), 1, self.page_buckets[-1]
    if self.segment:  # `rows` counts segments
      return (
        bucket(rows, self.segment_row_buckets),
        self.segment,
        bucket(max(pages), self.page_buckets),
      )
    B = bucket(rows, self.prefill_row_buckets)
    return B, bucket(max(lengths), self.prefill_buckets), bucket(max(pages), self.page_buckets)

  @property
  def step_shapes(self) -> tuple[tuple[int, int, int], ...]:
    """Every (rows B, tokens T, pages P) step shape the engine can dispatch, so all of them
    can be compiled before serving.

    Segmented prefill ([R, segment]) takes every row bucket with every page bucket.
    Decode ([B, 1]) always takes the full page-table width: decode attention walks each row
    only as far as its length, so padding the table costs nothing and saves a dimension.
    Prefill ([R, T]) keeps a P bucket, since prefill attention reads every listed page; the
    smallest P is the one the shortest chunk that rounds up to T can need."""
    shapes = [(b, 1, self.page_buckets[-1]) for b in self.batch_buckets]
    if self.segment:  # [R, segment] rows of any request, whatever its pages
      shapes += [(r, self.segment, p) for r in self.segment_row_buckets for p in self.page_buckets]
      return tuple(dict.fromkeys(shapes))
    previous = 1  # a one-token chunk is a decode
    for t in self.prefill_buckets:
      fewest_pages = bucket(-(-(previous + 1) // self.page_size), self.page_buckets)
      for r in self.prefill_row_buckets:
        if r * t <= self.max_num_batched_tokens:
          shapes += [(r, t, p) for p in self.page_buckets if p >= fewest_pages]
      previous = t
    return tuple(dict.fromkeys(shapes))  # with min_prefill 1, [R, 1] prefills are decodes


def bucket(n: int, buckets: tuple[int, ...]) -> int:
  for b in buckets:
    if n <= b:
      return b
  raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
