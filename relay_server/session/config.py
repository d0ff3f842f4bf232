"""SessionConfig: what a session is started with, and the checks it must pass first.

Field names follow what Livepeer runners take (subscribe_url, publish_url, control_url,
events_url, data_url, gateway_request_id), so a caller can switch between a runner and this relay.
validate() reports every problem at once, each tied to its field, so that an API can answer
with one precise error instead of a round trip per mistake.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from relay_server.media.encoder import EncoderSettings
from relay_server.media.scaler import ScaleMode
from relay_server.media.timeline import LATENCY_BUDGET
from relay_server.session.paths import VideoMode
from relay_server.session.relay import FillMode

SESSION_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
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


class FieldViolation(NamedTuple):
    field: str  # the request field at fault, e.g. "publish_url" or "encoder.gop"
    description: str


class ConfigError(ValueError):
    """The configuration is invalid; `violations` says where and why."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))
        self.violations = violations


class HostNotAllowed(ConfigError):
    """A URL names a host outside the relay's allow-list."""


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


def validate(config: SessionConfig) -> None:
    """Raise ConfigError listing every problem."""
    problems: list[FieldViolation] = []

    def check(ok: bool, name: str, description: str) -> None:
        if not ok:
            problems.append(FieldViolation(name, description))

    id_ok = bool(SESSION_ID.fullmatch(config.session_id))
    check(id_ok, "session_id", "use 1-128 letters, digits, '.', '_' or '-'")
    for name in ("subscribe_url", "publish_url", "processor_url"):
        check(bool(getattr(config, name)), name, "required")
    for name, url in config.urls.items():
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append(FieldViolation(name, f"must be an http(s) URL with a host, got {url!r}"))
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
    """Raise HostNotAllowed unless every URL's host is in `allowed_hosts` (empty: any host)."""
    if not allowed_hosts:
        return
    problems = [
        FieldViolation(name, f"host {urlsplit(url).hostname!r} is not in the relay's allow-list")
        for name, url in config.urls.items()
        if (urlsplit(url).hostname or "").lower() not in allowed_hosts
    ]
    if problems:
        raise HostNotAllowed(problems)
