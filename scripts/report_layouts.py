"""The layout report: Llama-3-8B on a TPU v5e 2x4 slice under three layouts, compiled on this
machine (no TPU), written to scripts/results/layouts.{md,csv,png}; then the same layouts with
the vocabulary split over `model` (embedding and head), beside the default table in layouts.md.

  JAX_PLATFORMS=cpu .venv/bin/python scripts/report_layouts.py   # ~7 minutes on 2 cores
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: no chips to share
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from meshserve.server import explorer  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parent / "results"
MODEL, TARGET, LAYOUTS = "llama3-8b", "tpu:v5e:2x4", ["tp=8", "dp=2,tp=4", "dp=4,tp=2"]


def main() -> None:
  shape = explorer.ServingShape(batch=64, context=2048)
  reports = explorer.explore(MODEL, TARGET, LAYOUTS, shape)
  table = explorer.format_table(reports, shape, TARGET)
  print(table)
  vocab = dataclasses.replace(explorer.MEGATRON, vocab="model")
  split = explorer.format_table(
    explorer.explore(MODEL, TARGET, LAYOUTS, shape, rules=vocab), shape, TARGET
  )
  print(split)
  OUT.mkdir(exist_ok=True)
  (OUT / "layouts.md").write_text(
    f"{MODEL}, bfloat16, default rules (vocabulary replicated)\n\n{table}\n\n"
    f"{MODEL}, bfloat16, rules with the vocabulary split over `model`\n\n{split}\n"
  )
  explorer.write_csv(reports, OUT / "layouts.csv")
  explorer.plot(reports, str(OUT / "layouts.png"))


if __name__ == "__main__":
  main()
