"""The explorer's reports as a table, a CSV and a plot, and a check of layouts on real weights."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from meshserve.server.explorer.compile import LayoutReport
from meshserve.server.explorer.targets import ServingShape


def ranked(reports: list[LayoutReport]) -> list[LayoutReport]:
  """Layouts that work, fewest decode bytes per output token first (decode is bound by HBM
  bandwidth: what a token moves is what it costs), then fewest FLOPs per token; the rest after,
  in their order."""
  ok = [r for r in reports if not (r.error or r.overflow) and r.decode.bytes_accessed]
  ok.sort(key=lambda r: (r.per_token(r.decode.bytes_accessed), r.per_token(r.decode.flops) or 0))
  return ok + [r for r in reports if r not in ok]


def format_table(reports: list[LayoutReport], shape: ServingShape, target: str) -> str:
  """A Markdown table, one row per layout, ranked (see `ranked`)."""
  gib = lambda b: f"{b / (1 << 30):.2f}"  # noqa: E731
  ms = lambda s: "-" if s is None else f"{s * 1e3:.2f}"  # noqa: E731
  head = [
    "rank", "layout", "weights GiB/dev", "KV GiB/dev", "temp GiB/dev", "fits", "max batch",
    "max context", "decode collectives", "MiB/token", "GFLOP/token", "cost model ms",
    "roofline ms", "cost/roofline", "step ms", "tok/s/chip", "compile s",
  ]  # fmt: skip
  lines = [
    f"{target}, decode batch {shape.batch} x context {shape.context}, prefill {shape.prefill}",
    "",
    "| " + " | ".join(head) + " |",
    "|" + "---|" * len(head),
  ]
  for rank, r in enumerate(ranked(reports), 1):
    if r.error:
      lines.append(f"| - | {r.layout} | " + f"cannot work: {r.error} |" + " |" * (len(head) - 3))
      continue
    if r.overflow:
      cells = ["-", r.layout, gib(r.weight_bytes), gib(r.kv_bytes), "-", f"NO: {r.overflow}"]
      lines.append("| " + " | ".join(cells) + " |" + " - |" * (len(head) - len(cells)))
      continue
    d = r.decode
    temp = max(d.temp_bytes, r.prefill.temp_bytes)
    coll = (
      ", ".join(
        f"{k} x{c} ({b / (1 << 20):.1f} MiB)" for k, (c, b) in sorted(d.collectives.items())
      )
      or "none"
    )
    per_byte, per_flop = r.per_token(d.bytes_accessed), r.per_token(d.flops)
    cells = [
      str(rank) if per_byte else "-", r.layout, gib(r.weight_bytes), gib(r.kv_bytes), gib(temp),
      "-" if r.fits is None else ("yes" if r.fits else "NO: over HBM"),
      _maybe(r.max_batch), _maybe(r.max_context), coll,
      "-" if per_byte is None else f"{per_byte / (1 << 20):.1f}",
      "-" if per_flop is None else f"{per_flop / 1e9:.1f}",
      ms(d.seconds), ms(r.roofline_s),
      "-" if not (d.seconds and r.roofline_s) else f"{d.seconds / r.roofline_s:.2f}x",
      ms(r.step_s),
      "-" if r.tokens_per_s_per_chip is None else f"{r.tokens_per_s_per_chip:.0f}",
      f"{d.compile_s + r.prefill.compile_s:.0f}",
    ]  # fmt: skip
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_csv(reports: list[LayoutReport], path) -> None:
  import csv

  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow([
      "layout", "error", "weight_bytes", "kv_bytes", "temp_bytes", "fits", "max_batch",
      "max_context", "decode_collectives", "decode_bytes_per_token", "decode_flops_per_token",
      "decode_cost_model_s", "min_bytes", "roofline_s", "step_s",
      "tokens_per_s_per_chip", "compile_s",
    ])  # fmt: skip
    for r in ranked(reports):
      if r.error or r.overflow:
        w.writerow([r.layout, r.error or r.overflow, r.weight_bytes, r.kv_bytes, "", r.fits])
        continue
      coll = ";".join(f"{k}:{c}:{b}" for k, (c, b) in sorted(r.decode.collectives.items()))
      w.writerow([
        r.layout, "", r.weight_bytes, r.kv_bytes, max(r.decode.temp_bytes, r.prefill.temp_bytes),
        r.fits, r.max_batch, r.max_context, coll, r.per_token(r.decode.bytes_accessed),
        r.per_token(r.decode.flops), r.decode.seconds, r.min_bytes, r.roofline_s,
        r.step_s, r.tokens_per_s_per_chip, r.decode.compile_s + r.prefill.compile_s,
      ])  # fmt: skip


def _maybe(x) -> str:
  return "-" if x is None else str(x)


def plot(reports: list[LayoutReport], path: str) -> None:
  """Memory per device (stacked) and decode step time per layout."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ok = [r for r in reports if not (r.error or r.overflow)]
  names = [r.layout for r in ok]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
  bottom = np.zeros(len(ok))
  for label, values in (
    ("weights", [r.weight_bytes for r in ok]),
    ("KV pool", [r.kv_bytes for r in ok]),
    ("temporaries", [max(r.decode.temp_bytes, r.prefill.temp_bytes) for r in ok]),
  ):
    gib = np.asarray(values) / (1 << 30)
    ax1.bar(names, gib, bottom=bottom, label=label)
    bottom += gib
  if ok and ok[0].hbm_bytes:
    ax1.axhline(ok[0].hbm_bytes / (1 << 30), color="red", linestyle="--", label="HBM")
  ax1.set(title="memory per device", ylabel="GiB")
  ax1.legend()
  steps = [(r.step_s or 0) * 1e3 for r in ok]
  roofs = [(r.roofline_s or 0) * 1e3 for r in ok]
  x = np.arange(len(ok))
  ax2.bar(x - 0.2, steps, width=0.4, label="predicted (cost model, at least the roofline)")
  ax2.bar(x + 0.2, roofs, width=0.4, label="HBM roofline")
  ax2.set_xticks(x, names)
  ax2.set(title="decode step", ylabel="ms")
  ax2.legend()
  for ax in (ax1, ax2):
    ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def verify(model: str, layouts: Sequence[str], prompts: Sequence[str], max_tokens: int = 16):
  """Runs each layout on this machine's devices with real weights and compares its greedy
  tokens with tp=1's: {layout: None if equal, else the first prompt index that differs}."""
  from meshserve.engine import LLM, EngineConfig, SamplingParams
  from meshserve.models import load_model

  config = EngineConfig(num_pages=256, max_model_len=512, max_batch=8)
  params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
  want = [
    o.token_ids for o in LLM(load_model(model, layout="tp=1"), config).generate(prompts, params)
  ]
  out = {}
  for text in layouts:
    got = [
      o.token_ids for o in LLM(load_model(model, layout=text), config).generate(prompts, params)
    ]
    out[text] = next((i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b), None)
  return out
