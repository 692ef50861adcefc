"""`--config FILE`: the options as TOML, keyed by their long names.

A file holds what a gunicorn.conf.py or a pm2 ecosystem file holds, but as data: every key
is an option's long name (`workers = 4`, `max-requests = 1000`, `bind = ["0.0.0.0:8085",
"unix:/run/hc.sock"]`), and each value goes through the same parser as the flag and the env
var, so a file can say nothing the command line could not. Precedence is flag > env > file
> default. Reading the file is pure (text in, values or one ConfigError out), so hypothesis
can throw any bytes at it.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

from hello_cluster.errors import ConfigError

MAX_FILE = 1024 * 1024  # a settings file; anything bigger is a mistake
NOT_IN_FILE = {"config": "a config file cannot name another; use --config once"}

# What the file gives one option: its text for the option's parser, a tuple of texts for a
# repeatable one, or a bool for an on/off switch.
FileValue = str | tuple[str, ...] | bool


def read_config(path: str) -> str:
    """The file's text, or one line naming the file and what to do."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot read it ({err.strerror}); check the path "
                          "and that the service's user may read it") from None
    if len(data) > MAX_FILE:
        raise ConfigError(f"--config {path}: larger than {MAX_FILE // 1024} KiB; is it the "
                          "right file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte {err.start}); save it as "
                          "UTF-8") from None


def parse_config(text: str, path: str, names: Sequence[str], repeatable: frozenset[str],
                 switches: frozenset[str], env_only: Mapping[str, str]
                 ) -> dict[str, FileValue]:
    """Each key checked against the options; values turned into what their parser reads."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--config {path}: not valid TOML: {err}") from None
    values: dict[str, FileValue] = {}
    for key, value in table.items():
        where = f"--config {path}: {key}"
        if key in NOT_IN_FILE:
            raise ConfigError(f"{where}: {NOT_IN_FILE[key]}")
        if key in env_only:
            raise ConfigError(f"{where}: {env_only[key]}")
        if key not in names:
            raise ConfigError(f"{where}: unknown setting{_did_you_mean(key, names)}")
        values[key] = _value(where, value, key in repeatable, key in switches)
    return values


def _did_you_mean(key: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(key.replace("_", "-").lower(), names, n=1)
    return f"; did you mean {close[0]!r}?" if close else "; see hello-cluster --help"


def _value(where: str, value: Any, repeat: bool, switch: bool) -> FileValue:
    if switch:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {_kind(value)}")
    if repeat and isinstance(value, list):
        if not value:
            raise ConfigError(f"{where}: an empty list; leave the key out for the default")
        return tuple(_scalar(f"{where}[{i}]", item) for i, item in enumerate(value))
    scalar = _scalar(where, value)
    return (scalar,) if repeat else scalar


def _scalar(where: str, value: Any) -> str:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a string or a number, got a boolean")
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return repr(value)
    raise ConfigError(f"{where}: expected a string or a number, got {_kind(value)}")


def _kind(value: Any) -> str:
    return {list: "a list", dict: "a table", str: "a string", int: "a number",
            float: "a number"}.get(type(value), f"a {type(value).__name__}")
