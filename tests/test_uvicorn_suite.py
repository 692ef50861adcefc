"""uvicorn's own HTTP protocol tests, run against `--http fast` (fastproto.FastProtocol).

Nothing is vendored: uvicorn's sdist on PyPI ships its tests. The first run downloads the
sdist of the *installed* uvicorn version with pip into `.venv/uvicorn-sdist/` and unpacks its
`tests/` there (later runs reuse it, so the suite itself fetches nothing). The adaptation is
one file, tests/uvicorn_suite/protocols_conftest.py, copied to `tests/protocols/conftest.py`:
it overrides the `http_protocol_cls` fixture so every parametrized test gets FastProtocol.
The tests then run in a child pytest, from the unpacked directory (its `tests` package is
not ours), against the installed uvicorn.

The test ids in DIFFERENCES are deselected; it says why for each.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import uvicorn

from conftest import ROOT, need

HERE = Path(__file__).resolve().parent
CACHE = Path(sys.prefix) / "uvicorn-sdist"
TEST_FILE = "tests/protocols/test_http.py"
# test id -> why FastProtocol differs from uvicorn's httptools protocol there
DIFFERENCES = {
    "test_shutdown_during_idle[fast]":
        "a draining worker gives an idle keep-alive connection IDLE_GRACE (0.5 s) to bring "
        "one last request instead of closing it at once: README, How it works (drain)",
    **{f"test_chunked_encoding{case}[fast]":
       "the test app sends content-length with transfer-encoding: chunked; RFC 9112 6.1 says "
       "a sender MUST NOT, h11 refuses the response, so the server answers 500 (issue 22, "
       "item 2; docs/limits-and-security.md)"
       for case in ("", "_empty_body", "_head_request")},
    **{f"test_invalid_header_name[fast-reject_{case}]":
       "uvicorn asserts no 500 for an invalid response header name (its response_started is "
       "set before the headers are checked, so it only closes); here the start is checked "
       "whole first and the client gets a 500 (issue 22, item 2)"
       for case in ("space", "null", "open_paren", "close_paren", "less_than", "greater_than",
                    "at", "comma", "semicolon", "colon", "open_bracket", "close_bracket",
                    "open_brace", "close_brace", "equals", "double_quote", "backslash", "tab",
                    "del")},
    "test_response_header_splitting[fast]":
        "the same quirk for a CR LF in a header value: nothing of it reaches the wire either "
        "way, and here the client gets a 500 instead of a bare close",
    "test_keepalive_timeout_with_pipelined_websocket_upgrade[fast-websockets-sansio]":
        "uvicorn skips it for its own httptools protocol (by class name): httptools never "
        "upgrades with the keep-alive timer armed; the same holds here",
    "test_keepalive_timeout_with_pipelined_websocket_upgrade[fast-wsproto]":
        "as above, with wsproto",
}
MIN_PASSED = 60  # 70 pass with uvicorn 0.54.0 (22 deselected)


def unpacked_suite() -> Path:
    """uvicorn's tests for the installed version, fetched with pip on first use."""
    version = uvicorn.__version__
    root = CACHE / f"uvicorn-{version}"
    if not (root / TEST_FILE).exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:",
             "--no-deps", f"uvicorn=={version}", "--dest", str(CACHE)],
            capture_output=True, text=True, timeout=300, check=False)
        sdist = CACHE / f"uvicorn-{version}.tar.gz"
        need(done.returncode == 0 and sdist.exists(),
             f"needs uvicorn's sdist from PyPI (pip download uvicorn=={version}): "
             f"{done.stderr.strip()[-300:]}")
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(f"uvicorn-{version}/tests/") and m.isfile()
                       and ".." not in Path(m.name).parts]
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 (and Debian's backport)
                tar.extractall(CACHE, members=members, filter="data")
            else:  # regular files under tests/ only, checked above
                tar.extractall(CACHE, members=members)  # noqa: S202
    shutil.copyfile(HERE / "uvicorn_suite" / "protocols_conftest.py",
                    root / "tests" / "protocols" / "conftest.py")
    return root


def test_uvicorn_http_protocol_suite() -> None:
    root = unpacked_suite()
    deselect = [arg for test in DIFFERENCES for arg in ("--deselect", f"{TEST_FILE}::{test}")]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
         "-c", "/dev/null", "--rootdir", str(root), "-W", "ignore::DeprecationWarning",
         TEST_FILE, *deselect],
        cwd=root, capture_output=True, text=True, timeout=300, check=False,
        env={"PYTHONPATH": str(ROOT / "service"), "PATH": "/usr/bin:/bin"})
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= MIN_PASSED, summary
    assert "failed" not in summary and "error" not in summary, summary
