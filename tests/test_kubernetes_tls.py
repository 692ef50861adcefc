"""The TLS overlay (deploy/kubernetes-tls): valid, renders over the base, and the pod's
layout really serves HTTPS: the Secret's files as the kubelet mounts them, given to a real
hello-cluster with the overlay's env."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_kubernetes import EXPECTED, k8s_version, validate  # noqa: F401  (fixture)
from tls_pki import Pki, client_context, https_get

from conftest import ROOT, Cluster, need_command, wait_for
from hello_cluster.config import OPTIONS, load_config

OVERLAY = ROOT / "deploy" / "kubernetes-tls"


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    kubectl = need_command("kubectl", "kubernetes-client")
    result = subprocess.run([kubectl, "kustomize", str(OVERLAY)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def deployment(rendered: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = [doc for doc in rendered if doc["kind"] == "Deployment"]
    return found


def pod_env(rendered: list[dict[str, Any]]) -> dict[str, str]:
    (container,) = deployment(rendered)["spec"]["template"]["spec"]["containers"]
    return {item["name"]: item["value"] for item in container["env"]}


def test_overlay_renders_the_base_plus_tls(rendered: list[dict[str, Any]]) -> None:
    assert {(doc["kind"], doc["metadata"]["name"]) for doc in rendered} == EXPECTED
    env = pod_env(rendered)
    assert {opt.env for opt in OPTIONS} >= set(env), "env names are options"
    cfg = load_config([], env=env)
    assert cfg.ssl_certfile and cfg.ssl_keyfile and cfg.shutdown_delay == 5.0  # base kept
    pod = deployment(rendered)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "tls"]
    assert mount["readOnly"] is True
    for path in (cfg.ssl_certfile, cfg.ssl_keyfile):
        assert os.path.dirname(path) == mount["mountPath"], path
    (volume,) = [v for v in pod["volumes"] if v["name"] == "tls"]
    secret = volume["secret"]
    assert secret["secretName"] == "hello-cluster-tls"
    # kubernetes.io/tls Secrets hold tls.crt and tls.key; group-readable for fsGroup only.
    assert {os.path.basename(cfg.ssl_certfile), os.path.basename(cfg.ssl_keyfile)} == {
        "tls.crt", "tls.key"}
    assert secret["defaultMode"] == 0o440
    assert pod["securityContext"]["fsGroup"] == container["securityContext"]["runAsGroup"]
    # The probes stay on the plain-HTTP metrics port.
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == "metrics"
        assert container[probe]["httpGet"].get("scheme", "HTTP") == "HTTP"


def test_rendered_deployment_validates_strictly(rendered: list[dict[str, Any]],
                                                tmp_path: Path, k8s_version: str) -> None:  # noqa: F811
    path = tmp_path / "deployment.yaml"
    path.write_text(yaml.safe_dump(deployment(rendered)))
    result = validate(path, k8s_version)
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "WARN" not in out and "ERROR" not in out, out
    assert " passed for resource " in out, out


def kubelet_secret(root: Path, version: str, files: dict[str, bytes]) -> None:
    """The kubelet's layout: ..VERSION/ holds the data, ..data points at it, and each key
    is a symlink through ..data; an update swaps ..data atomically."""
    data = root / f"..{version}"
    data.mkdir(parents=True)
    for name, content in files.items():
        (data / name).write_bytes(content)
        (data / name).chmod(0o440)
        if not (root / name).is_symlink():
            (root / name).symlink_to(f"..data/{name}")
    tmp = root / "..data_tmp"
    tmp.symlink_to(data.name)
    os.replace(tmp, root / "..data")


def test_the_pod_layout_serves_and_rotates(rendered: list[dict[str, Any]],
                                           cluster: Callable[..., Cluster],
                                           tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    mounted = tmp_path / "secret"
    for version, serial in (("v1", 0x7001), ("v2", 0x7002)):
        pem, key = pki.cert(f"k8s-{version}", serial)
        if version == "v2":
            new = {"tls.crt": pem.read_bytes(), "tls.key": key.read_bytes()}
            break
        kubelet_secret(mounted, version, {"tls.crt": pem.read_bytes(),
                                          "tls.key": key.read_bytes()})
    env = {name: value.replace("/etc/hello-cluster/tls", str(mounted))
           for name, value in pod_env(rendered).items()
           if name.startswith("HELLO_CLUSTER_SSL_")}
    c = cluster("--workers", "1", env=env, workers=1)
    assert https_get(c.port, client_context(pki))[::2] == (200, 0x7001)
    kubelet_secret(mounted, "v2", new)  # the Secret was updated
    c.signal(signal.SIGHUP)  # or `kubectl rollout restart`
    wait_for(lambda: https_get(c.port, client_context(pki), timeout=2)[2] == 0x7002, 20,
             what="the new certificate after SIGHUP")
