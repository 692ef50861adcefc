"""`--config FILE` (TOML) and `hello-cluster config` (issue 24, item 1).

Precedence flag > env > file > default; every mistake in the file is one line naming the
file, the key and the fix (exit 2), whatever bytes the file holds.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import run_cli
from hello_cluster.config import OPTIONS, BindAddress, Config, describe, load_config
from hello_cluster.configfile import parse_config
from hello_cluster.errors import ConfigError

NAMES = [o.name for o in OPTIONS if o.name != "config"]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "hello-cluster.toml"
    path.write_text(text)
    return str(path)


def test_precedence_flag_env_file_default(tmp_path: Path) -> None:
    path = write(tmp_path, 'workers = 4\nmax-requests = 1000\nbacklog-never = 0\n'
                 .replace("backlog-never = 0\n", "graceful-timeout = \"20s\"\n"))
    cfg = load_config(["--config", path, "--workers", "2"],
                      {"HELLO_CLUSTER_MAX_REQUESTS": "7"})
    assert cfg.workers == 2  # flag over file
    assert cfg.max_requests == 7  # env over file
    assert cfg.graceful_timeout == 20.0  # file over default
    assert cfg.backoff_max == Config.backoff_max  # default
    by_env = load_config([], {"HELLO_CLUSTER_CONFIG": path})
    assert by_env.workers == 4 and by_env.config == path


def test_repeatable_options_take_a_list_or_one_string(tmp_path: Path) -> None:
    listed = load_config(["--config", write(tmp_path, 'bind = ["127.0.0.1:8085", '
                                                      '"unix:/run/hc.sock"]\n')], {})
    assert listed.binds == (BindAddress("127.0.0.1", 8085), BindAddress(path="/run/hc.sock"))
    single = load_config(["--config", write(tmp_path, 'bind = "[::1]:9000"\n')], {})
    assert single.binds == (BindAddress("::1", 9000),)


def test_every_option_can_be_given_its_default_in_a_file(tmp_path: Path) -> None:
    """The file reaches every option: each default, written as TOML, gives the default."""
    lines = []
    for opt in OPTIONS:
        if opt.default is None or opt.name == "config" or opt.env_only:
            continue
        if opt.default in ("true", "false"):
            lines.append(f"{opt.name} = {opt.default}")
        else:
            lines.append(f'{opt.name} = "{opt.default}"')
    cfg = load_config(["--config", write(tmp_path, "\n".join(lines) + "\n")], {})
    plain = load_config([], {})
    assert cfg == Config(**{**plain.__dict__, "config": cfg.config})


@pytest.mark.parametrize(("text", "words"), [
    ("max_requests = 10\n", ["max_requests", "unknown setting", "did you mean 'max-requests'"]),
    ("wrokers = 2\n", ["wrokers", "did you mean 'workers'"]),
    ("zzz = 1\n", ["zzz", "unknown setting", "hello-cluster --help"]),
    ("workers = true\n", ["workers", "expected a string or a number, got a boolean"]),
    ('preload = "yes"\n', ["preload", "expected true or false, got a string"]),
    ('workers = "many"\n', ["workers", "is not a worker count"]),
    ("bind = []\n", ["bind", "empty list"]),
    ("bind = [1]\n", ["bind", "has no port"]),
    ("workers = [1, 2]\n", ["workers", "expected a string or a number, got a list"]),
    ("[server]\nworkers = 2\n", ["server", "unknown setting"]),
    ("workers = 2\nworkers = 3\n", ["not valid TOML"]),
    ("workers = \n", ["not valid TOML"]),
    ('config = "/etc/other.toml"\n', ["config", "cannot name another"]),
    ('ssl-keyfile-password = "hunter2"\n', ["ssl-keyfile-password", "not in a file"]),
    ('graceful-timeout = "soon"\n', ["graceful-timeout"]),
])
def test_mistakes_name_the_file_and_the_key(tmp_path: Path, text: str, words: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(["--config", path], {})
    message = str(caught.value)
    assert f"--config {path}" in message and "\n" not in message, message
    for word in words:
        assert word in message, message


def test_unreadable_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        load_config(["--config", str(tmp_path / "missing.toml")], {})
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"workers = 2\n\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(["--config", str(binary)], {})


toml_scalars = st.one_of(st.booleans(), st.integers(-10**6, 10**6),
                         st.floats(allow_nan=False, allow_infinity=False),
                         st.text(string.printable, max_size=12))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*NAMES, "bogus", "max_requests"]),
                       st.one_of(toml_scalars, st.lists(toml_scalars, max_size=3)),
                       max_size=5))
def test_any_table_gives_a_config_or_one_error_line(tmp_path_factory: Any,
                                                    table: dict[str, Any]) -> None:
    import json

    def toml(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(toml(x) for x in v) + "]"
        if isinstance(v, str):
            return json.dumps(v)
        return repr(v)

    text = "".join(f"{k} = {toml(v)}\n" for k, v in table.items())
    path = write(tmp_path_factory.mktemp("toml"), text)
    try:
        load_config(["--config", path], {})
    except ConfigError as err:
        assert "\n" not in str(err) and f"--config {path}" in str(err)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_is_parsed_or_refused_in_one_line(text: str) -> None:
    try:
        parse_config(text, "f.toml", NAMES, frozenset({"bind"}), frozenset({"preload"}), {})
    except ConfigError as err:
        assert str(err).startswith("--config f.toml: ")


def test_config_command_prints_values_and_sources(tmp_path: Path) -> None:
    path = write(tmp_path, 'workers = 3\nmax-requests = 1000\nmax-worker-memory = "300MB"\n')
    proc = run_cli("config", "--config", path, "--graceful-timeout", "9s",
                   env={"HELLO_CLUSTER_MAX_REQUESTS": "5"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert f"workers = 3  # --config {path}: workers" in lines
    assert "max-requests = 5  # HELLO_CLUSTER_MAX_REQUESTS" in lines
    assert "graceful-timeout = 9.0  # --graceful-timeout" in lines
    assert f"max-worker-memory = 300000000  # --config {path}: max-worker-memory" in lines
    assert "backoff-max = 30.0  # --backoff-max default" in lines
    assert describe(["--config", path], {}) == describe(["--config", path], {})
    bad = run_cli("config", "--config", write(tmp_path, "wrokers = 2\n"))
    assert bad.returncode == 2 and "did you mean 'workers'" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_a_bad_file_stops_the_start_with_exit_2(tmp_path: Path) -> None:
    proc = run_cli("--config", write(tmp_path, "workers = 0\n"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "workers" in proc.stderr


def test_a_real_master_runs_what_the_file_says(cluster: Any, tmp_path: Path) -> None:
    path = write(tmp_path, 'workers = 2\napp = "hc_testapp:app"\nmax-requests = 1000\n')
    c = cluster("--config", path, workers=2)
    assert len(c.workers()) == 2
    assert c.metric("hello_cluster_workers_desired") == 2
    assert c.get("/")[0] == 200
