"""The wheel installs one top-level package, `meshserve`: the five code folders become
`meshserve.engine`, `.models`, `.sharding`, `.pallas_kernels` and `.server`, so nothing of ours can
shadow, or be shadowed by, a user's `models.py` or another wheel's `server/`."""

import ast
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = ("engine", "models", "sharding", "pallas_kernels", "server")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
  """Built from a copy of what the wheel is made of (a build/ left in the tree is not reused)."""
  src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, src)
  for folder in FOLDERS:
    shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
  subprocess.run(
    [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out,
     src],
    check=True, timeout=300,
  )  # fmt: skip
  (path,) = out.glob("meshserve-*.whl")
  return path


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> pathlib.Path:
  """The wheel installed into a folder of its own (no dependencies: those are the venv's)."""
  site = tmp_path_factory.mktemp("site")
  subprocess.run(
    [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel],
    check=True, timeout=300,
  )  # fmt: skip
  return site


def test_the_wheel_has_one_top_level_package_and_its_data(wheel):
  archive = zipfile.ZipFile(wheel)
  names = archive.namelist()
  dist_info = wheel.name.split("-py")[0] + ".dist-info"
  assert {n.split("/")[0] for n in names} == {"meshserve", dist_info}
  assert {n.split("/")[1] for n in names if n.startswith("meshserve/")} == set(FOLDERS)
  sources = {f"meshserve/{p.relative_to(ROOT)}" for f in FOLDERS for p in (ROOT / f).rglob("*.py")}
  assert sources <= set(names), f"modules left out of the wheel: {sources - set(names)}"
  for data in ("meshserve/models/paged_decode_cpu.cc",
               "meshserve/server/proto/meshserve/v1/inference.proto",
               "meshserve/server/proto/meshserve/v1/inference_pb2.pyi"):  # fmt: skip
    assert data in names
  entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
  assert "meshserve = meshserve.server.cli:main" in entry_points


def test_the_installed_wheel_imports_away_from_the_source_tree(site, tmp_path):
  code = (
    "import meshserve.engine, meshserve.server.servicer, meshserve.server.proto.meshserve.v1."
    "stages_pb2_grpc as s; print(meshserve.engine.__file__); print(s.__file__)"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=tmp_path,
    env={"PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"},
    check=True, capture_output=True, text=True, timeout=300,
  ).stdout.split()  # fmt: skip
  assert all(pathlib.Path(p).is_relative_to(site) for p in out), out


def test_every_import_of_our_packages_goes_through_meshserve():
  """A bare `import engine` works from the repository root and nowhere else."""
  bare = []
  for folder in (*FOLDERS, "tests", "scripts"):
    for path in (ROOT / folder).rglob("*.py"):
      for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
          modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
          modules = [node.module or ""]
        else:
          continue
        bare += [f"{path.relative_to(ROOT)}:{node.lineno} {m}" for m in modules
                 if m.split(".")[0] in FOLDERS]  # fmt: skip
  assert not bare


def test_the_layers_point_one_way(site, tmp_path):
  """import-linter's contracts in pyproject.toml, on the installed package (its static import
  graph: an import inside a function counts too). A broken contract prints the import chain."""
  lint = pathlib.Path(sys.executable).with_name("lint-imports")
  run = subprocess.run(
    [lint, "--no-cache", ROOT / "pyproject.toml"], cwd=tmp_path, env={"PYTHONPATH": str(site)},
    capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert run.returncode == 0, run.stdout + run.stderr


def test_the_router_path_imports_no_jax():
  """What a router process imports (the CLI, the server and router modules, the engine seam)
  loads no JAX: it holds no model. tests/test_server_disaggregated.py checks a running one."""
  code = (
    "import sys; import meshserve.server.cli, meshserve.server.serve, meshserve.server.router, "
    "meshserve.engine.api; print(sorted(m for m in sys.modules if m.split('.')[0] in "
    "('jax', 'jaxlib', 'flax', 'numpy')))"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120
  ).stdout
  assert out.strip() == "[]", out
