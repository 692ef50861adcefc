"""The metrics as Prometheus itself sees them: promtool on the rules and the scrape, and a real
Prometheus server scraping a real cluster and loading the alert rules.

Debian's `prometheus` package provides both binaries. Its packaged service may want port 9090;
nothing here uses that port or any default instance: the test server gets a free port, a
config and a TSDB of its own in the test's tmp dir.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import ROOT, Cluster, free_port, need_command, wait_for

RULES_DIR = ROOT / "deploy" / "prometheus"
RULES = RULES_DIR / "alerts.yml"
JOB = "hello-cluster"  # the job name alerts.yml expects


def promtool() -> str:
    return need_command("promtool", "prometheus")


def test_alert_rules_are_valid() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_rules_unit_tests_pass() -> None:
    """alerts_test.yml shows every alert both firing and staying quiet."""
    result = subprocess.run([promtool(), "test", "rules", "alerts_test.yml"], cwd=RULES_DIR,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {t["alertname"] for case in yaml.safe_load(
        (RULES_DIR / "alerts_test.yml").read_text())["tests"]
        for t in case.get("alert_rule_test", [])}
    assert tested == set(alert_names()), "every alert in alerts.yml needs a unit test"


def test_scrape_passes_promtool_check_metrics(cluster: Callable[..., Cluster]) -> None:
    """The exposition (pool, process and multiprocess request metrics) lints clean."""
    tool = promtool()
    c = cluster("--workers", "2")
    for _ in range(5):
        assert c.get("/")[0] == 200
    # Workers flush request counts every 0.1 s.
    wait_for(lambda: c.metric('hello_cluster_http_requests_total{method="GET",status="200"}')
             >= 5, 10, what="the 5 requests counted")
    status, headers, body = c.metrics_get("/metrics")
    assert status == 200
    assert b"hello_cluster_http_requests_total" in body
    result = subprocess.run([tool, "check", "metrics"], input=body, capture_output=True,
                            timeout=60)
    out = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, out
    assert out.strip() == "", f"promtool check metrics reported problems:\n{out}"


def alert_names() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r["alert"] for g in groups for r in g["rules"] if "alert" in r]


# ---- a real Prometheus server ---------------------------------------------------------------


class Prometheus:
    """A throwaway Prometheus on 127.0.0.1 with its own config and TSDB."""

    def __init__(self, tmp: Path, target_port: int) -> None:
        binary = need_command("prometheus", "prometheus")
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": JOB, "static_configs": [
                {"targets": [f"127.0.0.1:{target_port}"]}]}],
        }
        config_path = tmp / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp / "prometheus.log"
        self.log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config_path}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (loopback only)
            doc = json.load(resp)
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str) -> list[float]:
        return [float(r["value"][1]) for r in self.api("query", query=expr)["result"]]

    def wait_up(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.log}")
            with urllib.request.urlopen(  # noqa: S310 (loopback only)
                    f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)

        wait_for(ready, 30, interval=0.2, what="prometheus to become ready")

    def stop(self) -> None:
        """Terminate, then kill: never leave a Prometheus behind, whatever happened."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait(timeout=10)
        self.log_file.close()


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int], Prometheus]]:
    started: list[Prometheus] = []

    def start(target_port: int) -> Prometheus:
        p = Prometheus(tmp_path, target_port)
        started.append(p)
        p.wait_up()
        return p

    yield start
    for p in started:
        p.stop()


def poll(check: Callable[[], bool], timeout: float, what: str, log: Callable[[], str]) -> None:
    try:
        wait_for(check, timeout, interval=0.25, what=what)
    except AssertionError as err:
        raise AssertionError(f"{err}\nprometheus log:\n{log()}") from None


@pytest.mark.e2e
def test_real_prometheus_scrapes_cluster_and_loads_rules(
        cluster: Callable[..., Cluster], prometheus: Callable[[int], Prometheus]) -> None:
    c = cluster("--workers", "3", workers=3)
    assert c.metrics_port is not None
    prom = prometheus(c.metrics_port)
    target = f'job="{JOB}"'

    poll(lambda: prom.query(f"up{{{target}}}") == [1.0], 30, "up == 1", lambda: prom.log)
    poll(lambda: prom.query(f"hello_cluster_workers_ready{{{target}}}") == [3.0], 30,
         "hello_cluster_workers_ready == 3", lambda: prom.log)
    assert prom.query(f"hello_cluster_workers_desired{{{target}}}") == [3.0]
    assert prom.query(f'hello_cluster_worker_restarts_total{{{target},reason="signal"}}') == [0.0]

    # Requests served by workers reach Prometheus through the master's aggregation.
    for _ in range(4):
        assert c.get("/")[0] == 200
    poll(lambda: prom.query(f"sum(hello_cluster_http_requests_total{{{target}}})") == [4.0],
         30, "4 requests counted in Prometheus", lambda: prom.log)

    # The alert rules are loaded and every one evaluates without error against real series.
    def rules_ok() -> bool:
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        names = sorted(r["name"] for r in rules)
        if names != sorted(alert_names()):
            raise AssertionError(f"loaded rules {names} != alerts.yml {sorted(alert_names())}")
        bad = [(r["name"], r["health"], r.get("lastError")) for r in rules
               if r["health"] != "ok"]
        return not bad

    poll(rules_ok, 30, "every alert rule evaluated with health ok", lambda: prom.log)
    active = [a for a in prom.api("alerts")["alerts"]]
    assert active == [], f"a healthy cluster has active alerts: {active}"

    # The master goes away: the Down rule, evaluated by the real server, becomes active.
    c.signal(signal.SIGTERM)
    assert c.wait_exit(30) == 0

    def down_active() -> bool:
        return any(a["labels"]["alertname"] == "HelloClusterDown"
                   and a["labels"]["instance"] == f"127.0.0.1:{c.metrics_port}"
                   and a["state"] in ("pending", "firing")
                   for a in prom.api("alerts")["alerts"])

    poll(down_active, 30, "HelloClusterDown pending after the master stopped",
         lambda: prom.log)
    assert prom.proc.poll() is None, f"prometheus died during the test:\n{prom.log}"


# ---- the Grafana dashboard --------------------------------------------------------------------

DASHBOARD = ROOT / "deploy" / "grafana" / "hello-cluster.json"
# What Grafana would put in for the dashboard's variables: the job the alerts expect, "All"
# instances (the variable's allValue), and a rate window of several 1 s scrapes.
VARIABLES = {"$__rate_interval": "10s", "$job": JOB, "$instance": ".+"}


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL with the variables filled in) for every target of every panel."""
    out = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"{panel['title']}: unknown variable in {expr}"
            out.append((panel["title"], expr))
    return out


def test_grafana_dashboard_is_importable_as_is() -> None:
    """What Grafana's import needs: unique ids and refIds, a grid place for every panel, every
    query on the dashboard's own Prometheus variable, and no panel without a query."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert names == {"datasource", "job", "instance"}
    for panel in dashboard["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], f"{panel['title']} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
            assert 'job="$job"' in target["expr"] and 'instance=~"$instance"' in target["expr"]
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("workers", "restarts", "recycles", "request rate", "latency", "memory", "cpu",
                  "loop lag", "crash loop"):
        assert topic in titles, f"no panel for {topic}"


@pytest.mark.e2e
def test_grafana_dashboard_every_panel_has_data(
        cluster: Callable[..., Cluster], prometheus: Callable[[int], Prometheus]) -> None:
    """Every query of every panel, run by a real Prometheus scraping a real cluster (with
    traffic and one killed worker), returns at least one finite value: a panel that
    shows nothing is a broken panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = panel_queries(dashboard)
    c = cluster("--workers", "2", workers=2)
    assert c.metrics_port is not None
    prom = prometheus(c.metrics_port)
    poll(lambda: prom.query(f'up{{job="{JOB}"}}') == [1.0], 30, "up == 1", lambda: prom.log)
    os.kill(c.workers()[0], signal.SIGKILL)  # a restart for the restarts panel

    # The variables' own queries (label_values) find the job and the instance.
    def labels(name: str, match: str) -> list[str]:
        return list(prom.api(f"label/{name}/values", **{"match[]": match}))

    poll(lambda: labels("job", "hello_cluster_build_info") == [JOB], 30, "job variable",
         lambda: prom.log)
    assert labels("instance", f'hello_cluster_build_info{{job="{JOB}"}}') == [
        f"127.0.0.1:{c.metrics_port}"]

    empty: list[tuple[str, str]] = []

    def all_have_data() -> bool:
        for _ in range(5):  # a trickle of traffic, so rates and latency quantiles exist
            c.get("/")
        nonlocal empty
        empty = [(title, expr) for title, expr in queries
                 if not any(math.isfinite(v) for v in prom.query(expr))]
        return not empty

    try:
        wait_for(all_have_data, 60, interval=0.25, what="every panel to show data")
    except AssertionError as err:
        raise AssertionError(f"{err}; panels without data: {empty}\n{prom.log}") from None
    assert prom.query(f'sum(hello_cluster_worker_restarts_total{{job="{JOB}"}})') == [1.0]
