"""The shipped systemd units: `systemd-analyze verify` accepts them and the sandbox stays tight.

The units name /usr/local/bin/hello-cluster, which a test machine need not have; `verify`
checks that ExecStart= is executable, so it runs on a copy pointed at the venv's command.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, ROOT, need_command

UNITS = ROOT / "deploy" / "systemd"
SERVICE = "hello-cluster.service"
SOCKETS = ("hello-cluster.socket", "hello-cluster-metrics.socket")
INSTALLED_BIN = "/usr/local/bin/hello-cluster"
MAX_EXPOSURE = 2.0


def unit_settings(name: str) -> dict[str, list[str]]:
    """`Key=value` lines of a unit file, every value of a repeated key in order."""
    settings: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.fixture
def venv_units(tmp_path: Path) -> Path:
    """Copies of the units whose ExecStart= is the hello-cluster under test."""
    for path in UNITS.iterdir():
        text = path.read_text()
        if path.name == SERVICE:
            assert f"ExecStart={INSTALLED_BIN}" in text
            text = text.replace(f"ExecStart={INSTALLED_BIN}", f"ExecStart={BIN}")
        (tmp_path / path.name).write_text(text)
    return tmp_path


def test_units_verify(venv_units: Path) -> None:
    analyze = need_command("systemd-analyze", "systemd")
    names = [SERVICE, *SOCKETS]
    result = subprocess.run([analyze, "verify", *names], cwd=venv_units, capture_output=True,
                            text=True, timeout=60)
    # verify prints problems on stderr and still exits 0 for some of them: both must be clean.
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_verify_catches_a_broken_unit(venv_units: Path) -> None:
    """The check above can fail: a bad value is reported (on stderr, with exit status 0)."""
    analyze = need_command("systemd-analyze", "systemd")
    service = venv_units / SERVICE
    service.write_text(service.read_text().replace("KillMode=mixed", "KillMode=mixd"))
    result = subprocess.run([analyze, "verify", SERVICE], cwd=venv_units, capture_output=True,
                            text=True, timeout=60)
    assert "mixd" in result.stderr


def exposure(service: Path) -> float:
    analyze = need_command("systemd-analyze", "systemd")
    result = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(service)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, f"no exposure score in:\n{result.stdout}\n{result.stderr}"
    return float(match.group(1))


def test_security_exposure_is_low() -> None:
    score = exposure(UNITS / SERVICE)
    assert score <= MAX_EXPOSURE, f"exposure {score} > {MAX_EXPOSURE}: the sandbox was weakened"


def test_exposure_score_reacts_to_weakening(tmp_path: Path) -> None:
    """Dropping the sandbox raises the score above the bar, so the bar means something."""
    weak = tmp_path / SERVICE
    text = (UNITS / SERVICE).read_text()
    text = re.sub(r"^(DynamicUser|ProtectSystem|CapabilityBoundingSet|SystemCallFilter|"
                  r"PrivateUsers|ProtectHome|RestrictAddressFamilies)=.*$", "", text, flags=re.M)
    weak.write_text(text)
    assert exposure(weak) > MAX_EXPOSURE


def test_service_contract() -> None:
    """The settings the program's behaviour depends on (see master.py, notify.py, cli.py)."""
    s = unit_settings(SERVICE)
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["ExecStart"][0].split()[0] == INSTALLED_BIN
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["KillMode"] == ["mixed"]
    assert s["Restart"] == ["on-failure"]
    assert set(s["RestartPreventExitStatus"][0].split()) == {"2", "4"}
    assert s["RuntimeDirectory"] == ["hello-cluster"]
    assert s["DynamicUser"] == ["yes"]
    assert "WatchdogSec" in s
    # The master drains for up to --graceful-timeout (30s) plus a 2s kill grace.
    stop = s["TimeoutStopSec"][0]
    assert stop.endswith("s") and int(stop[:-1]) > 32
    for socket_unit in SOCKETS:
        assert socket_unit in s["Requires"][0].split()
        assert socket_unit in s["After"][0].split()
    # Not set: process_* metrics read /proc/stat; the app may need outbound network.
    assert "ProcSubset" not in s
    assert "PrivateNetwork" not in s


def test_socket_contract() -> None:
    app = unit_settings("hello-cluster.socket")
    metrics = unit_settings("hello-cluster-metrics.socket")
    assert app["ListenStream"] == ["8085"]
    assert app["FileDescriptorName"] == ["http"]
    assert app["DeferAcceptSec"] == ["1s"]  # as --defer-accept, the default when we bind
    assert metrics["ListenStream"] == ["9464"]
    assert metrics["FileDescriptorName"] == ["metrics"]
    for unit in (app, metrics):
        assert unit["Service"] == [SERVICE]
        assert unit.get("Accept", ["no"]) == ["no"]
        assert unit["WantedBy"] == ["sockets.target"]
