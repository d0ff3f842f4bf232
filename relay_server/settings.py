"""Environment settings shared by every layer, each with its documented meaning.

TRICKLE_CHUNK_SIZE   largest piece, in bytes, a subscriber hands out per read of a segment
                     (default 65536; at least 1024).
TRICKLE_BUFFER_SIZE  bytes a session buffers between the subscriber and the decoder before
                     the subscriber waits (default 4194304).
TRICKLE_TIMEOUT      seconds a trickle request may go without progress (connecting, waiting
                     for a segment to start, or mid-body) before it is re-issued (default 20).
TRICKLE_WORKERS      threads each of a session's codecs (the input decoder, the output encoder)
                     may use; slice threads, which add no latency (default 2).
TRICKLE_STARTUP_GRACE seconds a session waits for its input channel to appear; then it fails
                     with "input channel URL not found after N s" (default 10; more than 0).
RELAY_EVENT_LOOP     "uvloop" (default; about a fifth less CPU per frame, see eventloop.py) or
                     "asyncio", the standard library's loop, for every trickle-relay command.

`trickle-relay serve` takes each of the following as a flag too; a flag given wins over its variable.

RELAY_LISTEN         HOST:PORT the gRPC service listens on (--listen; default 127.0.0.1:50051;
                     0.0.0.0 or [::] for every interface, port 0 for any free port).
RELAY_MAX_SESSIONS   sessions the relay runs at once; more are refused with RESOURCE_EXHAUSTED
                     (--max-sessions; default 8).
RELAY_ALLOW_HOSTS    comma-separated host names the relay may connect to for a session's channels
                     and processor, the processor's ICE candidates included; a URL with any other
                     host is refused (--allow-hosts; default empty: any host). No redirect is
                     followed, allow-list or not.
RELAY_METRICS_LISTEN HOST:PORT of the Prometheus endpoint, GET /metrics (--metrics-listen; default
                     127.0.0.1:9102; empty or "off": no endpoint).
RELAY_AUTH_TOKEN     bearer token RelayService calls must carry as `authorization: Bearer <token>`
                     metadata; health and reflection stay open (--auth-token; default none:
                     no authentication).
RELAY_TLS_CERT       PEM certificate chain file and
RELAY_TLS_KEY        PEM private key file: with both, the gRPC service speaks TLS only (--tls-cert,
                     --tls-key; both or neither; default none: plaintext).
RELAY_LOG_FORMAT     "text" (one line per record, `[session=ID]` on a session's records) or "json"
                     (one object per line: time, level, logger, message, session_id, exc_info)
                     (--log-format; default text).
RELAY_LOG_LEVEL      DEBUG, INFO, WARNING, ERROR or CRITICAL (--log-level; default INFO).
RELAY_DRAIN_GRACE    seconds in-flight RPCs get to finish on SIGTERM/SIGINT once every session is
                     stopped, before they are cancelled (--drain-grace; default 5).
RELAY_WORKERS        processes running sessions behind the one gRPC endpoint, each with its own
                     event loop; a new session goes to the one running the fewest (--workers;
                     default 0: one per two cores this process may use, its container's CPU
                     limit counted, so 1 on two cores; 1: this process runs them).
RELAY_REPLICA        this relay's name among replicas behind a proxy (1-63 letters, digits, '_'
                     or '-'; a StatefulSet pod's name): the session ids it makes start with
                     "NAME.", which the proxy routes by (--replica; default none: plain UUIDs).

`trickle-relay trickle-server` bounds what clients can make it hold with these, each a flag too.

TRICKLE_MAX_SEGMENT_BYTES   bytes one segment may hold; a POST going past it is answered 413 and the
                            segment dropped (--max-segment-bytes; default 67108864, 64 MiB).
TRICKLE_MAX_BUFFERED_BYTES  bytes all segments together may hold; a POST that needs more is answered
                            503 with Retry-After (--max-buffered-bytes; default 1073741824, 1 GiB).
TRICKLE_MAX_CHANNELS        channels at once; creating another is answered 503 with Retry-After
                            (--max-channels; default 1024).
TRICKLE_MAX_CONNECTIONS     open HTTP connections; another is answered 429 and closed
                            (--max-connections; default 512).
TRICKLE_HEADER_TIMEOUT      seconds a connection has to send a complete request head, after it
                            connects or finishes a request; then it is closed (--header-timeout;
                            default 30; more than 0).
TRICKLE_FIRST_BYTE_TIMEOUT  seconds a POST may wait for its first body byte; then it is answered 408
                            and closed (--first-byte-timeout; default 60; more than 0).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

_T = TypeVar("_T")


def env_int(name: str, default: int, *, minimum: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def env_float(name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if not value >= minimum:  # also rejects NaN
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def chunk_size() -> int:
    return env_int("TRICKLE_CHUNK_SIZE", 64 * 1024, minimum=1024)


def buffer_size() -> int:
    return env_int("TRICKLE_BUFFER_SIZE", 4 * 1024 * 1024, minimum=64 * 1024)


def startup_grace() -> float:
    return env_float("TRICKLE_STARTUP_GRACE", 10.0, minimum=0.01)


def request_timeout() -> float:
    return env_float("TRICKLE_TIMEOUT", 20.0, minimum=0.1)


def workers() -> int:
    return env_int("TRICKLE_WORKERS", 2, minimum=1)


# -- `trickle-relay serve` ------------------------------------------------------------------------
# Each parse_* function takes the text of a flag or a variable and raises ValueError saying what is
# wrong; each getter reads its RELAY_* variable (unset or blank: the default) and names it in errors.

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
METRICS_OFF = ("", "off")


def parse_host_port(text: str) -> tuple[str, int]:
    """ "HOST:PORT" (an IPv6 host in brackets; no host: 127.0.0.1) → (host, port)."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    host = host.strip("[]")
    if any(c.isspace() for c in host):
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def parse_optional_host_port(text: str) -> tuple[str, int] | None:
    """Like parse_host_port; empty or "off" → None (disabled)."""
    return None if text.strip().lower() in METRICS_OFF else parse_host_port(text)


def parse_count(text: str, *, minimum: int = 1) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise ValueError(f"must be at least {minimum}, got {value}")
    return value


def parse_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= value < float("inf"):  # also rejects NaN
        raise ValueError(f"must be a finite number of seconds, at least 0, got {text!r}")
    return value


def parse_timeout(text: str) -> float:
    value = parse_seconds(text)
    if value == 0:
        raise ValueError(f"must be more than 0 seconds, got {text!r}")
    return value


def parse_hosts(text: str) -> frozenset[str]:
    """ "h1,h2" → {"h1", "h2"} (lower case, blanks ignored; IPv6 with or without brackets);
    "" → empty: any host."""
    hosts = set()
    for item in text.split(","):
        host = item.strip().lower()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host:
            continue
        if any(c.isspace() or c in "/@[]" for c in host) or (":" in host and not _is_ipv6(host)):
            raise ValueError(f"expected comma-separated host names (no scheme or port), got {item.strip()!r}")
        hosts.add(host)
    return frozenset(hosts)


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def parse_log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in LOG_FORMATS:
        raise ValueError(f"expected one of {', '.join(LOG_FORMATS)}, got {text!r}")
    return value


def parse_log_level(text: str) -> str:
    value = text.strip().upper()
    if value not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return value


def parse_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise ValueError(f"no such file: {text!r}")
    return path


def _env(name: str, default: str, parse: Callable[[str], _T]) -> _T:
    raw = os.environ.get(name)
    text = default if raw is None or raw.strip() == "" else raw
    try:
        return parse(text)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def listen() -> tuple[str, int]:
    return _env("RELAY_LISTEN", "127.0.0.1:50051", parse_host_port)


def max_sessions() -> int:
    return _env("RELAY_MAX_SESSIONS", "8", parse_count)


def allow_hosts() -> frozenset[str]:
    return _env("RELAY_ALLOW_HOSTS", "", parse_hosts)


def metrics_listen() -> tuple[str, int] | None:
    raw = os.environ.get("RELAY_METRICS_LISTEN")
    if raw is not None and raw.strip().lower() in METRICS_OFF:
        return None  # set but empty: disabled (unlike the other variables, where blank means unset)
    return _env("RELAY_METRICS_LISTEN", "127.0.0.1:9102", parse_optional_host_port)


def auth_token() -> str | None:
    return os.environ.get("RELAY_AUTH_TOKEN") or None


def tls_cert() -> Path | None:
    return _env("RELAY_TLS_CERT", "", _optional_file)


def tls_key() -> Path | None:
    return _env("RELAY_TLS_KEY", "", _optional_file)


def _optional_file(text: str) -> Path | None:
    return parse_file(text) if text else None


def log_format() -> str:
    return _env("RELAY_LOG_FORMAT", "text", parse_log_format)


def log_level() -> str:
    return _env("RELAY_LOG_LEVEL", "INFO", parse_log_level)


def drain_grace() -> float:
    return _env("RELAY_DRAIN_GRACE", "5", parse_seconds)


def worker_processes() -> int:
    return _env("RELAY_WORKERS", "0", parse_worker_processes)


def parse_worker_processes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected a number of processes, got {text!r}") from None
    if value < 0:
        raise ValueError(f"must be at least 0 (0: one per two cores), got {value}")
    return value


REPLICA_NAME = re.compile(r"[A-Za-z0-9_-]{1,63}")


def parse_replica(text: str) -> str | None:
    """A replica name, or None when empty."""
    if text and not REPLICA_NAME.fullmatch(text):
        raise ValueError(f"use 1-63 letters, digits, '_' or '-', got {text!r}")
    return text or None


def replica() -> str | None:
    return _env("RELAY_REPLICA", "", parse_replica)


# -- `trickle-relay trickle-server`: the embedded trickle server's limits (trickle/limits.py) ------


# How each limit (a TrickleLimits field, which holds the defaults) is read; its variable is
# TRICKLE_ and the field's name in capitals.
TRICKLE_LIMITS: dict[str, Callable[[str], Any]] = {
    "max_segment_bytes": parse_count,
    "max_buffered_bytes": parse_count,
    "max_channels": parse_count,
    "max_connections": parse_count,
    "header_timeout": parse_timeout,
    "first_byte_timeout": parse_timeout,
}


def trickle_limit(name: str, default: Any) -> Any:
    """The trickle server's limit `name` from its variable, `default` when unset."""
    return _env(f"TRICKLE_{name.upper()}", str(default), TRICKLE_LIMITS[name])


EVENT_LOOPS = ("uvloop", "asyncio")


def event_loop() -> str:
    raw = os.environ.get("RELAY_EVENT_LOOP", "").strip().lower() or "uvloop"
    if raw not in EVENT_LOOPS:
        raise ValueError(f"RELAY_EVENT_LOOP must be one of {', '.join(EVENT_LOOPS)}, got {raw!r}")
    return raw
