"""Test certificates made by the real `openssl` command: a CA, servers, a client, bad ones.

Shared by test_tls.py and the systemd e2e step (LoadCredential=). Everything lives in one
directory the test owns; nothing is installed anywhere.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
from pathlib import Path

from conftest import need_command

# `openssl ca` needs a config for explicit start/end dates (expired, not yet valid);
# OpenSSL 3.0's `x509 -req` has only -days.
CA_CONF = """[ca]
default_ca = test_ca
[test_ca]
database = {dir}/index.txt
new_certs_dir = {dir}
default_md = sha256
policy = anything
copy_extensions = copy
unique_subject = no
rand_serial = yes
[anything]
commonName = supplied
"""


class Pki:
    """A CA and certificates it signs, all written under `root`."""

    def __init__(self, root: Path) -> None:
        self.openssl = need_command("openssl", "openssl")
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ca = root / "ca.pem"
        self.ca_key = root / "ca.key"
        self.run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", self.ca_key, "-out", self.ca, "-days", "3",
                 "-subj", "/CN=hello-cluster test CA")
        (root / "index.txt").write_text("")
        (root / "ca.conf").write_text(CA_CONF.format(dir=root))

    def run(self, *args: object) -> None:
        subprocess.run([self.openssl, *map(str, args)], check=True, capture_output=True,
                       timeout=30)

    def key(self, name: str, password: str | None = None) -> Path:
        path = self.root / f"{name}.key"
        self.run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-out", path, *(("-aes256", "-pass", f"pass:{password}") if password else ()))
        return path

    def cert(self, name: str, serial: int, key: Path | None = None, *, client: bool = False,
             password: str | None = None, start: str | None = None, end: str | None = None
             ) -> tuple[Path, Path]:
        """A certificate for 127.0.0.1, ::1 and localhost (or a client), signed by the CA."""
        key = key or self.key(name, password)
        csr, pem = self.root / f"{name}.csr", self.root / f"{name}.pem"
        usage = "clientAuth" if client else "serverAuth"
        san = "" if client else "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n"
        ext = self.root / f"{name}.ext"
        ext.write_text(f"{san}extendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n")
        self.run("req", "-new", "-key", key, "-out", csr, "-subj", f"/CN={name}",
                 *(("-passin", f"pass:{password}") if password else ()))
        if start or end:
            self.run("ca", "-batch", "-config", self.root / "ca.conf", "-cert", self.ca,
                     "-keyfile", self.ca_key, "-in", csr, "-out", pem, "-extfile", ext,
                     "-notext", "-startdate", start or "20200101000000Z",
                     "-enddate", end or "20991231000000Z")
        else:
            self.run("x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", self.ca_key,
                     "-set_serial", serial, "-days", "2", "-extfile", ext, "-out", pem)
        return pem, key


def client_context(pki: Pki, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    """Verification on: the test CA, and the host name or IP in the certificate."""
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


def https_get(port: int, ctx: ssl.SSLContext, path: str = "/", host: str = "127.0.0.1",
              timeout: float = 10.0) -> tuple[int, bytes, int]:
    """Status, body and the serial number of the certificate the server presented
    (-1 if the client does not verify)."""
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=timeout)
    try:
        conn.request("GET", path)
        assert conn.sock is not None
        # Before the response: a `connection: close` answer (a draining worker) drops sock.
        peer = conn.sock.getpeercert()  # empty when the client does not verify
        resp = conn.getresponse()
        body = resp.read()
        serial = int(str(peer["serialNumber"]), 16) if peer else -1
        return resp.status, body, serial
    finally:
        conn.close()


def plain_http_status(port: int, timeout: float = 5.0) -> bytes:
    """Send a plain HTTP request to a TLS port; return whatever comes back (if anything)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data = b""
        try:
            while len(data) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        return data
