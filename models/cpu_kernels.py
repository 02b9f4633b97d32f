"""The compiled CPU decode-attention kernel (`paged_decode_cpu.cc`), called from jit via XLA FFI.

XLA:CPU runs the page walk of `xla_paged_decode_attention` as many small gathers and
reductions; the C++ kernel reads each page once, with every head, and is 2-3x faster at decode
batch sizes (`scripts/bench_cpu_attention.py`). It is built at first use with the machine's
C++ compiler ($CXX, else g++ or c++) against jaxlib's FFI headers, and cached under
$MESHSERVE_CACHE (default ~/.cache/meshserve) by source, jaxlib version, compiler and CPU.
Where no compiler is found, or the build fails, `available()` is False and the model keeps the
XLA path.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import jaxlib

log = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_name("paged_decode_cpu.cc")
TARGETS = {  # the kernel's FFI target per pool dtype, and its handler symbol in the library
  jnp.dtype(jnp.float32): ("meshserve_paged_decode", "MeshservePagedDecode"),
  jnp.dtype(jnp.bfloat16): ("meshserve_paged_decode_bf16", "MeshservePagedDecodeBf16"),
  jnp.dtype(jnp.uint16): ("meshserve_paged_decode_bf16_bits", "MeshservePagedDecodeBf16Bits"),
}
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fPIC", "-shared", "-std=c++17", "-pthread")


class BuildError(RuntimeError):
  pass


def compiler() -> str | None:
  """The C++ compiler the kernel is built with: $CXX, else g++ or c++ on PATH."""
  return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def cache_dir() -> pathlib.Path:
  """Where meshserve keeps what it builds once: $MESHSERVE_CACHE, else ~/.cache/meshserve."""
  return pathlib.Path(os.environ.get("MESHSERVE_CACHE", pathlib.Path.home() / ".cache/meshserve"))


def build() -> pathlib.Path:
  """The kernel's shared library, compiled now unless the cache has it. Raises BuildError."""
  cxx = compiler()
  if cxx is None:
    raise BuildError("no C++ compiler found (set CXX, or install g++)")
  key = hashlib.sha256()
  for part in (SOURCE.read_bytes(), jaxlib.__version__, cxx, *FLAGS, _cpu_model()):
    key.update(part if isinstance(part, bytes) else part.encode())
  cache = cache_dir()
  library = cache / f"paged_decode_cpu-{key.hexdigest()[:16]}.so"
  if library.exists():
    return library
  cache.mkdir(parents=True, exist_ok=True)
  # Processes started together (a router's workers, a test run's) build it once: the others
  # wait for the first, then find its library.
  with open(cache / f"{library.name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not library.exists():
      _compile(cxx, library)
  return library


def _compile(cxx: str, library: pathlib.Path) -> None:
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
    out = pathlib.Path(tmp) / library.name
    command = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(out)]
    try:
      result = subprocess.run(command, capture_output=True, text=True)
    except OSError as e:
      raise BuildError(f"{cxx}: {e}") from e
    if result.returncode != 0:
      raise BuildError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    out.replace(library)  # atomic: a concurrent build finds a whole file or none
  seconds = time.perf_counter() - start
  log.info("compiled the CPU paged-decode kernel in %.1fs: %s", seconds, library)


@functools.cache
def available() -> bool:
  """Whether the kernel is built (or cached) and registered with XLA:CPU."""
  try:
    library = ctypes.cdll.LoadLibrary(str(build()))
  except (BuildError, OSError) as e:
    log.warning("CPU paged-decode kernel unavailable, decode attention stays on XLA: %s", e)
    return False
  for target, symbol in TARGETS.values():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  return True


def paged_decode_attention(
  q: jax.Array,  # [B, 1, H, D]: each sequence's newest token
  k: jax.Array,  # [L, N, Z, K, D] float32, bfloat16 or its uint16 bits: the whole pool
  v: jax.Array,  # [L, N, Z, K, D], k's dtype
  layer: jax.Array,
  positions: jax.Array,  # [B, 1]; -1 = padding row
  page_table: jax.Array,  # [B, P]
  window: jax.Array | int | None = None,  # the newest `window` keys only
) -> jax.Array:
  """The same result as `xla_paged_decode_attention`, through the compiled kernel."""
  if not available():
    raise BuildError("the CPU paged-decode kernel is not available (see the log)")
  B, _, H, D = q.shape
  lengths = jnp.maximum(positions[:, 0] + 1, 0).astype(jnp.int32)  # keys [0, length) exist
  starts = jnp.zeros_like(lengths) if window is None else jnp.maximum(lengths - window, 0)
  target, _ = TARGETS[jnp.dtype(k.dtype)]
  call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((B, H, D), jnp.float32))
  out = call(
    q[:, 0].astype(jnp.float32) * (D**-0.5),
    k,
    v,
    jnp.asarray(layer, jnp.int32),
    page_table.astype(jnp.int32),
    starts.astype(jnp.int32),  # each row sees keys [start, length)
    lengths,
  )
  return out[:, None].astype(q.dtype)
