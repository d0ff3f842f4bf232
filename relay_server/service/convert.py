"""Proto ↔ domain: StartSessionRequest → SessionConfig, SessionSnapshot → Session.

Conversion is where proto defaults become the domain's (0 → the default size, unset → 60 s...);
what no proto value can express wrongly is left to config.validate().
"""

from __future__ import annotations

import math
import uuid
from typing import Any

from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.struct_pb2 import Struct

from relay_server.api.relay.v1 import relay_service_pb2 as pb
from relay_server.errors import ConfigError, FieldViolation
from relay_server.media.encoder import EncoderSettings
from relay_server.media.scaler import ScaleMode
from relay_server.media.timeline import LATENCY_BUDGET
from relay_server.session.config import DEFAULT_SIZE, SessionConfig
from relay_server.session.paths import VideoMode
from relay_server.session.relay import FillMode, QueueDepth
from relay_server.session.session import SessionSnapshot, SessionState

SCALE_MODES = {
    pb.SCALE_MODE_UNSPECIFIED: ScaleMode.LETTERBOX,
    pb.SCALE_MODE_LETTERBOX: ScaleMode.LETTERBOX,
    pb.SCALE_MODE_CROP: ScaleMode.CROP,
}
FILLS = {
    pb.OUTPUT_FILL_UNSPECIFIED: FillMode.REPEAT,
    pb.OUTPUT_FILL_REPEAT: FillMode.REPEAT,
    pb.OUTPUT_FILL_HOLD: FillMode.HOLD,
}
MODES = {
    pb.SESSION_MODE_UNSPECIFIED: VideoMode.AUTO,
    pb.SESSION_MODE_TRANSCODE: VideoMode.TRANSCODE,
    pb.SESSION_MODE_PASSTHROUGH: VideoMode.PASSTHROUGH,
    pb.SESSION_MODE_AUTO: VideoMode.AUTO,
}
STATES = {
    SessionState.STARTING: pb.SESSION_STATE_STARTING,
    SessionState.RUNNING: pb.SESSION_STATE_RUNNING,
    SessionState.DEGRADED: pb.SESSION_STATE_DEGRADED,
    SessionState.STOPPING: pb.SESSION_STATE_STOPPING,
    SessionState.STOPPED: pb.SESSION_STATE_STOPPED,
    SessionState.FAILED: pb.SESSION_STATE_FAILED,
}
DEFAULT_OFFER_TIMEOUT = 60.0


def new_session_id(replica: str | None) -> str:
    return str(uuid.uuid4()) if replica is None else f"{replica}.{uuid.uuid4()}"


def to_config(request: pb.StartSessionRequest, replica: str | None = None) -> SessionConfig:
    """The session a StartSessionRequest asks for; ConfigError for values no field can hold.
    Without a session id it gets a UUID, qualified as "REPLICA.UUID" by a named `replica` (a
    proxy in front of several sends the session's later calls to it by that)."""
    problems: list[FieldViolation] = []
    scale_mode = SCALE_MODES.get(request.scale_mode)
    if scale_mode is None:
        problems.append(FieldViolation("scale_mode", f"unknown value {request.scale_mode}"))
    fill = FILLS.get(request.output_fill)
    if fill is None:
        problems.append(FieldViolation("output_fill", f"unknown value {request.output_fill}"))
    mode = MODES.get(request.mode)
    if mode is None:
        problems.append(FieldViolation("mode", f"unknown value {request.mode}"))
    if problems:
        raise ConfigError(problems)
    assert scale_mode is not None and fill is not None and mode is not None
    defaults = EncoderSettings()
    encoder = request.encoder
    return SessionConfig(
        session_id=request.session_id or new_session_id(replica),
        subscribe_url=request.subscribe_url,
        publish_url=request.publish_url,
        processor_url=request.processor_url,
        control_url=request.control_url,
        events_url=request.events_url,
        data_url=request.data_url,
        gateway_request_id=request.gateway_request_id,
        prompts=tuple(to_dicts(request.prompts)),
        width=request.width or DEFAULT_SIZE,
        height=request.height or DEFAULT_SIZE,
        max_fps=request.max_fps,
        encoder=EncoderSettings(
            preset=encoder.preset or defaults.preset,
            bitrate=encoder.bitrate or defaults.bitrate,
            gop=seconds(encoder.gop) if encoder.HasField("gop") else defaults.gop,
            fps=defaults.fps,
        ),
        scale_mode=scale_mode,
        allow_shared_processor=request.allow_shared_processor,
        fill=fill,
        offer_timeout=(
            seconds(request.offer_timeout) if request.HasField("offer_timeout") else DEFAULT_OFFER_TIMEOUT
        ),
        mode=mode,
        latency_budget=(
            seconds(request.latency_budget) if request.HasField("latency_budget") else LATENCY_BUDGET
        ),
    )


def seconds(duration: Duration) -> float:
    """A Duration in seconds, whatever its values (ToTimedelta overflows on huge ones)."""
    return duration.seconds + duration.nanos / 1e9


def to_dicts(structs: Any) -> list[dict[str, Any]]:
    return [json_format.MessageToDict(struct) for struct in structs]


def to_structs(values: list[dict[str, Any]]) -> list[Struct]:
    structs = []
    for value in values:
        struct = Struct()
        struct.update(value)
        structs.append(struct)
    return structs


def to_request(config: SessionConfig) -> pb.StartSessionRequest:
    """The configuration as a StartSessionRequest, defaults filled in."""
    return pb.StartSessionRequest(
        session_id=config.session_id,
        subscribe_url=config.subscribe_url,
        publish_url=config.publish_url,
        control_url=config.control_url,
        events_url=config.events_url,
        data_url=config.data_url,
        gateway_request_id=config.gateway_request_id,
        processor_url=config.processor_url,
        prompts=to_structs(list(config.prompts)),
        width=config.width,
        height=config.height,
        max_fps=config.max_fps,
        encoder=pb.EncoderSettings(
            preset=config.encoder.preset, bitrate=config.encoder.bitrate, gop=duration(config.encoder.gop)
        ),
        scale_mode=pb.SCALE_MODE_CROP if config.scale_mode is ScaleMode.CROP else pb.SCALE_MODE_LETTERBOX,
        allow_shared_processor=config.allow_shared_processor,
        output_fill=pb.OUTPUT_FILL_HOLD if config.fill is FillMode.HOLD else pb.OUTPUT_FILL_REPEAT,
        offer_timeout=duration(config.offer_timeout),
        mode={mode: value for value, mode in MODES.items() if value}[config.mode],
        latency_budget=duration(config.latency_budget),
    )


def to_session(snapshot: SessionSnapshot) -> pb.Session:
    stats, rates, link, queues = snapshot.stats, snapshot.rates, snapshot.stats.link, snapshot.stats.queues
    session = pb.Session(
        session_id=snapshot.config.session_id,
        state=STATES[snapshot.state],
        reason=snapshot.reason,
        config=to_request(snapshot.config),
        stats=pb.SessionStats(
            decoded_fps=rates.decoded,
            sent_fps=rates.sent,
            returned_fps=rates.returned,
            encoded_fps=rates.encoded,
            published_fps=rates.published,
            segments_in_per_second=rates.segments_in,
            segments_out_per_second=rates.segments_out,
            bytes_in=stats.decoder.bytes_read,
            bytes_out=stats.sink.bytes,
            frames_decoded=stats.frames_decoded,
            frames_sent=link.send.frames,
            frames_returned=stats.frames_returned,
            frames_encoded=stats.frames_encoded,
            frames_published=stats.frames_published,
            latency=pb.LatencyStats(
                p50=duration(link.latency_p50),
                p95=duration(link.latency_p95),
                p99=duration(link.latency_p99),
                average=duration(link.latency_mean),
            ),
            queues=[_queue(q) for q in queues],
            drops=stats.drops,
            webrtc_state=link.peer_state or link.state.value,
            fast_path=stats.implementation,
            frames_filled=stats.frames_filled,
            reconnects=stats.reconnects,
            segments_in=stats.feed.segments,
            segments_out=stats.sink.segments,
            send_path=stats.paths.send,
            send_path_reason=stats.paths.send_reason,
            output_path=stats.paths.output,
            output_path_reason=stats.paths.output_reason,
            path_switches=stats.paths.switches,
        ),
    )
    session.created_time.FromDatetime(snapshot.created)
    session.state_time.FromDatetime(snapshot.state_since)
    return session


def _queue(depth: QueueDepth) -> pb.QueueStats:
    return pb.QueueStats(name=depth.name, depth=depth.depth, capacity=depth.capacity, unit=depth.unit)


def duration(seconds: float) -> Duration | None:
    """A Duration, or None (unset) for an unmeasured NaN."""
    if math.isnan(seconds):
        return None
    duration = Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration
