"""The Kubernetes base: schema-valid, renders with kustomize, and agrees with the program.

Agreement is checked against the real thing: option names against hello_cluster.config,
probe paths by asking a running hello-cluster, the pod's user, ports and runtime dir against
the Containerfile.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import ROOT, Cluster, need, need_command
from hello_cluster import __version__
from hello_cluster.config import OPTIONS, load_config, parse_bind, parse_duration

K8S = ROOT / "deploy" / "kubernetes"
CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"
VALIDATOR = Path(sys.executable).parent / "kubernetes-validate"

# Files that kubernetes-validate has no schema for. It only WARNs (exit 0) on an unknown
# kind, so they are left out by name here instead of "passing" unchecked:
NO_CORE_SCHEMA = {
    # kustomize's own config, not an API object: test_kustomize_renders_the_base runs it.
    "kustomization.yaml",
    # A Prometheus Operator custom resource (monitoring.coreos.com/v1). kubernetes-validate
    # ships the core API schemas only, and the CRD schema cannot be fetched here;
    # test_podmonitor_scrapes_the_metrics_port checks it against the Deployment instead.
    "podmonitor.yaml",
}
EXPECTED = {
    ("Deployment", "hello-cluster"),
    ("Service", "hello-cluster"),
    ("PodDisruptionBudget", "hello-cluster"),
    ("HorizontalPodAutoscaler", "hello-cluster"),
    ("PodMonitor", "hello-cluster"),
}


def load(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def manifests() -> list[str]:
    return sorted(p.name for p in K8S.glob("*.yaml"))


def resources() -> dict[str, dict[str, Any]]:
    """Every API object in the base by kind (one of each)."""
    found: dict[str, dict[str, Any]] = {}
    for name in manifests():
        if name == "kustomization.yaml":
            continue
        for doc in load(name):
            assert doc["kind"] not in found, f"two {doc['kind']} objects"
            found[doc["kind"]] = doc
    return found


def container() -> dict[str, Any]:
    containers = resources()["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env() -> dict[str, str]:
    return {item["name"]: item["value"] for item in container()["env"]}


def container_port(port: int | str) -> int:
    """A probe's or Service's port: a number, or a name resolved against the container."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert port in named, f"port name {port!r} is not a container port ({sorted(named)})"
    return int(named[port])


def walk_env(node: Any) -> Iterator[dict[str, Any]]:
    """Every env entry anywhere in a manifest (containers, init containers, overlays)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield from value
            else:
                yield from walk_env(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk_env(item)


def validate(path: Path, version: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VALIDATOR), "--strict", "-k", version, str(path)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def k8s_version() -> str:
    need(VALIDATOR.exists(), "needs kubernetes-validate: .venv/bin/pip install "
                             "kubernetes-validate (make does)")
    from kubernetes_validate import utils

    return str(utils.latest_version())


def test_base_has_the_expected_objects() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == [n for n in manifests() if n != "kustomization.yaml"]
    assert {(kind, doc["metadata"]["name"]) for kind, doc in resources().items()} == EXPECTED


@pytest.mark.parametrize("name", [n for n in manifests() if n not in NO_CORE_SCHEMA])
def test_manifest_validates_strictly(name: str, k8s_version: str) -> None:
    result = validate(K8S / name, k8s_version)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    # Without a schema the tool WARNs and exits 0: insist every object really passed.
    assert "WARN" not in out and "ERROR" not in out, out
    assert out.count(" passed for resource ") == len(load(name)), out


def test_strict_validation_can_fail(tmp_path: Path, k8s_version: str) -> None:
    """A misspelt field in the Deployment fails, so the passes above mean something."""
    deployment = resources()["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    bad = tmp_path / "deployment.yaml"
    bad.write_text(yaml.safe_dump(deployment))
    result = validate(bad, k8s_version)
    assert result.returncode != 0 and "livenesProbe" in result.stdout, result.stdout


def test_kustomize_renders_the_base() -> None:
    kubectl = need_command("kubectl", "kubernetes-client")
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert {(doc["kind"], doc["metadata"]["name"]) for doc in rendered} == EXPECTED
    (deployment,) = [doc for doc in rendered if doc["kind"] == "Deployment"]
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"localhost/hello-cluster:{__version__}", "the images: entry applies"


def test_env_names_are_real_options() -> None:
    names = {opt.env for opt in OPTIONS}
    found = [item for name in manifests() for doc in load(name) for item in walk_env(doc)]
    ours = [item["name"] for item in found if item["name"].startswith("HELLO_CLUSTER_")]
    assert ours, "the Deployment sets its options by env"
    unknown = sorted(set(ours) - names)
    assert not unknown, f"not options of hello-cluster: {unknown}"
    # The values parse too: the pod would exit 2 (config error) at start otherwise.
    load_config([], env=env())


def test_termination_grace_covers_delay_and_drain() -> None:
    defaults = {opt.env: opt.default for opt in OPTIONS}
    values = {**defaults, **env()}
    delay = parse_duration(values["HELLO_CLUSTER_SHUTDOWN_DELAY"] or "0s")
    drain = parse_duration(values["HELLO_CLUSTER_GRACEFUL_TIMEOUT"] or "0s")
    pod = resources()["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > delay + drain


def test_ports_match_the_program_and_the_image() -> None:
    defaults = {opt.name: opt.default for opt in OPTIONS}
    app_port = parse_bind(str(defaults["bind"])).port
    metrics_port = parse_bind(str(defaults["metrics-bind"])).port
    values = env()
    assert parse_bind(values.get("HELLO_CLUSTER_BIND", str(defaults["bind"]))).port == app_port
    metrics_bind = values.get("HELLO_CLUSTER_METRICS_BIND", str(defaults["metrics-bind"]))
    assert parse_bind(metrics_bind).port == metrics_port
    assert container_port("http") == app_port and container_port("metrics") == metrics_port
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container_port(container()[probe]["httpGet"]["port"]) == metrics_port, probe
    service = resources()["Service"]
    assert {p["name"]: container_port(p["targetPort"]) for p in service["spec"]["ports"]} == {
        "http": app_port, "metrics": metrics_port}
    template = resources()["Deployment"]["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics_port
    expose = [line for line in CONTAINERFILE.read_text().splitlines()
              if line.startswith("EXPOSE ")]
    assert expose == [f"EXPOSE {app_port} {metrics_port}"]


def test_probe_paths_are_served(cluster: Callable[..., Cluster]) -> None:
    """Ask a real hello-cluster for each path the kubelet and Prometheus will request."""
    c = cluster("--workers", "1")
    paths = {container()[probe]["httpGet"]["path"]
             for probe in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert paths == {"/livez", "/readyz"}
    annotations = resources()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    paths.add(annotations["prometheus.io/path"])
    for endpoint in resources()["PodMonitor"]["spec"]["podMetricsEndpoints"]:
        paths.add(endpoint["path"])
    for path in sorted(paths):
        status, _, body = c.metrics_get(path)
        assert status == 200, (path, status, body)
    assert b"hello_cluster_workers_desired" in c.metrics_get("/metrics")[2]


def test_podmonitor_scrapes_the_metrics_port() -> None:
    monitor = resources()["PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    template_labels = resources()["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template_labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    container_port(endpoint["port"])


def test_pod_is_hardened_like_the_image() -> None:
    deployment = resources()["Deployment"]
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    c = container()
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    user = next(line.split()[1] for line in CONTAINERFILE.read_text().splitlines()
                if line.startswith("USER "))
    uid, _, gid = user.partition(":")
    assert sc["runAsUser"] == int(uid) and sc["runAsGroup"] == int(gid)
    # The runtime dir the program is told to use is a writable emptyDir in the pod.
    runtime_dir = env()["HELLO_CLUSTER_RUNTIME_DIR"]
    assert f"HELLO_CLUSTER_RUNTIME_DIR={runtime_dir}" in CONTAINERFILE.read_text()
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == runtime_dir]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume and not mount.get("readOnly", False)
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind]), kind


def test_pdb_and_hpa_target_the_deployment() -> None:
    objects = resources()
    labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    for kind in ("PodDisruptionBudget", "Service"):
        spec = objects[kind]["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        assert selector.items() <= labels.items(), kind
    hpa = objects["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "hello-cluster")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert hpa["spec"]["minReplicas"] >= 2
