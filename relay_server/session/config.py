"""SessionConfig: what a session is started with, and the checks it must pass first.

Field names follow what Livepeer runners take (subscribe_url, publish_url, control_url,
events_url, data_url, gateway_request_id), so a caller can switch between a runner and this relay.
validate() reports every problem at once, each tied to its field, so that an API can answer
with one precise error instead of a round trip per mistake.
"""

from __future__ import annotations

import ipaddress
import json
import re
import unicodedata
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from relay_server.errors import ConfigError, FieldViolation, HostNotAllowed
from relay_server.media.encoder import EncoderSettings
from relay_server.media.scaler import ScaleMode
from relay_server.media.timeline import LATENCY_BUDGET
from relay_server.session.paths import VideoMode
from relay_server.session.relay import FillMode

SESSION_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
GATEWAY_REQUEST_ID = re.compile(r"[!-~]{0,128}")  # printable ASCII, no spaces
MAX_URL_LENGTH = 2048  # characters; far beyond any trickle or processor URL
DEFAULT_PORTS = {"http": 80, "https": 443}
# A DNS name's label (underscores too: container service names carry them), or an IDN one.
HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
X264_PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
    "placebo",
)
MAX_SIDE = 4096
DEFAULT_SIZE = 512  # ComfyStream's default resolution


class Endpoint(NamedTuple):
    """A URL taken apart and normalised: the same endpoint however it was spelled."""

    scheme: str
    host: str  # lower case; an IPv6 address without brackets
    port: int  # the scheme's default when the URL gives none
    path: str  # without a trailing slash
    query: str


def parse_url(url: str) -> Endpoint:
    """The endpoint an http(s) URL names; ValueError saying what is wrong with it."""
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"{len(url)} characters, at most {MAX_URL_LENGTH}")
    if unicodedata.normalize("NFKC", url) != url:
        raise ValueError("has characters that NFKC normalisation changes")
    if any(char.isspace() or unicodedata.category(char).startswith("C") for char in url):
        raise ValueError("has spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:  # a bad port or bracketed address
        raise ValueError(f"is not a valid URL ({error})") from None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"must be an http(s) URL with a host, got {_shown(url)}")
    if "@" in parts.netloc:
        raise ValueError("must not carry user info (user@ or user:password@)")
    if "#" in url:
        raise ValueError("must not have a fragment (#...)")
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"port must be 1-65535, got {port}")
    host = parts.hostname
    if not _valid_host(host, bracketed=parts.netloc.startswith("[")):
        raise ValueError(f"host {_shown(host)} is not a valid host name or address")
    return Endpoint(
        parts.scheme, host, port or DEFAULT_PORTS[parts.scheme], parts.path.rstrip("/"), parts.query
    )


def _valid_host(host: str, *, bracketed: bool) -> bool:
    if bracketed:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
        return True
    labels = host.removesuffix(".").split(".")
    if labels[-1].isdigit():  # an address, not a name: no top-level domain is all digits
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    return len(ascii_host) <= 253 and all(HOST_LABEL.fullmatch(label) for label in ascii_host.split("."))


def _shown(value: str, limit: int = 80) -> str:
    """`value` quoted for an error message, cut short: messages travel in trailers."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


@dataclass(frozen=True)
class SessionConfig:
    session_id: str
    subscribe_url: str
    publish_url: str
    processor_url: str
    control_url: str = ""
    events_url: str = ""
    data_url: str = ""
    gateway_request_id: str = ""
    prompts: tuple[dict[str, Any], ...] = ()  # none: the processor runs in passthrough mode
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    max_fps: float = 0.0  # frames per second sent to the processor at most (0: the input's rate)
    encoder: EncoderSettings = field(default_factory=EncoderSettings)
    scale_mode: ScaleMode = ScaleMode.LETTERBOX
    allow_shared_processor: bool = False
    fill: FillMode = FillMode.REPEAT
    offer_timeout: float = 60.0
    mode: VideoMode = VideoMode.AUTO
    latency_budget: float = LATENCY_BUDGET  # seconds a frame may leave behind the input's live edge

    @property
    def urls(self) -> dict[str, str]:
        """Every URL the session connects to, by field name (empty ones left out)."""
        named = {
            "subscribe_url": self.subscribe_url,
            "publish_url": self.publish_url,
            "processor_url": self.processor_url,
            "control_url": self.control_url,
            "events_url": self.events_url,
            "data_url": self.data_url,
        }
        return {name: url for name, url in named.items() if url}

    @cached_property
    def weight(self) -> int:
        """Roughly the bytes this configuration holds (its prompts as compact JSON, its strings):
        what keeping it costs once its session has ended."""
        prompts = json.dumps(self.prompts, separators=(",", ":"), ensure_ascii=False)
        strings = (self.session_id, self.gateway_request_id, *self.urls.values())
        return len(prompts.encode()) + sum(len(text.encode()) for text in strings)


def validate(config: SessionConfig) -> None:
    """Raise ConfigError listing every problem."""
    problems: list[FieldViolation] = []

    def check(ok: bool, name: str, description: str) -> None:
        if not ok:
            problems.append(FieldViolation(name, description))

    id_ok = bool(SESSION_ID.fullmatch(config.session_id))
    check(id_ok, "session_id", "use 1-128 letters, digits, '.', '_' or '-'")
    gateway_ok = bool(GATEWAY_REQUEST_ID.fullmatch(config.gateway_request_id))
    check(gateway_ok, "gateway_request_id", "use at most 128 printable ASCII characters, no spaces")
    for name in ("subscribe_url", "publish_url", "processor_url"):
        check(bool(getattr(config, name)), name, "required")
    endpoints: dict[str, Endpoint] = {}
    for name, url in config.urls.items():
        try:
            endpoints[name] = parse_url(url)
        except ValueError as error:
            problems.append(FieldViolation(name, str(error)))
    same_channel = "subscribe_url" in endpoints and endpoints.get("publish_url") == endpoints["subscribe_url"]
    check(not same_channel, "publish_url", "must differ from subscribe_url: the output would feed the input")
    for side in ("width", "height"):
        value = getattr(config, side)
        check(0 < value <= MAX_SIDE and value % 2 == 0, side, f"must be even, 2..{MAX_SIDE}, got {value}")
    fps = config.max_fps
    check(0 <= fps <= 240, "max_fps", f"must be 0 (the input's rate) to 240, got {fps:g}")
    check(
        not (fps and config.mode is VideoMode.PASSTHROUGH),
        "max_fps",
        "must be 0 in passthrough mode: the input is forwarded frame for frame",
    )
    presets = ", ".join(X264_PRESETS)
    check(config.encoder.preset in X264_PRESETS, "encoder.preset", f"must be one of {presets}")
    check(
        100_000 <= config.encoder.bitrate <= 50_000_000,
        "encoder.bitrate",
        f"must be 100000..50000000 bits per second, got {config.encoder.bitrate}",
    )
    check(0.1 <= config.encoder.gop <= 60, "encoder.gop", f"must be 0.1..60 s, got {config.encoder.gop:g}")
    check(0 < config.offer_timeout <= 600, "offer_timeout", f"must be 0..600 s, got {config.offer_timeout:g}")
    budget = config.latency_budget
    check(0.05 <= budget <= 10, "latency_budget", f"must be 0.05..10 s, got {budget:g}")
    for index, prompt in enumerate(config.prompts):
        check(
            isinstance(prompt, dict) and bool(prompt),
            f"prompts[{index}]",
            "must be a non-empty ComfyUI API workflow object",
        )
    if problems:
        raise ConfigError(problems)


def resize_problem(config: SessionConfig, width: object, height: object) -> str:
    """Why the session cannot be resized to width×height ("" when it can)."""
    if config.mode is VideoMode.PASSTHROUGH:
        return "a passthrough session forwards the input at its own size: it cannot be resized"
    for value in (width, height):
        if not isinstance(value, int) or not 0 < value <= MAX_SIDE or value % 2:
            return f"width and height must be even, 2..{MAX_SIDE}, got {width}x{height}"
    return ""


def check_hosts(config: SessionConfig, allowed_hosts: frozenset[str]) -> None:
    """Raise HostNotAllowed unless every URL's host is in `allowed_hosts` (empty: any host).
    The URLs must have passed validate()."""
    if not allowed_hosts:
        return
    hosts = {name: parse_url(url).host for name, url in config.urls.items()}
    problems = [
        FieldViolation(name, f"host {_shown(host)} is not in the relay's allow-list")
        for name, host in hosts.items()
        if host not in allowed_hosts
    ]
    if problems:
        raise HostNotAllowed(problems)
