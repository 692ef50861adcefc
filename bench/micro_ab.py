"""Before / after a change to the fast protocol or the built-in page, in-process, interleaved.

    git archive <commit> service | tar -x -C /tmp/hc-base
    .venv/bin/python bench/micro_ab.py --base /tmp/hc-base [--n 5000] [--runs 15]

Loads the old `http/fastproto.py` and `app.py` from `--base DIR/service` as modules of their
own next to this checkout's (both import the rest of hello_cluster from this checkout, so
only those two files may differ), then drives the wrk request through each protocol as
bench/micro_protocol.py does (uvloop, a transport that counts writes, request metrics
off), alternating old and new run by run, for the built-in page and the Starlette and
FastAPI apps of bench/peer_frameworks.py. CPU time of this process; prints the medians,
the new / old ratio per app and the spread of the runs, as one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import micro_protocol as mp  # noqa: E402

REQUEST = mp.REQUEST


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def protocol(cls: Any, app: Any) -> Any:
    import uvicorn
    from uvicorn.server import ServerState

    config = uvicorn.Config(app, http=cls, lifespan="off", log_config=None, access_log=False,
                            server_header=False, proxy_headers=False)
    config.load()
    state = ServerState()
    state.default_headers = [(b"date", b"Wed, 25 Nov 2026 10:00:00 GMT")]
    proto = cls(config=config, server_state=state, app_state={})
    proto.connection_made(mp.CountingTransport())
    return proto


async def whole_us(cls: Any, app: Any, n: int) -> float:
    proto = protocol(cls, app)
    sleep = asyncio.sleep
    t = time.process_time()
    for _ in range(n):
        proto.data_received(REQUEST)
        await sleep(0)
    elapsed = (time.process_time() - t) / n * 1e6
    t = time.process_time()
    for _ in range(n):
        await sleep(0)
    return elapsed - (time.process_time() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="directory holding the old service/")
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="hc-bench-ab-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tmp
    try:
        import peer_frameworks
        import uvloop

        from hello_cluster import app as new_app
        from hello_cluster.http import fastproto as new_proto

        old = Path(args.base) / "service" / "hello_cluster"
        old_proto = load(old / "http" / "fastproto.py", "hc_base_fastproto")
        old_app = load(old / "app.py", "hc_base_app")
        cases = {
            "hello": ((old_proto.FastProtocol, old_app.app),
                      (new_proto.FastProtocol, new_app.app)),
            "starlette": ((old_proto.FastProtocol, peer_frameworks.starlette_app),
                          (new_proto.FastProtocol, peer_frameworks.starlette_app)),
            "fastapi": ((old_proto.FastProtocol, peer_frameworks.fastapi_app),
                        (new_proto.FastProtocol, peer_frameworks.fastapi_app)),
        }
        samples: dict[tuple[str, str], list[float]] = {}
        for run in range(args.runs):
            for name, (before, after) in cases.items():
                pair = [("old", before), ("new", after)]
                if run % 2:
                    pair.reverse()
                for label, (cls, app) in pair:
                    samples.setdefault((name, label), []).append(
                        uvloop.run(whole_us(cls, app, args.n)))
        out: dict[str, Any] = {"n": args.n, "runs": args.runs}
        for name in cases:
            o, n = samples[name, "old"], samples[name, "new"]
            ratios = sorted(b / a for a, b in zip(o, n, strict=True))
            out[name] = {"old_us": round(statistics.median(o), 2),
                         "new_us": round(statistics.median(n), 2),
                         "new_over_old": round(statistics.median(ratios), 3),
                         "ratio_quartiles": [round(ratios[len(ratios) // 4], 3),
                                             round(ratios[3 * len(ratios) // 4], 3)]}
        print(json.dumps(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
