"""TLS for the app listeners: check the operator's files in the master, build contexts in workers.

The master never serves app traffic, so it never needs a context: it only checks at start
that the files are readable and parse, that the key matches the certificate and that the
options fit together, so a typo is exit 2 with one line instead of a pool of workers failing
one after the other. The check runs in a short-lived child (`check_in_child`): the master
never holds the private key, and never maps `cryptography` (12 MB of master RSS).

Each worker builds its own context when it starts (before dropping privileges, so the key
may stay readable by root only). A SIGHUP rolling reload therefore rotates the certificate:
new workers load the new files, old ones drain with the old. A new worker that cannot load
them reports one line to the master and exits, and the master abandons the reload
(`Master.abort_reload`), leaving the old workers serving.

The keyfile password comes from the environment or from a file, never from a flag: argv is
readable by every local user (`ps`, /proc/PID/cmdline), while systemd credentials and
Kubernetes Secrets are files. A file is re-read by every new worker, so a reload can also
rotate an encrypted key together with its password.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import ssl
from collections.abc import Callable
from typing import Any

import uvloop

from hello_cluster.config import Config
from hello_cluster.errors import ConfigError

CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL,
             "required": ssl.CERT_REQUIRED}
PASSWORD_ENV = "HELLO_CLUSTER_SSL_KEYFILE_PASSWORD"
MAX_PASSWORD_FILE = 64 * 1024


class TlsError(ConfigError):
    """A certificate, key or TLS option the operator must fix (exit 2 at start)."""


def enabled(cfg: Config) -> bool:
    return cfg.ssl_certfile is not None


def check_options(cfg: Config) -> None:
    """Combinations that cannot work, refused before any file is read."""
    tls_only = {"--ssl-keyfile": cfg.ssl_keyfile, "--ssl-ca-certs": cfg.ssl_ca_certs,
                "--ssl-ciphers": cfg.ssl_ciphers,
                "--ssl-keyfile-password-file": cfg.ssl_keyfile_password_file,
                PASSWORD_ENV: cfg.ssl_keyfile_password,
                "--ssl-cert-reqs": None if cfg.ssl_cert_reqs == "none" else cfg.ssl_cert_reqs}
    if cfg.ssl_certfile is None:
        given = [name for name, value in tls_only.items() if value is not None]
        if given:
            raise TlsError(f"{given[0]} needs --ssl-certfile (TLS is off without a "
                           "certificate)")
        return
    if cfg.ssl_keyfile_password is not None and cfg.ssl_keyfile_password_file is not None:
        raise TlsError(f"{PASSWORD_ENV} and --ssl-keyfile-password-file are both set; "
                       "keep one")
    if cfg.ssl_cert_reqs != "none" and cfg.ssl_ca_certs is None:
        # With `optional` and no CA, every client that does send a certificate would fail.
        raise TlsError(f"--ssl-cert-reqs {cfg.ssl_cert_reqs} needs --ssl-ca-certs: the CA "
                       "certificates that client certificates must chain to")


def read_file(option: str, path: str, limit: int = 16 * 1024 * 1024) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError as err:
        raise TlsError(f"{option} {path}: cannot read it ({err.strerror}); check the path "
                       "and that hello-cluster's user may read it") from None


def keyfile_password(cfg: Config) -> str | None:
    """The password from the environment, or read now from --ssl-keyfile-password-file."""
    if cfg.ssl_keyfile_password_file is None:
        return cfg.ssl_keyfile_password
    data = read_file("--ssl-keyfile-password-file", cfg.ssl_keyfile_password_file,
                     MAX_PASSWORD_FILE)
    text = data.decode("utf-8", "replace").rstrip("\r\n")  # echo and editors add a newline
    if not text:
        raise TlsError(f"--ssl-keyfile-password-file {cfg.ssl_keyfile_password_file}: the "
                       "file is empty")
    return text


def _files(cfg: Config) -> str:
    assert cfg.ssl_certfile is not None
    if cfg.ssl_keyfile is None:
        return f"--ssl-certfile {cfg.ssl_certfile}"
    return f"--ssl-certfile {cfg.ssl_certfile} with --ssl-keyfile {cfg.ssl_keyfile}"


def describe_ssl_error(err: ssl.SSLError) -> str:
    """OpenSSL's reason codes in words an operator can act on."""
    reason = err.reason or ""
    if reason == "KEY_VALUES_MISMATCH":
        return "the private key does not match the certificate"
    if reason in ("BAD_DECRYPT", "BAD_PASSWORD_READ", "PROCESSING_ERROR") or "decrypt" in str(err):
        return "the key could not be decrypted: wrong or missing password"
    if reason in ("NO_START_LINE", "PEM_LIB", "BAD_END_LINE", "BAD_BASE64_DECODE"):
        return "not a PEM certificate and key (expected -----BEGIN ... blocks)"
    return f"OpenSSL refused it ({reason or err.strerror or err})"


def server_context(cfg: Config) -> ssl.SSLContext:
    """The context a worker serves with, built the way uvicorn's create_ssl_context does."""
    assert cfg.ssl_certfile is not None
    password = keyfile_password(cfg)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    get_password: Callable[[], str] | None = (lambda: password) if password else None
    try:
        ctx.load_cert_chain(cfg.ssl_certfile, cfg.ssl_keyfile, get_password)
    except ssl.SSLError as err:
        raise TlsError(f"{_files(cfg)}: {describe_ssl_error(err)}") from None
    except OSError as err:
        raise TlsError(f"{_files(cfg)}: cannot read ({err.strerror})") from None
    ctx.verify_mode = ssl.VerifyMode(CERT_REQS[cfg.ssl_cert_reqs])
    if cfg.ssl_ca_certs is not None:
        try:
            ctx.load_verify_locations(cfg.ssl_ca_certs)
        except ssl.SSLError as err:
            raise TlsError(f"--ssl-ca-certs {cfg.ssl_ca_certs}: no PEM CA certificate in it "
                           f"({err.reason or err})") from None
        except OSError as err:
            raise TlsError(f"--ssl-ca-certs {cfg.ssl_ca_certs}: cannot read it "
                           f"({err.strerror})") from None
    if cfg.ssl_ciphers is not None:
        try:
            ctx.set_ciphers(cfg.ssl_ciphers)
        except ssl.SSLError:
            raise TlsError(f"--ssl-ciphers {cfg.ssl_ciphers!r}: no cipher matches; see "
                           "`openssl ciphers -v 'STRING'`") from None
    return ctx


def check_at_start(cfg: Config, now: datetime.datetime | None = None) -> list[str]:
    """Refuse unusable TLS files (TlsError, exit 2); return warnings (expiry) to log.

    `cryptography` parses each file on its own first, for a message naming the file and
    what is wrong with it; then an SSLContext is built as a worker would (OpenSSL checks
    that the key matches the certificate). Nothing loaded here outlives the call.
    """
    check_options(cfg)
    if cfg.ssl_certfile is None:
        return []
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    cert_data = read_file("--ssl-certfile", cfg.ssl_certfile)
    try:
        chain = x509.load_pem_x509_certificates(cert_data)
    except ValueError:
        raise TlsError(f"--ssl-certfile {cfg.ssl_certfile}: no PEM certificate in it "
                       "(expected -----BEGIN CERTIFICATE-----)") from None
    key_option, key_path = (("--ssl-keyfile", cfg.ssl_keyfile) if cfg.ssl_keyfile
                            else ("--ssl-certfile", cfg.ssl_certfile))
    key_data = read_file(key_option, key_path) if cfg.ssl_keyfile else cert_data
    password = keyfile_password(cfg)
    secret = password.encode() if password else None
    try:
        load_pem_private_key(_key_block(key_data), secret)
    except TypeError as err:  # encrypted without a password, or a password for a plain key
        how = ("set HELLO_CLUSTER_SSL_KEYFILE_PASSWORD or --ssl-keyfile-password-file"
               if secret is None else "drop the password")
        raise TlsError(f"{key_option} {key_path}: {err}; {how}") from None
    except ValueError as err:
        what = ("wrong password, or not a PEM private key" if secret is not None
                else f"not a usable PEM private key ({str(err).splitlines()[0]})")
        raise TlsError(f"{key_option} {key_path}: {what}") from None
    finally:
        del key_data, secret
    if cfg.ssl_ca_certs is not None:
        try:
            x509.load_pem_x509_certificates(read_file("--ssl-ca-certs", cfg.ssl_ca_certs))
        except ValueError:
            raise TlsError(f"--ssl-ca-certs {cfg.ssl_ca_certs}: no PEM certificate in it "
                           "(expected -----BEGIN CERTIFICATE-----)") from None
    server_context(cfg)  # key matches certificate, CA file and ciphers load; then dropped
    return validity_warnings(cfg.ssl_certfile, chain[0], now)


def _key_block(data: bytes) -> bytes:
    """The private key's PEM block when key and certificate share one file."""
    start = data.find(b"-----BEGIN ")
    while start >= 0:
        if b"PRIVATE KEY-----" in data[start:start + 64]:
            return data[start:]
        start = data.find(b"-----BEGIN ", start + 1)
    return data


def validity_warnings(path: str, cert: object, now: datetime.datetime | None = None
                      ) -> list[str]:
    """An expired or not-yet-valid certificate is served anyway, with a warning: refusing
    to start would turn a certificate problem into an outage of every client."""
    from cryptography import x509

    assert isinstance(cert, x509.Certificate)
    now = now or datetime.datetime.now(datetime.UTC)
    after, before = cert.not_valid_after_utc, cert.not_valid_before_utc
    if now > after:
        return [f"--ssl-certfile {path}: the certificate expired on {after:%Y-%m-%d %H:%M} "
                "UTC; clients that verify will refuse it: renew it and send SIGHUP"]
    if now < before:
        return [f"--ssl-certfile {path}: the certificate is not valid until "
                f"{before:%Y-%m-%d %H:%M} UTC; clients that verify will refuse it until "
                "then (check this machine's clock)"]
    return []


def check_in_child(cfg: Config) -> list[str]:
    """check_at_start in a forked child that reports back over a pipe and exits.

    Called before the master installs signal handlers or forks workers; the master has no
    threads, so forking here is safe. Raises TlsError as check_at_start would.
    """
    if not enabled(cfg):
        check_options(cfg)
        return []
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: check, report, exit without running the parent's cleanup
        code = 0
        try:
            os.close(read_fd)
            try:
                report: dict[str, object] = {"warnings": check_at_start(cfg)}
            except TlsError as err:
                report = {"error": str(err)}
            with os.fdopen(write_fd, "w") as out:
                out.write(json.dumps(report))
        except BaseException:  # a bug in the check: the parent says so
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as answer:
        text = answer.read()
    _, status = os.waitpid(pid, 0)
    if not text or status != 0:
        raise RuntimeError(f"the TLS file check failed in its child (status {status:#x})")
    result: dict[str, Any] = json.loads(text)
    if "error" in result:
        raise TlsError(str(result["error"]))
    return [str(w) for w in result["warnings"]]


def forget_password_env() -> None:
    """Once read into the Config, keep the password out of what the app and its children
    inherit through os.environ."""
    os.environ.pop(PASSWORD_ENV, None)


# A TLS handshake gets what a request head gets on the plain port (HEAD_TIMEOUT of the
# protocols): asyncio's and uvloop's default is 60 s, and a handshake in progress is not yet
# a connection of the protocol, so neither --limit-concurrency nor the head deadline sees it.
# 1,300 silent clients on the TLS port pinned a worker at its fd limit for that minute.
HANDSHAKE_TIMEOUT = 10.0


class HandshakeDeadlineLoop(uvloop.Loop):
    """uvloop, with every TLS listener's handshakes bounded by HANDSHAKE_TIMEOUT.

    uvicorn's Server.startup (and the neighbour help's listeners) call create_server with
    `ssl=` only; this is the one place every one of those calls passes through.
    """

    async def create_server(  # type: ignore[override]  # forwards every overload as is
            self, *args: Any, **kwargs: Any) -> asyncio.AbstractServer:
        if kwargs.get("ssl") is not None:
            kwargs.setdefault("ssl_handshake_timeout", HANDSHAKE_TIMEOUT)
        server: asyncio.AbstractServer = await super().create_server(*args, **kwargs)
        return server


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvicorn's `loop=` hook: a custom import string names the loop factory itself."""
    return HandshakeDeadlineLoop()
