"""TLS on the app listeners (tls.py) with certificates made by `openssl` and real clients.

Clients verify: `curl --cacert` and Python's ssl with the test CA and the host checked.
Covers mTLS, plain HTTP sent to the TLS port, bad files (exit 2, one line naming the file),
expired certificates (a warning), keyfile passwords, socket activation, and rotation by a
SIGHUP rolling reload under a request loop that must see no failure.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
from test_systemd_contract import activate, stop
from tls_pki import Pki, client_context, https_get, plain_http_status

from conftest import TEST_APPS, free_port, need_command, run_cli, wait_for
from hello_cluster.config import Config, load_config
from hello_cluster.errors import ConfigError
from hello_cluster.http import tls

HELLO = b"<h1>Hello Python!</h1><p>Hello Cluster!</p>"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(pki: Pki) -> tuple[Path, Path]:
    return pki.cert("server", 0x1001)


def tls_args(cert: tuple[Path, Path], *more: str) -> list[str]:
    return ["--ssl-certfile", str(cert[0]), "--ssl-keyfile", str(cert[1]), *more]


def wait_tls_ready(port: int, ctx: ssl.SSLContext) -> None:
    wait_for(lambda: https_get(port, ctx, timeout=2)[0] == 200, 15, what="TLS answers")


def test_verified_clients_plain_http_refused_metrics_plain(cluster, pki: Pki,
                                                           server: tuple[Path, Path]) -> None:
    curl = need_command("curl", "curl")
    c = cluster("--workers", "2", "--app", "hc_testapp:app", *tls_args(server), workers=2)
    workers = set(c.workers())
    status, body, serial = https_get(c.port, client_context(pki))
    assert (status, body, serial) == (200, HELLO, 0x1001)
    assert https_get(c.port, client_context(pki), "/client")[1] == b"127.0.0.1 https"
    assert https_get(c.port, client_context(pki), host="localhost")[0] == 200  # SAN DNS
    out = subprocess.run([curl, "-sS", "--cacert", str(pki.ca), f"https://127.0.0.1:{c.port}/"],
                         capture_output=True, timeout=20)
    assert out.returncode == 0 and out.stdout == HELLO, out.stderr
    # Without the CA, verification fails: the server presents the test CA's certificate.
    out = subprocess.run([curl, "-sS", f"https://127.0.0.1:{c.port}/"], capture_output=True,
                         timeout=20)
    assert out.returncode == 60, (out.returncode, out.stderr)
    # Plain HTTP to the TLS port: no HTTP answer at all, let alone a 200.
    for _ in range(3):
        reply = plain_http_status(c.port)
        assert not reply.startswith(b"HTTP/1.1 200"), reply[:200]
        assert b"Hello" not in reply
    # The metrics port stays plain HTTP (Prometheus inside the network).
    assert c.metrics_get("/readyz")[0] == 200
    assert set(c.workers()) == workers, "a client's mistake cost a worker"
    # The files were checked in a child: the master never loaded the key or cryptography.
    assert "cryptography" not in Path(f"/proc/{c.pid}/maps").read_text()


def test_hostile_bytes_and_idle_connections_cost_nothing(cluster, pki: Pki,
                                                         server: tuple[Path, Path]) -> None:
    """Garbage, truncated and oversized TLS records, and connections that never shake
    hands: each is dropped by the worker, nobody else waits, no worker is lost."""
    c = cluster("--workers", "2", *tls_args(server), workers=2)
    workers = set(c.workers())
    hello = bytes.fromhex("16030100a5010000a10303") + os.urandom(32)  # a ClientHello's start
    payloads = [os.urandom(4096), b"\x16\x03\x01\xff\xff" + os.urandom(100), hello,
                b"\x16\x03\x03\x00\x05\x01\x00\x00\x01\x00", b"\x00" * 65536,
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]
    for payload in payloads:
        with socket.create_connection(("127.0.0.1", c.port), timeout=5) as sock, \
                contextlib.suppress(OSError):
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
    idle = [socket.create_connection(("127.0.0.1", c.port), timeout=5) for _ in range(200)]
    try:
        for _ in range(10):
            assert https_get(c.port, client_context(pki), timeout=5)[0] == 200
    finally:
        for sock in idle:
            sock.close()
    assert set(c.workers()) == workers
    assert "Traceback" not in c.log


def test_mtls_required(cluster, pki: Pki, server: tuple[Path, Path]) -> None:
    curl = need_command("curl", "curl")
    client = pki.cert("client", 0x2001, client=True)
    stranger_ca = Pki(pki.root / "stranger")
    stranger = stranger_ca.cert("stranger", 0x2002, client=True)
    c = cluster("--workers", "1", *tls_args(server, "--ssl-cert-reqs", "required",
                                            "--ssl-ca-certs", str(pki.ca)), workers=1)
    assert https_get(c.port, client_context(pki, client))[0] == 200
    out = subprocess.run([curl, "-sS", "--cacert", str(pki.ca), "--cert", str(client[0]),
                          "--key", str(client[1]), f"https://127.0.0.1:{c.port}/"],
                         capture_output=True, timeout=20)
    assert out.returncode == 0 and out.stdout == HELLO, out.stderr
    # No certificate, or one from another CA: the handshake is refused, nothing served.
    for ctx in (client_context(pki), client_context(pki, stranger)):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            https_get(c.port, ctx)
    out = subprocess.run([curl, "-sS", "--cacert", str(pki.ca), f"https://127.0.0.1:{c.port}/"],
                         capture_output=True, timeout=20)
    assert out.returncode != 0 and HELLO not in out.stdout
    assert len(c.workers()) == 1


def test_optional_client_certificate(cluster, pki: Pki, server: tuple[Path, Path]) -> None:
    client = pki.cert("client-opt", 0x2101, client=True)
    c = cluster("--workers", "1", *tls_args(server, "--ssl-cert-reqs", "optional",
                                            "--ssl-ca-certs", str(pki.ca)), workers=1)
    wait_tls_ready(c.port, client_context(pki))
    assert https_get(c.port, client_context(pki, client))[0] == 200


class TlsLoop:
    """New verified connections one after another in a thread; bounded in count and time."""

    def __init__(self, port: int, ctx: ssl.SSLContext, max_seconds: float = 40.0,
                 max_requests: int = 20_000) -> None:
        self.port, self.ctx = port, ctx
        self.max_seconds, self.max_requests = max_seconds, max_requests
        self.serials: list[int] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        for _ in range(self.max_requests):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            try:
                status, body, serial = https_get(self.port, self.ctx, timeout=10)
            except (OSError, ssl.SSLError, http.client.HTTPException, AssertionError) as err:
                self.failures.append(f"{type(err).__name__}: {err!r} at {time.time():.3f}")
                continue
            if status == 200 and body == HELLO:
                self.serials.append(serial)
            else:
                self.failures.append(f"HTTP {status}")

    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=20)


def replace(src: tuple[Path, Path], dst: tuple[Path, Path]) -> None:
    """Swap files the way a deploy tool should: write aside, then rename over."""
    for s, d in zip(src, dst, strict=True):
        shutil.copyfile(s, d.with_suffix(".new"))
        os.replace(d.with_suffix(".new"), d)


@pytest.mark.parametrize("preload", [[], ["--preload"]], ids=["fork", "preload"])
def test_sighup_rotates_the_certificate_without_failures(cluster, pki: Pki,
                                                         tmp_path: Path,
                                                         preload: list[str]) -> None:
    """With --preload the template reads the files; a reload's new template reads them
    again, and one that cannot abandons the reload the same way."""
    old, new = pki.cert("rot-old", 0x3001), pki.cert("rot-new", 0x3002)
    live = (tmp_path / "live.pem", tmp_path / "live.key")
    replace(old, live)
    c = cluster("--workers", "2", *tls_args(live), *preload, workers=2)
    old_workers = set(c.workers())
    loop = TlsLoop(c.port, client_context(pki))
    try:
        wait_for(lambda: len(loop.serials) >= 20, 20, what="requests before the reload")
        replace(new, live)
        c.signal(signal.SIGHUP)
        wait_for(lambda: "reload complete" in c.log, 30, what="the reload to complete")
        wait_for(lambda: not old_workers & set(c.workers()), 30, what="old workers to drain")
        seen = len(loop.serials)
        wait_for(lambda: len(loop.serials) >= seen + 20 or not loop.running(), 30,
                 what="requests after the reload")
    finally:
        loop.stop()
    assert len(loop.serials) >= seen + 20, (loop.failures[:5], c.log[-3000:])
    assert loop.failures == []
    assert loop.serials[0] == 0x3001 and set(loop.serials[seen:]) == {0x3002}
    assert set(loop.serials) == {0x3001, 0x3002}

    # A broken certificate on the next reload: the new workers cannot load it, the reload is
    # abandoned, the workers serving the good one stay, and one line says which file and why.
    before = set(c.workers())
    wrong_key = pki.key("rot-wrong")
    shutil.copyfile(wrong_key, live[1].with_suffix(".new"))
    os.replace(live[1].with_suffix(".new"), live[1])
    c.signal(signal.SIGHUP)
    wait_for(lambda: "reload failed" in c.log, 20, what="the reload to fail")
    line = next(x for x in c.log.splitlines() if "reload failed" in x)
    assert f"--ssl-certfile {live[0]} with --ssl-keyfile {live[1]}" in line, line
    assert "does not match the certificate" in line, line
    assert "Traceback" not in c.log
    # The new workers that could not load it are gone, the ones serving the good one stay.
    wait_for(lambda: set(c.workers()) == before, 5, what="only the old workers left")
    assert https_get(c.port, client_context(pki))[2] == 0x3002
    assert c.metric("hello_cluster_workers_ready") == 2
    assert c.proc.poll() is None


def _exit2(*args: str, env: dict[str, str] | None = None) -> str:
    result = run_cli("--metrics-bind", "off", "--workers", "1", "--bind",
                     f"127.0.0.1:{free_port()}", *args, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_unusable_files_and_options_exit_2_naming_the_file(pki: Pki, server: tuple[Path, Path],
                                                           tmp_path: Path) -> None:
    cert, key = str(server[0]), str(server[1])
    other_key = str(pki.key("other"))
    enc = pki.cert("enc", 0x4001, password="correct horse")
    unreadable = tmp_path / "garbage.pem"
    unreadable.write_text("not a certificate\n")
    cases: list[tuple[list[str], list[str]]] = [
        (["--ssl-certfile", str(tmp_path / "missing.pem")],
         ["missing.pem", "cannot read it", "No such file"]),
        (["--ssl-certfile", str(unreadable), "--ssl-keyfile", key],
         ["garbage.pem", "no PEM certificate"]),
        (["--ssl-certfile", cert, "--ssl-keyfile", str(unreadable)],
         ["--ssl-keyfile", "garbage.pem", "private key"]),
        (["--ssl-certfile", cert, "--ssl-keyfile", other_key],
         ["other.key", "does not match the certificate"]),
        (["--ssl-certfile", str(enc[0]), "--ssl-keyfile", str(enc[1])],
         ["enc.key", "encrypted", "--ssl-keyfile-password-file"]),
        (["--ssl-certfile", cert, "--ssl-keyfile", key, "--ssl-ca-certs", str(unreadable)],
         ["--ssl-ca-certs", "garbage.pem", "no PEM certificate"]),
        (["--ssl-certfile", cert, "--ssl-keyfile", key, "--ssl-cert-reqs", "required"],
         ["--ssl-cert-reqs required needs --ssl-ca-certs"]),
        (["--ssl-certfile", cert, "--ssl-keyfile", key, "--ssl-cert-reqs", "optional"],
         ["--ssl-cert-reqs optional needs --ssl-ca-certs"]),
        (["--ssl-certfile", cert, "--ssl-keyfile", key, "--ssl-ciphers", "NO-SUCH-CIPHER"],
         ["--ssl-ciphers", "no cipher matches"]),
        (["--ssl-keyfile", key], ["--ssl-keyfile needs --ssl-certfile"]),
        (["--ssl-certfile", cert, "--ssl-cert-reqs", "sometimes"],
         ["--ssl-cert-reqs", "'sometimes' is not one of none, optional, required"]),
        (["--ssl-keyfile-password", "hunter2"],
         ["visible to every user", "--ssl-keyfile-password-file"]),
    ]
    for args, expected in cases:
        line = _exit2(*args)
        for text in expected:
            assert text in line, (args, line)
        assert "hunter2" not in line and "correct horse" not in line
    # A wrong password, from either source.
    wrong = tmp_path / "wrong-password"
    wrong.write_text("battery staple\n")
    line = _exit2("--ssl-certfile", str(enc[0]), "--ssl-keyfile", str(enc[1]),
                  "--ssl-keyfile-password-file", str(wrong))
    assert "enc.key: wrong password" in line, line
    line = _exit2("--ssl-certfile", str(enc[0]), "--ssl-keyfile", str(enc[1]),
                  env={"HELLO_CLUSTER_SSL_KEYFILE_PASSWORD": "battery staple"})
    assert "enc.key: wrong password" in line and "battery" not in line, line


def test_encrypted_key_with_password_file_or_env(cluster, pki: Pki, tmp_path: Path) -> None:
    enc = pki.cert("enc-ok", 0x5001, password="correct horse")
    secret = tmp_path / "password"
    secret.write_text("correct horse\n")  # the trailing newline of `echo` is not part of it
    secret.chmod(0o600)
    c = cluster("--workers", "1", *tls_args(enc, "--ssl-keyfile-password-file", str(secret)),
                workers=1)
    assert https_get(c.port, client_context(pki))[2] == 0x5001
    # From the environment: served, and the app does not inherit the variable.
    probe = tmp_path / "hc_envprobe.py"
    probe.write_text(
        "import os\n"
        "async def app(scope, receive, send):\n"
        "    if scope['type'] != 'http':\n        return\n"
        "    body = ','.join(k for k in os.environ if 'PASSWORD' in k).encode()\n"
        "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        "    await send({'type': 'http.response.body', 'body': body})\n")
    c = cluster("--workers", "1", "--app", "hc_envprobe:app", *tls_args(enc), workers=1,
                env={"HELLO_CLUSTER_SSL_KEYFILE_PASSWORD": "correct horse",
                     "PYTHONPATH": f"{tmp_path}:{TEST_APPS}"})
    assert https_get(c.port, client_context(pki))[1] == b""


def test_expired_certificate_warns_and_serves(cluster, pki: Pki) -> None:
    expired = pki.cert("expired", 0, start="20200101000000Z", end="20200102000000Z")
    c = cluster("--workers", "1", *tls_args(expired), workers=1)
    assert "the certificate expired on 2020-01-02 00:00 UTC" in c.log
    # Served: a client that does not verify dates still gets the page; one that does refuses.
    lax = ssl.create_default_context(cafile=str(pki.ca))
    lax.check_hostname = False
    lax.verify_mode = ssl.CERT_NONE
    assert https_get(c.port, lax)[0] == 200
    with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
        https_get(c.port, client_context(pki))


def test_not_yet_valid_is_a_warning(pki: Pki) -> None:
    future = pki.cert("future", 0, start="20990101000000Z", end="20991231000000Z")
    cfg = Config(ssl_certfile=str(future[0]), ssl_keyfile=str(future[1]))
    warnings = tls.check_at_start(cfg)
    assert len(warnings) == 1 and "not valid until 2099-01-01 00:00 UTC" in warnings[0]
    now = datetime.datetime(2099, 6, 1, tzinfo=datetime.UTC)
    assert tls.check_at_start(cfg, now) == []


def test_key_and_certificate_in_one_file(pki: Pki, server: tuple[Path, Path],
                                         tmp_path: Path) -> None:
    both = tmp_path / "both.pem"
    both.write_bytes(server[0].read_bytes() + server[1].read_bytes())
    assert tls.check_at_start(Config(ssl_certfile=str(both))) == []
    tls.server_context(Config(ssl_certfile=str(both)))


def test_tls_options_from_env_and_password_never_in_repr() -> None:
    cfg = load_config([], env={"HELLO_CLUSTER_SSL_CERTFILE": "/c.pem",
                               "HELLO_CLUSTER_SSL_KEYFILE": "/k.pem",
                               "HELLO_CLUSTER_SSL_KEYFILE_PASSWORD": "s3cret-value",
                               "HELLO_CLUSTER_SSL_CA_CERTS": "/ca.pem",
                               "HELLO_CLUSTER_SSL_CERT_REQS": "Required",
                               "HELLO_CLUSTER_SSL_CIPHERS": "ECDHE+AESGCM",
                               "HELLO_CLUSTER_ACCESS_LOG": "true"})
    assert (cfg.ssl_certfile, cfg.ssl_keyfile, cfg.ssl_ca_certs, cfg.ssl_cert_reqs,
            cfg.ssl_ciphers, cfg.access_log) == ("/c.pem", "/k.pem", "/ca.pem", "required",
                                                 "ECDHE+AESGCM", True)
    assert cfg.ssl_keyfile_password == "s3cret-value" and "s3cret" not in repr(cfg)
    with pytest.raises(ConfigError, match="both set"):
        tls.check_options(load_config(
            ["--ssl-certfile", "/c.pem", "--ssl-keyfile-password-file", "/p"],
            env={"HELLO_CLUSTER_SSL_KEYFILE_PASSWORD": "x"}))


def test_tls_on_socket_activated_listener(pki: Pki, server: tuple[Path, Path],
                                          tmp_path: Path) -> None:
    port = free_port()
    proc = activate(tmp_path, f"127.0.0.1:{port}", names="http",
                    args=("--workers", "2", "--metrics-bind", "off", *tls_args(server)))
    try:
        wait_tls_ready(port, client_context(pki))
        assert https_get(port, client_context(pki)) == (200, HELLO, 0x1001)
        assert not plain_http_status(port).startswith(b"HTTP/1.1 200")
        assert "(socket activation)" in (tmp_path / "activate.log").read_text()
    finally:
        stop(proc)
