"""The deployment recipe: the Kubernetes manifests against Kubernetes' own schemas and against
the server's flags, and the image's install step in a clean virtualenv."""

import pathlib
import re
import subprocess

import kubernetes_validate
import pytest
import yaml

from meshserve.server.cli import build_parser
from meshserve.server.cli.serve import check_topology
from meshserve.server.grpc_server import SERVICE
from meshserve.sharding import Layout

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "scripts" / "deploy"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
KUBERNETES = "1.30.0"  # the oldest GKE version with TPU v5e and gRPC probes both GA
SECRETS = {"meshserve-auth", "meshserve-internal"}  # the names the README's commands create


def documents(path: pathlib.Path) -> list[dict]:
  return [d for d in yaml.safe_load_all(path.read_text()) if d]


# What the environment gives a container's $(VAR) references: the downward API's pod IP, and
# LeaderWorkerSet's group (leader address, size, this pod's index).
ENVIRONMENT = {"POD_IP": "10.0.0.7", "LWS_LEADER_ADDRESS": "meshserve-0.meshserve",
               "LWS_WORKER_INDEX": "2"}  # fmt: skip


def templates(doc: dict) -> list[tuple[str, dict]]:
  """(name, pod template) of each pod a workload runs: a Deployment's, or a LeaderWorkerSet's
  leader and worker."""
  if doc["kind"] == "Deployment":
    return [(doc["metadata"]["name"], doc["spec"]["template"])]
  if doc["kind"] == "LeaderWorkerSet":
    group = doc["spec"]["leaderWorkerTemplate"]
    return [(f"{doc['metadata']['name']} {k}", group[f"{k}Template"]) for k in ("leader", "worker")]
  return []


def servers(path: pathlib.Path):
  """(name, pod template, container, parsed `meshserve` flags) of each pod that serves."""
  for doc in documents(path):
    for name, template in templates(doc):
      [container] = template["spec"]["containers"]
      env = ENVIRONMENT
      if doc["kind"] == "LeaderWorkerSet":  # the group's own size, as LWS sets it
        env = env | {"LWS_GROUP_SIZE": str(doc["spec"]["leaderWorkerTemplate"]["size"])}
      args = [re.sub(r"\$\((\w+)\)", lambda m, env=env: env[m[1]], a) for a in container["args"]]
      opts = build_parser().parse_args(args)
      check_topology(opts)
      yield name, template, container, opts


def test_the_manifests_are_there():
  names = {p.name for p in MANIFESTS}
  assert names == {"single-host.yaml", "disaggregated.yaml", "multi-host-lws.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_each_manifest_validates_against_the_kubernetes_schemas(path):
  """Strict: an unknown or misplaced field fails, not only a wrong type. A LeaderWorkerSet's
  schema is its CRD's, which no package here ships: its fields are checked by name below, and
  its leader's and worker's pod templates against Kubernetes' PodTemplateSpec."""
  for doc in documents(path):
    if doc["kind"] != "LeaderWorkerSet":
      kubernetes_validate.validate(doc, KUBERNETES, strict=True)
      continue
    assert doc["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    assert set(doc["spec"]) <= {"replicas", "leaderWorkerTemplate", "rolloutStrategy",
                                "startupPolicy", "networkConfig"}  # fmt: skip
    group = doc["spec"]["leaderWorkerTemplate"]
    assert set(group) <= {"size", "restartPolicy", "leaderTemplate", "workerTemplate",
                          "subGroupPolicy"}  # fmt: skip
    assert group["restartPolicy"] in ("RecreateGroupOnPodRestart", "None")
    for _, template in templates(doc):
      pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
             "template": template}  # fmt: skip
      kubernetes_validate.validate(pod, KUBERNETES, strict=True)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_probes_ports_grace_and_secrets_match_the_server_flags(path):
  services = {d["metadata"]["name"]: d for d in documents(path) if d["kind"] == "Service"}
  groups = {d["metadata"]["name"]: d for d in documents(path) if d["kind"] == "LeaderWorkerSet"}
  for name, template, container, opts in servers(path):
    pod = template["spec"]
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    if opts.num_processes:  # a multi-host group: process 0 serves, the others follow
      group = groups[name.split()[0]]["spec"]["leaderWorkerTemplate"]
      assert opts.num_processes == group["size"], name
      chips = Layout.parse(opts.layout).num_devices // opts.num_processes
      assert container["resources"]["limits"]["google.com/tpu"] == str(chips), name
      assert any(str(opts.compilation_cache).startswith(p + "/") for p in mounts), name
      if opts.process_id != 0:  # a follower: no port, no probe; it outwaits the drain
        assert "ports" not in container and not any("Probe" in k for k in container), name
        assert pod["terminationGracePeriodSeconds"] >= opts.drain_timeout + 30, name
        continue
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert opts.host == "0.0.0.0" and ports["grpc"] == opts.port, name
    # Probes ask the port the server binds, for the service it reports.
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
      probe = container.get(kind)
      if probe and "grpc" in probe:
        assert probe["grpc"]["port"] == opts.port, (name, kind)
        assert probe["grpc"]["service"] in (SERVICE, ""), (name, kind)
      elif probe:
        assert probe["tcpSocket"]["port"] == opts.port, (name, kind)
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE, name
    # Prometheus scrapes the metrics port, which listens beyond loopback.
    notes = template["metadata"]["annotations"]
    assert opts.metrics_host == "0.0.0.0" and ports["metrics"] == opts.metrics_port, name
    assert notes["prometheus.io/scrape"] == "true"
    assert int(notes["prometheus.io/port"]) == opts.metrics_port
    # The grace period covers the drain, with time to exit.
    assert pod["terminationGracePeriodSeconds"] >= opts.drain_timeout + 10, name
    # Every token file the flags name lies in a mounted Secret of a known name.
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for flag in ("auth_token_file", "internal_token_file"):
      if (file := getattr(opts, flag)) is not None:
        file = str(file)
        [volume] = [v for path, v in mounts.items() if file.startswith(path + "/")]
        assert volumes[volume]["secret"]["secretName"] in SECRETS, (name, flag)
    if opts.role in ("prefill", "decode", "router"):
      assert opts.internal_token_file, f"{name}: the stage API needs the internal token"
    if opts.role == "router":
      for address in (*opts.prefill.split(","), *opts.decode.split(",")):
        host, port = address.rsplit(":", 1)
        assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}, address
      continue
    # A model server: its TPU chips are the layout's devices, and the compilation cache
    # is on a volume.
    chips = Layout.parse(opts.layout or "tp=1").num_devices // (opts.num_processes or 1)
    assert container["resources"]["requests"]["google.com/tpu"] == str(chips), name
    assert container["resources"]["limits"]["google.com/tpu"] == str(chips), name
    assert any(str(opts.compilation_cache).startswith(p + "/") for p in mounts), name
    assert pod["securityContext"]["runAsNonRoot"], name


def test_the_image_installs_with_the_tested_script():
  """The Dockerfile's install step is scripts/deploy/install.sh, for each target."""
  text = (DEPLOY / "Dockerfile").read_text()
  targets = re.findall(r"^FROM \S+ AS (\w+)", text, re.M)
  assert targets == ["base", "cpu", "tpu"]
  runs = re.findall(r"^RUN scripts/deploy/install.sh (.*)$", text, re.M)
  assert runs == ["/opt/meshserve/venv", "/opt/meshserve/venv tpu"]
  assert re.search(r"^USER meshserve$", text, re.M) and "HEALTHCHECK" in text


@pytest.mark.slow  # about a minute: every dependency into a fresh virtualenv
def test_the_install_step_works_in_a_clean_virtualenv(tmp_path):
  venv = tmp_path / "venv"
  subprocess.run([str(DEPLOY / "install.sh"), str(venv)], check=True, timeout=900)
  out = subprocess.run(
    [str(venv / "bin" / "meshserve"), "serve", "--help"], capture_output=True, text=True,
    timeout=120, check=True,
  )  # fmt: skip
  assert "--auth-token-file" in out.stdout
  # The default model's weights came with it (no hub, ever): the GGUF file resolves.
  where = "from meshserve.models.loader import resolve; print(resolve('smollm2-135m-instruct')[1])"
  out = subprocess.run(
    [str(venv / "bin" / "python"), "-c", where], capture_output=True, text=True, timeout=120,
    check=True, cwd=tmp_path,
  )  # fmt: skip
  assert out.stdout.strip().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
  assert pathlib.Path(out.stdout.strip()).is_file()
