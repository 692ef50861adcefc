"""Config parsing: pure, and every mistake is a ConfigError with a useful one-line message."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hello_cluster.config import (
    BindAddress,
    load_config,
    parse_bind,
    parse_duration,
    parse_forwarded,
    parse_workers,
)
from hello_cluster.errors import ConfigError


@pytest.mark.parametrize("spec, expected", [
    ("127.0.0.1:8085", BindAddress("127.0.0.1", 8085)),
    (":80", BindAddress("0.0.0.0", 80)),
    ("localhost:0", BindAddress("localhost", 0)),
    ("[::1]:9000", BindAddress("::1", 9000)),
    ("unix:/run/app.sock", BindAddress(path="/run/app.sock")),
])
def test_parse_bind_accepts(spec: str, expected: BindAddress) -> None:
    assert parse_bind(spec) == expected


@pytest.mark.parametrize("spec, words", [
    (":99999", "above 65535"),
    ("host:", "no port"),
    ("[::1]", "no port"),
    ("unix:", "no path"),
    ("unix:/" + "a" * 200, "longer than"),
    ("::1:80", "brackets"),
    ("", "empty"),
    ("127.0.0.1:http", "not a number"),
    ("[nothex]:80", "not an IPv6"),
    ("bad_host!:80", "not an IP"),
])
def test_parse_bind_rejects(spec: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_bind(spec)


@pytest.mark.parametrize("text, seconds", [
    ("30", 30.0), ("30s", 30.0), ("500ms", 0.5), ("2m", 120.0), ("1.5s", 1.5), ("1h", 3600.0),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "-1", "abc", "1d", "9999999h", "1e3"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_duration(text)


def test_workers() -> None:
    assert parse_workers("auto") is None
    assert parse_workers("3") == 3
    for bad in ("0", "-2", "x", "100000", ""):
        with pytest.raises(ConfigError):
            parse_workers(bad)


def test_flag_wins_over_env_and_env_over_default() -> None:
    env = {"HELLO_CLUSTER_WORKERS": "4", "HELLO_CLUSTER_BIND": "127.0.0.1:1,[::1]:2"}
    cfg = load_config(["--workers", "2"], env)
    assert cfg.workers == 2
    assert cfg.binds == (BindAddress("127.0.0.1", 1), BindAddress("::1", 2))
    assert load_config([], {}).binds == (BindAddress("0.0.0.0", 8085),)
    assert load_config([], {"HELLO_CLUSTER_REQUEST_METRICS": "false"}).request_metrics is False
    assert load_config(["--no-request-metrics"], {}).request_metrics is False


def test_errors_name_the_source() -> None:
    with pytest.raises(ConfigError, match="HELLO_CLUSTER_WORKERS"):
        load_config([], {"HELLO_CLUSTER_WORKERS": "many"})
    with pytest.raises(ConfigError, match="--graceful-timeout"):
        load_config(["--graceful-timeout", "soon"], {})
    with pytest.raises(ConfigError, match="unrecognized arguments"):
        load_config(["--frobnicate"], {})
    with pytest.raises(ConfigError, match="must differ"):
        load_config(["--bind", "127.0.0.1:9", "--metrics-bind", "127.0.0.1:9"], {})


@given(st.text(max_size=80))
def test_parse_bind_raises_only_config_error(text: str) -> None:
    try:
        parse_bind(text)
    except ConfigError:
        pass


@given(st.text(max_size=40))
def test_parse_duration_raises_only_config_error(text: str) -> None:
    try:
        value = parse_duration(text)
    except ConfigError:
        return
    assert 0 <= value <= 7 * 24 * 3600


@given(st.lists(st.text(max_size=20), max_size=4))
def test_load_config_raises_only_config_error(argv: list[str]) -> None:
    try:
        load_config(argv, {})
    except ConfigError:
        pass
    except SystemExit as done:  # only what argparse answers and exits 0 for, asked in full
        assert done.code == 0 and {"-h", "--help", "--version"} & set(argv), argv


def test_unicode_digits_are_not_numbers() -> None:
    """'²'.isdigit() is True but int('²') fails: found by hypothesis on the LISTEN_* parser."""
    for parse, text in ((parse_workers, "²"), (parse_bind, "127.0.0.1:²"),
                        (parse_duration, "²s")):
        with pytest.raises(ConfigError):
            parse(text)


def test_forwarded_allow_ips() -> None:
    assert parse_forwarded("none") == () and parse_forwarded("") == ()
    assert parse_forwarded("*") == ("*",)
    assert parse_forwarded("127.0.0.1, 10.0.0.0/8,::1") == ("127.0.0.1", "10.0.0.0/8", "::1")
    with pytest.raises(ConfigError, match="'proxy.local' is not an IP address or network"):
        parse_forwarded("127.0.0.1,proxy.local")
