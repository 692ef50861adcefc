"""Medians, ratios against uvicorn --workers, targets, and the markdown table.

Ratios are always against the uvicorn run measured in the same invocation on the same
machine, never against numbers from elsewhere; absolute numbers sit next to them.
"""

from __future__ import annotations

import statistics
from typing import Any

import peers

# (key, description, threshold, "ge"/"lt"/"eq"); evaluated by `targets`.
TARGETS = [
    ("rps_nometrics_ratio", "throughput, request metrics off, vs uvicorn --workers", 1.0, "ge"),
    ("rps_metrics_ratio", "throughput, request metrics on, vs uvicorn --workers", 0.9, "ge"),
    ("respawn_ms", "respawn to accepting, median", 50.0, "lt"),
    ("reload_failed", "failed requests during a graceful reload (worst median)", 0, "eq"),
    ("master_rss_mb", "master RSS", 40.0, "lt"),
    # issue 18: the fast protocol with request metrics on against Node's cluster and uvicorn
    ("fast_ka_vs_node", "--http fast, metrics on, keep-alive throughput vs Node's cluster",
     1.0, "ge"),
    ("fast_close_vs_uvicorn", "--http fast, metrics on, Connection: close vs uvicorn", 1.0,
     "ge"),
    ("fast_metrics_ratio", "--http fast keep-alive throughput, metrics on / off (cost < 3%)",
     0.97, "ge"),
]
# The WSGI suite (issue 14): hello-cluster serving Flask at least as fast as gunicorn gthread.
WSGI_TARGETS = [
    ("rps_ka_ratio", "keep-alive throughput (request metrics on) vs gunicorn gthread", 1.0, "ge"),
    ("rps_close_ratio", "Connection: close throughput (request metrics on) vs gunicorn gthread",
     1.0, "ge"),
    # Relative here: a respawned worker imports Flask (about 40 ms on this machine) before
    # it can answer, in every contender; the supervisor's own respawn time is the ASGI
    # suite's absolute target.
    ("respawn_ratio", "respawn to accepting, median, vs gunicorn gthread (both import Flask)",
     1.0, "lt"),
    ("reload_failed", "failed requests during a graceful reload (worst median)", 0, "eq"),
    ("master_rss_mb", "master RSS", 40.0, "lt"),
]


def med(values: list[Any]) -> float | None:
    xs = [v for v in values if v is not None]
    return statistics.median(xs) if xs else None


def summarize(field: list[peers.Contender], records: dict[str, dict[str, Any]],
              suite: peers.Suite = peers.ASGI) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for c in field:
        r = records[c.name]
        row: dict[str, Any] = {"label": c.label, "kind": c.kind}
        for mode in ("ka", "close"):
            row[f"{mode}_rps"] = med([x["rps"] for x in r[mode]])
            row[f"{mode}_rps_range"] = spread([x["rps"] for x in r[mode]])
            row[f"{mode}_cpu_us"] = med([x.get("cpu_us") for x in r[mode]])
            row[f"{mode}_cpu_us_range"] = spread([x.get("cpu_us") for x in r[mode]])
            row[f"{mode}_p50_ms"] = med([x["p50_ms"] for x in r[mode]])
            row[f"{mode}_p99_ms"] = med([x["p99_ms"] for x in r[mode]])
            row[f"{mode}_failed"] = med([x["failed"] for x in r[mode]])
        row["startup_ms"] = med(r["startup_ms"])
        row["startup_ready_ms"] = med(r["startup_ready_ms"])
        row["respawn_ms"] = med(r["respawn_ms"])
        row["respawn_missed"] = sum(1 for x in r["respawn_ms"] if x is None)
        row["respawn_samples"] = len(r["respawn_ms"])
        row["kill_failed"] = med(r["kill_failed"])
        for mode in ("ka", "close"):
            row[f"reload_failed_{mode}"] = med(r[f"reload_failed_{mode}"])
            row[f"reload_failed_{mode}_max"] = max(r[f"reload_failed_{mode}"], default=None)
        row["reload_ms"] = med(r["reload_ms"])
        row["rss_idle_mb"] = med(r["rss_idle_mb"])
        row["rss_mb"] = med(r["rss_mb"])
        row["errors"] = list(r["errors"])
        rows[c.name] = row
    # Ratios against the suite's baseline; the keys keep their first name (`_vs_uvicorn`,
    # the ASGI suite's baseline) so earlier result files read the same.
    base = rows.get(suite.baseline, {})
    for name, row in rows.items():
        for key in ("startup_ms", "respawn_ms", "rss_mb"):
            row[f"{key}_vs_uvicorn"] = _ratio(row.get(key), base.get(key))
        for mode in ("ka", "close"):
            row[f"{mode}_rps_vs_uvicorn"] = paired(records, name, suite.baseline, mode)
    on, off = suite.metrics_on, suite.metrics_off
    extra = {
        "metrics_cost_ratio": paired(records, on, off, "ka"),
        "metrics_cost_ratio_close": paired(records, on, off, "close"),
        "hc_vs_ceiling": paired(records, off, suite.ceiling, "ka") if suite.ceiling else None,
        # issue 18 (ASGI suite): None where the fast contenders were not run
        "fast_metrics_cost_ratio": paired(records, "hc-fast", "hc-fast-nometrics", "ka"),
        "fast_metrics_cost_ratio_close": paired(records, "hc-fast", "hc-fast-nometrics",
                                                "close"),
        "fast_vs_node": paired(records, "hc-fast", "node", "ka"),
        "fast_vs_ceiling": paired(records, "hc-fast-nometrics", "ceiling", "ka"),
        "fast_metrics_vs_ceiling": paired(records, "hc-fast", "ceiling", "ka"),
    }
    if suite.name == "apps":
        return {"rows": rows, "derived": extra, "targets": apps_targets(records)}
    return {"rows": rows, "derived": extra, "targets": targets(rows, suite, extra)}


def spread(values: list[Any]) -> list[float] | None:
    """[min, max] over the rounds: how far apart the rounds were."""
    xs = [v for v in values if v is not None]
    return [min(xs), max(xs)] if xs else None


def paired(records: dict[str, dict[str, Any]], a: str, b: str, mode: str,
           key: str = "rps") -> float | None:
    """Median over rounds of a's `key` / b's in the same round (same background load)."""
    return med(paired_all(records, a, b, mode, key))


def paired_all(records: dict[str, dict[str, Any]], a: str, b: str, mode: str,
               key: str = "rps") -> list[float]:
    """a's `key` / b's, one ratio per round both were measured in."""
    if a not in records or b not in records:
        return []
    first = {x.get("round"): x.get(key) for x in records[a][mode]}
    second = {x.get("round"): x.get(key) for x in records[b][mode]}
    return [v / second[k] for k, v in first.items() if v is not None and second.get(k)]


# The apps suite (issue 25): (key, what, a, b, mode, measure, threshold, op); the value is
# the median over rounds of a / b in the same round, and the target is met only when every
# round agrees (the worst round passes too), not in one lucky round.
APPS_TARGETS = [
    ("fastapi_vs_uvicorn", "FastAPI keep-alive req/s vs uvicorn", "hc/fastapi",
     "uvicorn/fastapi", "ka", "rps", 1.1, "ge"),
    ("fastapi_vs_granian", "FastAPI keep-alive req/s vs granian", "hc/fastapi",
     "granian/fastapi", "ka", "rps", 1.0, "ge"),
    ("fastapi_cpu_vs_granian", "FastAPI CPU per request vs granian's", "hc/fastapi",
     "granian/fastapi", "ka", "cpu_us", 1.0, "le"),
    ("flask_vs_granian", "Flask keep-alive req/s vs granian --interface wsgi", "hc/flask",
     "granian/flask", "ka", "rps", 1.0, "ge"),
    ("flask_close_vs_granian", "Flask Connection: close req/s vs granian", "hc/flask",
     "granian/flask", "close", "rps", 1.0, "ge"),
    ("flask_sleep_vs_granian", "Flask, a view sleeping 5 ms, keep-alive req/s vs granian",
     "hc/flask-sleep", "granian/flask-sleep", "ka", "rps", 1.0, "ge"),
    ("flask_loop_vs_granian", "Flask keep-alive req/s vs granian, --wsgi-dispatch loop",
     "hc-loop/flask", "granian/flask", "ka", "rps", 1.0, "ge"),
    ("flask_loop_close_vs_granian", "Flask Connection: close req/s vs granian, "
     "--wsgi-dispatch loop", "hc-loop/flask", "granian/flask", "close", "rps", 1.0, "ge"),
    ("hello_vs_nginx", "built-in page keep-alive req/s vs nginx", "hc/hello", "nginx", "ka",
     "rps", 0.8, "ge"),
    ("hello_cpu_vs_node", "built-in page CPU per request vs Node's cluster", "hc/hello",
     "node/hello", "ka", "cpu_us", 0.8, "le"),
]


def apps_targets(records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for key, what, a, b, mode, measure, limit, op in APPS_TARGETS:
        ratios = paired_all(records, a, b, mode, measure)
        if not ratios:
            out.append({"key": key, "what": what, "value": None, "range": None,
                        "target": limit, "op": op, "pass": None})
            continue
        worst = min(ratios) if op == "ge" else max(ratios)
        ok = worst >= limit if op == "ge" else worst <= limit
        out.append({"key": key, "what": what, "value": med(ratios),
                    "range": [min(ratios), max(ratios)], "target": limit, "op": op,
                    "pass": ok})
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def targets(rows: dict[str, dict[str, Any]], suite: peers.Suite = peers.ASGI,
            derived: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    hc, hc_off = rows.get(suite.metrics_on, {}), rows.get(suite.metrics_off, {})
    reload = [v for v in (hc.get("reload_failed_ka"), hc.get("reload_failed_close"),
                          hc_off.get("reload_failed_ka"), hc_off.get("reload_failed_close"))
              if v is not None]
    respawn = [v for v in (hc.get("respawn_ms"), hc_off.get("respawn_ms")) if v is not None]
    rss = [v for v in (hc.get("rss_mb"), hc_off.get("rss_mb")) if v is not None]
    values = {
        "rps_nometrics_ratio": hc_off.get("ka_rps_vs_uvicorn"),
        "rps_metrics_ratio": hc.get("ka_rps_vs_uvicorn"),
        "respawn_ms": max(respawn) if respawn else None,
        "respawn_ratio": max(ratios) if (ratios := [
            v for v in (hc.get("respawn_ms_vs_uvicorn"), hc_off.get("respawn_ms_vs_uvicorn"))
            if v is not None]) else None,
        "reload_failed": max(reload) if reload else None,
        "master_rss_mb": max(rss) if rss else None,
        "rps_ka_ratio": hc.get("ka_rps_vs_uvicorn"),
        "rps_close_ratio": hc.get("close_rps_vs_uvicorn"),
        "fast_ka_vs_node": (derived or {}).get("fast_vs_node"),
        "fast_close_vs_uvicorn": rows.get("hc-fast", {}).get("close_rps_vs_uvicorn"),
        "fast_metrics_ratio": (derived or {}).get("fast_metrics_cost_ratio"),
    }
    out = []
    for key, what, limit, op in (WSGI_TARGETS if suite.name == "wsgi" else TARGETS):
        v = values[key]
        ok = None if v is None else (v >= limit if op == "ge" else v < limit if op == "lt"
                                     else v == limit)
        out.append({"key": key, "what": what, "value": v, "target": limit, "op": op,
                    "pass": ok})
    return out


def needs_profile(summ: dict[str, Any]) -> bool:
    """Profile when hello-cluster trails uvicorn or sits far (>30%) below the ceiling."""
    rows = summ["rows"]
    off = rows.get(peers.ASGI.metrics_off, {}).get("ka_rps_vs_uvicorn")
    on = rows.get(peers.ASGI.metrics_on, {}).get("ka_rps_vs_uvicorn")
    ceiling = summ["derived"].get("hc_vs_ceiling")
    return any(x is not None and x < lim for x, lim in ((off, 1.0), (on, 0.9), (ceiling, 0.7)))


# ---- markdown ----------------------------------------------------------------------------

def _n(v: float | None, digits: int = 0) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


def _x(v: float | None) -> str:
    return "" if v is None else f" ({v:.2f}x)"


def markdown(doc: dict[str, Any], field: list[peers.Contender]) -> str:
    m = doc["machine"]
    rows = doc["summary"]["rows"]
    suite = doc.get("suite", "asgi")
    base = doc["contenders"].get(doc.get("baseline", peers.BASELINE), "uvicorn --workers")
    lines = [
        f"# hello-cluster benchmark, {doc['date'][:10]}"
        + (", WSGI suite (a Flask page)" if suite == "wsgi" else ""),
        "",
        f"- date: {doc['date']}",
        f"- machine: {m['cores']} cores ({m['cores_usable']} usable), {m['cpu']}, "
        f"Linux {m['kernel']}, Python {m['python']}, node {m['node']}, {m['wrk']}",
        "- peers: " + ", ".join(f"{k} {v}" for k, v in sorted(m["peers"].items())),
        "- hello-cluster's venv: " + ", ".join(
            f"{k} {v}" for k, v in sorted(m.get("hello_cluster_deps", {}).items())),
        f"- command: `{doc['command']}`",
        f"- {doc['workers']} workers each, {doc['reps']} repetitions (medians), "
        f"{doc['duration_s']:g} s wrk runs (`wrk -t1 -c64 --latency`), "
        f"run took {doc['elapsed_s']} s",
        f"- ratios in parentheses are against `{base}` measured in this run; "
        "throughput ratios are medians of per-round ratios (all contenders measured in each "
        "round, back to back)",
        "",
        "## Throughput and latency",
        "",
        "| contender | keep-alive req/s | CPU us/request | p50 / p99 ms "
        "| Connection: close req/s | CPU us/request | p50 / p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in field:
        r = rows[c.name]
        lines.append(
            f"| {r['label']} | {_n(r['ka_rps'])}{_x(r['ka_rps_vs_uvicorn'])} "
            f"| {_n(r.get('ka_cpu_us'), 1)} "
            f"| {_n(r['ka_p50_ms'], 2)} / {_n(r['ka_p99_ms'], 2)} "
            f"| {_n(r['close_rps'])}{_x(r['close_rps_vs_uvicorn'])} "
            f"| {_n(r.get('close_cpu_us'), 1)} "
            f"| {_n(r['close_p50_ms'], 2)} / {_n(r['close_p99_ms'], 2)} |")
    lines += [
        "",
        "## Supervision",
        "",
        "| contender | start-up ms (all workers answered) | respawn ms | failed, SIGKILL "
        "under load | failed, SIGHUP reload (keep-alive / close) | master RSS MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in field:
        r = rows[c.name]
        startup = _n(r["startup_ms"]) + _x(r["startup_ms_vs_uvicorn"])
        if r["startup_ready_ms"] is not None:
            startup += f"; READY=1 at {_n(r['startup_ready_ms'])}"
        if c.respawns:
            respawn = _n(r["respawn_ms"], 1) + _x(r["respawn_ms_vs_uvicorn"])
            if r["respawn_missed"]:
                respawn += f", {r['respawn_missed']}/{r['respawn_samples']} never respawned"
            killed = _n(r["kill_failed"])
        else:
            respawn = killed = "n/a"
        if c.reload_signal:
            reload = f"{_n(r['reload_failed_ka'])} / {_n(r['reload_failed_close'])}"
            if r["reload_ms"] is not None:
                reload += f" (READY=1 again after {_n(r['reload_ms'])} ms)"
        else:
            reload = "n/a"
        lines.append(f"| {r['label']} | {startup} | {respawn} | {killed} | {reload} "
                     f"| {_n(r['rss_mb'], 1)}{_x(r['rss_mb_vs_uvicorn'])} |")
    d = doc["summary"]["derived"]
    lines += [
        "",
        "## hello-cluster against its targets",
        "",
        "| target | measured | goal | result |",
        "|---|---:|---:|---|",
    ]
    ops = {"ge": ">=", "lt": "<", "eq": "=="}
    for t in doc["summary"]["targets"]:
        v = t["value"]
        shown = "–" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)
        verdict = "no data" if t["pass"] is None else "PASS" if t["pass"] else "FAIL"
        lines.append(f"| {t['what']} | {shown} | {ops[t['op']]} {t['target']} | {verdict} |")
    lines += [
        "",
        f"- request-metrics cost: throughput with metrics on / off = "
        f"{_n(d['metrics_cost_ratio'], 3)} (keep-alive), "
        f"{_n(d['metrics_cost_ratio_close'], 3)} (Connection: close)",
    ]
    if d.get("hc_vs_ceiling") is not None:
        lines.append(f"- hello-cluster (metrics off) / Python ceiling, keep-alive: "
                     f"{_n(d['hc_vs_ceiling'], 3)}")
    if d.get("fast_metrics_cost_ratio") is not None:
        lines.append(
            f"- `--http fast`: metrics on / off = {_n(d.get('fast_metrics_cost_ratio'), 3)} "
            f"(keep-alive), {_n(d.get('fast_metrics_cost_ratio_close'), 3)} (Connection: "
            f"close); against Node's cluster, keep-alive: {_n(d.get('fast_vs_node'), 3)}; "
            f"against the Python ceiling: {_n(d.get('fast_vs_ceiling'), 3)} (metrics off), "
            f"{_n(d.get('fast_metrics_vs_ceiling'), 3)} (metrics on)")
    mp = d.get("micro_protocol")
    if mp:
        lines += ["", "## Per-request cost in a worker, by part (bench/micro_protocol.py)", "",
                  "In-process, on uvloop, the wrk request through each protocol with a "
                  f"transport that counts writes; medians of {mp['runs']} runs of "
                  f"{mp['n']:,} requests. One send() of a small response on loopback "
                  f"costs {mp['write_us']:.2f} us more per write in a real worker.", "",
                  "| part (us per request) | --http uvicorn | --http fast |",
                  "|---|---:|---:|"]
        for key, what in (("parse_us", "parse (httptools alone)"),
                          ("scope_us", "scope, headers, cycle"),
                          ("app_us", "the hello app"), ("task_us", "asyncio Task"),
                          ("send_and_rest_us", "send, response complete, bookkeeping"),
                          ("total_us", "total, metrics off"),
                          ("metrics_us", "request metrics"),
                          ("writes_per_request", "transport writes per response"),
                          ("with_writes_us", "total with the writes' syscalls"),
                          ("connection_us", "a connection made and lost (Connection: close)")):
            u, f = (mp[key] if key in mp else mp["uvicorn"][key],
                    mp[key] if key in mp else mp["fast"][key])
            lines.append(f"| {what} | {u:.2f} | {f:.2f} |")
        lines.append("")
    if d.get("micro"):
        mm = d["micro"]
        lines.append(f"- RequestMetrics in-process cost (bench/micro_metrics.py): "
                     f"{mm['request_metrics_us']:.2f} us per request on top of the app's "
                     f"{mm['app_us']:.2f} us")
        if "proxy_headers_us" in mm:
            lines.append(f"- uvicorn's ProxyHeadersMiddleware (on in uvicorn for 127.0.0.1 by "
                         f"default; in hello-cluster only with --forwarded-allow-ips): "
                         f"{mm['proxy_headers_us']:.2f} us per request")
    lines.append(f"- load average (1 min) at start / end: {d.get('loadavg_at_start', 0):.2f} / "
                 f"{m.get('loadavg_at_end', 0):.2f} (other work on the machine skews results)")
    errors = [(rows[c.name]["label"], e) for c in field for e in rows[c.name]["errors"]]
    if errors:
        lines += ["", "## Problems during the run", ""]
        lines += [f"- {label}: {e}" for label, e in errors]
    if doc.get("profile"):
        lines += ["", "## Where a hello-cluster worker spends its time (py-spy)", ""]
        for name, p in doc["profile"].items():
            lines += [f"### {name}: {p.get('samples', 0)} samples, "
                      f"{_n(p.get('rps'))} req/s while sampled", ""]
            if p.get("error"):
                lines += [f"- profiling failed: {p['error']}", ""]
                continue
            lines += [f"- in RequestMetrics / prometheus_client themselves (not the app or "
                      f"uvicorn they call): {p['metrics_pct']:.1f}% of busy samples; any stack "
                      f"through prometheus_client: {p['prometheus_client_pct']:.1f}%", ""]
            lines += ["| inclusive % | function |", "|---:|---|"]
            lines += [f"| {pct:.1f} | `{fn}` |" for fn, pct in p["inclusive"]]
            lines += ["", "| self % | function |", "|---:|---|"]
            lines += [f"| {pct:.1f} | `{fn}` |" for fn, pct in p["self"]]
            lines.append("")
    return "\n".join(lines) + "\n"


def _range(v: list[float] | None, digits: int = 0) -> str:
    return "" if v is None else f" ({v[0]:,.{digits}f}-{v[1]:,.{digits}f})"


def apps_markdown(doc: dict[str, Any], field: list[peers.Contender]) -> str:
    """The apps suite: per app, every server's req/s and CPU per request, with the spread."""
    m = doc["machine"]
    rows = doc["summary"]["rows"]
    raw = doc["raw"]
    lines = [
        f"# hello-cluster benchmark, {doc['date'][:10]}, apps suite (real frameworks)",
        "",
        f"- date: {doc['date']}",
        f"- machine: {m['cores']} cores ({m['cores_usable']} usable), {m['cpu']}, "
        f"Linux {m['kernel']}, Python {m['python']}, node {m['node']}, {m.get('nginx')}, "
        f"{m['wrk']}",
        "- peers' venv: " + ", ".join(f"{k} {v}" for k, v in sorted(m["peers"].items())),
        "- hello-cluster's venv: " + ", ".join(
            f"{k} {v}" for k, v in sorted(m.get("hello_cluster_deps", {}).items())),
        f"- command: `{doc['command']}`",
        f"- {doc['workers']} workers each, {doc['reps']} rounds, {doc['duration_s']:g} s per "
        "wrk run (`wrk -t1 -c64`, keep-alive, then `Connection: close`); every contender "
        "measured in every round, the order reversed every other round; run took "
        f"{doc['elapsed_s']} s",
        "- figures are medians over the rounds, (min-max) the spread of the rounds; "
        "CPU us/request is utime + stime of the server's whole process tree during the wrk "
        "run divided by the requests served; wrk runs on the same 2 cores",
        f"- load average (1 min) at start / end: "
        f"{doc['summary']['derived'].get('loadavg_at_start', 0):.2f} / "
        f"{m.get('loadavg_at_end', 0):.2f}",
        "",
        "| app | server | keep-alive req/s | CPU us/req | Connection: close req/s "
        "| CPU us/req | hello-cluster / this, keep-alive req/s (per round) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for c in field:
        r = rows[c.name]
        app = c.name.split("/", 1)[1] if "/" in c.name else "hello"
        server = c.label.split(",", 1)[0]
        mine = f"hc/{app}"
        vs = ""
        if mine != c.name and mine in raw:
            ratios = paired_all(raw, mine, c.name, "ka")
            if ratios:
                vs = f"{med(ratios):.2f}x" + _range([min(ratios), max(ratios)], 2)
        lines.append(
            f"| {app} | {server} | {_n(r['ka_rps'])}{_range(r['ka_rps_range'])} "
            f"| {_n(r['ka_cpu_us'], 1)}{_range(r['ka_cpu_us_range'], 1)} "
            f"| {_n(r['close_rps'])}{_range(r['close_rps_range'])} "
            f"| {_n(r['close_cpu_us'], 1)}{_range(r['close_cpu_us_range'], 1)} | {vs} |")
    lines += ["", "## Targets (issue 25): met only if every round meets it", "",
              "| target | median (min-max over rounds) | goal | result |",
              "|---|---:|---:|---|"]
    ops = {"ge": ">=", "le": "<="}
    for t in doc["summary"]["targets"]:
        verdict = "no data" if t["pass"] is None else "PASS" if t["pass"] else "FAIL"
        lines.append(f"| {t['what']} | {_n(t['value'], 2)}{_range(t['range'], 2)} "
                     f"| {ops[t['op']]} {t['target']} | {verdict} |")
    errors = [(rows[c.name]["label"], e) for c in field for e in rows[c.name]["errors"]]
    if errors:
        lines += ["", "## Problems during the run", ""]
        lines += [f"- {label}: {e}" for label, e in errors]
    return "\n".join(lines) + "\n"
