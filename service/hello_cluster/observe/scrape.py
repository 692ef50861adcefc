"""What a /metrics request gets: a format we choose, and a render shared by a burst.

Two jobs, both about keeping a scrape cheap and harmless for the supervision loop:

- `choose_format` reads the `Accept` header and picks one of the two formats we serve.
  prometheus-client's `choose_encoder` copies the client's `version=` into the
  Content-Type and compares it as a version, so a header could make the master answer 500
  (`version=abc`) or raise out of the loop (`version=2.\\xe9`, not encodable in a header).
  Here the client only selects: every byte of our Content-Type is a constant, and no
  header value, however malformed, can raise.
- `Scrapes` renders once per format and hands the same body to every scrape that arrives
  within `window` seconds while the pool state is unchanged. A render costs about a
  millisecond of the master's loop; 2000 scrapes queued at once used to cost 2000 of them
  in a row, while supervision (and /livez) waited.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.exposition import generate_latest as generate_text
from prometheus_client.openmetrics.exposition import (
    CONTENT_TYPE_LATEST as CONTENT_TYPE_OPENMETRICS,
)
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from hello_cluster.observe.metrics import PoolStats

WINDOW = 0.25  # seconds a render is shared; below a worker's 0.1 s flush times a few


@dataclass(frozen=True)
class Format:
    name: str
    content_type: str
    encode: Callable[[CollectorRegistry], bytes]


def _openmetrics(registry: CollectorRegistry) -> bytes:
    return bytes(generate_openmetrics(registry, version="1.0.0"))


TEXT = Format("text", CONTENT_TYPE_PLAIN_0_0_4, generate_text)
OPENMETRICS = Format("openmetrics", CONTENT_TYPE_OPENMETRICS, _openmetrics)

@dataclass(frozen=True)
class MediaRange:
    type: str
    subtype: str
    params: tuple[tuple[str, str], ...]
    q: float


MAX_RANGES = 16  # scrapers send 1 to 5; all of a hostile 8 KiB header took over 1 ms
MAX_PARAMS = 4  # Prometheus 3 sends up to 3 (version, escaping, q)


def parse_accept(accept: str) -> list[MediaRange]:
    """The well-formed media ranges of an Accept header (RFC 9110 12.5.1); the rest dropped.

    Lenient on purpose: one malformed element does not spoil the others, and nothing raises.
    Bounded: only the first MAX_RANGES elements and MAX_PARAMS parameters of each are read,
    so a hostile 8 KiB header costs the master's loop what a scraper's does.
    """
    ranges = []
    for element in accept.split(",", MAX_RANGES)[:MAX_RANGES]:
        parts = element.split(";", MAX_PARAMS + 1)[:MAX_PARAMS + 1]
        kind, slash, sub = parts[0].strip().lower().partition("/")
        if not slash or not _is_token(kind) or not _is_token(sub) or (kind == "*" != sub):
            continue
        params: list[tuple[str, str]] = []
        q: float | None = 1.0
        for param in parts[1:]:
            if not param.strip():
                continue  # "a/b;;q=1": an empty parameter says nothing
            name, eq, value = param.strip().partition("=")
            name, value = name.strip().lower(), value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            if not eq or not _is_token(name):
                q = None
                break
            if name == "q":
                q = _qvalue(value)
                break  # what follows q are accept-ext parameters, not the media type's
            params.append((name, value))
        if q is not None:
            ranges.append(MediaRange(kind, sub, tuple(params), q))
    return ranges


@functools.lru_cache(maxsize=64)  # a scraper sends the same header every time
def choose_format(accept: str) -> Format:
    """OpenMetrics 1.0.0 when the scraper names it and prefers it, the text format otherwise.

    Each format gets the q of the most specific range that matches it (RFC 9110).
    OpenMetrics must be named (`application/openmetrics-text`, no version or 1.0.0): a
    wildcard alone (curl's `*/*`) gets text, as from prometheus-client; named, it wins ties.
    A header we cannot read, or one that accepts neither format, gets the text format:
    scrapers and humans with curl always get an answer, never a 406 or a 5xx.
    """
    ranges = parse_accept(accept)
    om_rank, om_q = _quality(ranges, "application", "openmetrics-text", "1.0.0")
    _, text_q = _quality(ranges, "text", "plain", "0.0.4")
    if om_rank == 2 and om_q > 0 and om_q >= text_q:
        return OPENMETRICS
    return TEXT


def _quality(ranges: list[MediaRange], kind: str, sub: str,
             version: str) -> tuple[int, float]:
    """(specificity, q) of the most specific range matching kind/sub at `version`.

    Specificity 2 is the type itself (without a version or with ours), 1 kind/*, 0 */*;
    (-1, 0.0) when nothing matches.
    """
    best_rank, best_q = -1, 0.0
    for r in ranges:
        if r.type == kind and r.subtype == sub:
            if dict(r.params).get("version", version) != version:
                continue  # asks for a version of the format we do not produce
            rank = 2
        elif r.type == kind and r.subtype == "*":
            rank = 1
        elif r.type == "*":
            rank = 0
        else:
            continue
        if rank > best_rank or (rank == best_rank and r.q > best_q):
            best_rank, best_q = rank, r.q  # a range named twice: its best q, in any order
    return best_rank, best_q


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token


def _is_token(s: str) -> bool:
    return _TOKEN.fullmatch(s) is not None


def _qvalue(s: str) -> float | None:
    """RFC 9110 qvalue: 0 to 1 with at most three decimals, else None (range dropped)."""
    whole, dot, frac = s.partition(".")
    if len(frac) > 3 or not frac.isascii() or (frac and not frac.isdigit()):
        return None
    if whole == "0":
        return float(f"0.{frac or 0}")
    if whole == "1" and set(frac) <= {"0"}:
        return 1.0
    return None


class Scrapes:
    """Renders for /metrics, one per format per `window`, shared by the scrapes in it.

    A cached body is reused only while it is younger than `window` and the pool numbers
    (workers desired, running, ready, restarts...) are those it shows: a scrape right after
    a worker died or became ready always sees it. What can lag by up to `window` are the
    workers' request counters (which already lag by up to their 0.1 s flush) and the
    master's process metrics. A failed render is remembered for the window too: the scrapes
    in it get `RenderFailed` at once, so a broken collector costs one render and one
    traceback per window, not one per scrape.
    """

    def __init__(self, registry: CollectorRegistry, stats: Callable[[], PoolStats],
                 window: float = WINDOW) -> None:
        self.registry = registry
        self.stats = stats
        self.window = window
        self.renders = 0
        self._cache: dict[str, tuple[float, tuple[object, ...], bytes | None]] = {}

    def body(self, fmt: Format, now: float) -> bytes:
        key = _pool_key(self.stats())
        cached = self._cache.get(fmt.name)
        if cached is not None and now - cached[0] < self.window and cached[1] == key:
            if cached[2] is None:
                raise RenderFailed(f"the last {fmt.name} render failed {now - cached[0]:.2f}s ago")
            return cached[2]
        self.renders += 1
        try:
            body = fmt.encode(self.registry)
        except Exception:
            self._cache[fmt.name] = (now, key, None)
            raise
        self._cache[fmt.name] = (now, key, body)
        return body


class RenderFailed(Exception):
    """The last render of this format failed within the window (and was logged then)."""


def _pool_key(stats: PoolStats) -> tuple[object, ...]:
    """The pool numbers a render shows, minus the ones that move with the clock alone."""
    return tuple(tuple(v.items()) if isinstance(v, dict) else v
                 for k, v in vars(stats).items() if k not in _MOVING)


_MOVING = frozenset({
    "backoff_seconds",  # shrinks every instant while a respawn waits
    "wakeups",  # grows with every turn of the loop, scrapes included
})
