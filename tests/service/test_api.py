"""RelayService end to end, through the gRPC API: a real server and client on loopback, a real
trickle server, the embedded WebRTC processor and a live source. Sessions are started, steered,
watched and stopped only through the API; the server side is touched only to drain it and, in
one test, to count (without changing) the snapshots a watch stream takes from its session.

The source is the live test pattern (1280×720); sessions letterbox it to 512×512, so the output's
top rows are a letterbox bar: black through passthrough or grayscale, near white when inverted.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import av
import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from relay_server.api.relay.v1 import relay_service_pb2 as pb
from relay_server.media.testsource import publish_pattern
from relay_server.processor import ProcessorServer
from relay_server.session.session import SessionSnapshot
from relay_server.trickle import Publisher
from relay_server.trickle.server import TrickleServer
from tests.service.conftest import (
    GRAYSCALE,
    INVERT,
    SIZE,
    LiveSource,
    MakeRelay,
    Output,
    Relay,
    Watcher,
    chroma_spread,
    drain_under_way,
    media_threads,
    seconds,
    session_threads,
    struct,
    top_bar_luma,
)

MakeOutput = Callable[[str], Output]
MakeWatcher = Callable[..., Watcher]

RUNNING = pb.SESSION_STATE_RUNNING
STOPPED = pb.SESSION_STATE_STOPPED


def inverted(frames: list[av.VideoFrame]) -> bool:
    return all(top_bar_luma(f) > 200 for f in frames)


def grayscale(frames: list[av.VideoFrame]) -> bool:
    return all(top_bar_luma(f) < 40 and chroma_spread(f) < 2 for f in frames)


def live(session: pb.Session) -> bool:
    return session.state == RUNNING and session.stats.decoded_fps > 0 and session.stats.returned_fps > 0


def session_tasks(*names: str) -> list[str]:
    """Unfinished tasks whose name mentions any of `names` (a session id, a channel URL)."""
    return [
        task.get_name()
        for task in asyncio.all_tasks()
        if not task.done() and any(name in task.get_name() for name in names)
    ]


# -- a. the life of a session ----------------------------------------------------------------------


async def test_a_session_runs_is_steered_and_stops_through_the_api(
    trickle_server: TrickleServer,
    processor: ProcessorServer,
    live_source: LiveSource,
    relay: Relay,
    make_output: MakeOutput,
    make_watcher: MakeWatcher,
) -> None:
    stub, out_url = relay.stub, trickle_server.channel_url("out")
    tasks_before = asyncio.all_tasks()
    output = make_output(out_url)
    started = await stub.StartSession(
        pb.StartSessionRequest(
            session_id="life",
            subscribe_url=live_source.url,
            publish_url=out_url,
            processor_url=processor.url,
            prompts=[struct(INVERT)],
            encoder=pb.EncoderSettings(gop=seconds(0.5)),  # an output segment every half second
        )
    )
    assert started.session.session_id == "life"
    assert started.session.state == pb.SESSION_STATE_STARTING

    # Every 0.25 s, and another watcher whose interval never comes due within the test: what it
    # gets, it gets because the session changed.
    ticking = make_watcher(stub, "life", 0.25)
    changes = make_watcher(stub, "life", 60)

    # The first message is a full snapshot: the configuration with every default filled in.
    await ticking.until_count(1)
    first = ticking.sessions[0]
    assert first.session_id == "life"
    assert first.state in (pb.SESSION_STATE_STARTING, RUNNING)
    assert first.HasField("created_time") and first.HasField("state_time") and first.HasField("stats")
    config = first.config
    assert (config.subscribe_url, config.publish_url, config.processor_url) == (
        live_source.url,
        out_url,
        processor.url,
    )
    assert (config.width, config.height) == (SIZE, SIZE)
    assert config.encoder.preset == "ultrafast" and config.encoder.bitrate > 0
    assert config.encoder.gop.ToMilliseconds() == 500
    assert config.offer_timeout.ToSeconds() == 60
    assert config.latency_budget.ToMilliseconds() == 500
    assert config.scale_mode == pb.SCALE_MODE_LETTERBOX and config.output_fill == pb.OUTPUT_FILL_REPEAT
    assert [json_format.MessageToDict(p) for p in config.prompts] == [INVERT]
    assert config.mode == pb.SESSION_MODE_AUTO
    assert [q.name for q in first.stats.queues] == [
        "input_bytes",
        "decoded_frames",
        "input_units",
        "processor_in_flight",
        "returned_frames",
        "output_bytes",
    ]

    # Frames go through the processor to the output channel: 512×512 and inverted.
    frames = await output.wait_for(2)
    assert {(f.width, f.height) for f in frames} == {(SIZE, SIZE)}
    assert inverted(frames), [top_bar_luma(f) for f in frames]
    assert all(chroma_spread(f) > 10 for f in frames)  # in colour: grayscale will show

    # RUNNING, with live rates; then snapshots at the interval while nothing changes.
    running = await ticking.until(live)
    await ticking.until_count(running + 6)
    steady = ticking.messages[running : running + 6]
    assert all(session.state == RUNNING for _, session in steady)
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(steady)]
    assert all(0.15 < gap < 1.0 for gap in gaps), gaps
    assert 0.2 < sum(gaps) / len(gaps) < 0.5, gaps
    counters = [(s.stats.frames_decoded, s.stats.frames_returned) for _, s in steady]
    assert counters[-1][0] > counters[0][0] and counters[-1][1] > counters[0][1], counters
    stats = steady[-1][1].stats
    assert stats.webrtc_state == "connected" and stats.fast_path in ("cython", "python")
    # AUTO: the 1280×720 input is not the session's size, so it is decoded and scaled; the
    # processor's output is remuxed.
    assert (stats.send_path, stats.output_path) == ("encode", "remux")
    assert "1280x720" in stats.send_path_reason
    assert stats.frames_encoded == 0 and stats.segments_out > 0 and stats.bytes_out > 0
    assert stats.latency.HasField("p50") and 0 < stats.latency.p50.ToMilliseconds() < 1000

    # The 60 s watcher: its first snapshot, then RUNNING as soon as it happened.
    await changes.until(lambda s: s.state == RUNNING, within=15)
    seen = len(changes.messages)

    # New prompts: the processor's reply comes back, and the output changes.
    updated = await stub.UpdateSession(
        pb.UpdateSessionRequest(session_id="life", prompts=[struct(GRAYSCALE)])
    )
    assert [json_format.MessageToDict(r) for r in updated.replies] == [
        {"type": "prompts_updated", "success": True}
    ]
    assert [json_format.MessageToDict(p) for p in updated.session.config.prompts] == [GRAYSCALE]
    frames = await output.next_matching(grayscale, within=10)
    assert {(f.width, f.height) for f in frames} == {(SIZE, SIZE)}
    # The update is a change: the 60 s watcher hears of it at once, with the new prompts.
    index = await changes.until(
        lambda s: [json_format.MessageToDict(p) for p in s.config.prompts] == [GRAYSCALE], within=5
    )
    assert index >= seen
    got = await stub.GetSession(pb.GetSessionRequest(session_id="life"))
    assert [json_format.MessageToDict(p) for p in got.session.config.prompts] == [GRAYSCALE]

    # A new resolution: the processor is told, and the session is that size end to end.
    resized = await stub.UpdateSession(pb.UpdateSessionRequest(session_id="life", width=640, height=360))
    assert [json_format.MessageToDict(r) for r in resized.replies] == [
        {"type": "resolution_updated", "success": True}
    ]
    assert (resized.session.config.width, resized.session.config.height) == (640, 360)
    frames = await output.next_matching(lambda frames: frames[0].width == 640, within=10)
    assert {(f.width, f.height) for f in frames} == {(640, 360)}
    # The processor kept its prompts (grey; 1280×720 fills 640×360: no letterbox bar now).
    assert all(chroma_spread(f) < 2 for f in frames)

    # Stop: STOPPED at once, the output channel's end of stream, every watcher's stream ended.
    stopped = await stub.StopSession(pb.StopSessionRequest(session_id="life"))
    assert stopped.session.state == STOPPED
    assert stopped.session.reason == "stopped by request"
    assert stopped.session.stats.frames_returned > 0
    assert await output.ended() in ("closed", "not_found")
    assert trickle_server.snapshot("out") is None
    for watcher in (ticking, changes):
        assert await watcher.ended() == grpc.StatusCode.OK
        last = watcher.sessions[-1]
        assert (last.state, last.reason) == (STOPPED, "stopped by request")
    assert changes.sessions[-1].stats.frames_returned == stopped.session.stats.frames_returned
    got = await stub.GetSession(pb.GetSessionRequest(session_id="life"))
    assert got.session.state == STOPPED
    listed = await stub.ListSessions(pb.ListSessionsRequest())
    assert [(s.session_id, s.state) for s in listed.sessions] == [("life", STOPPED)]

    # Nothing of the session is left: no thread, no task.
    assert not session_threads("life")
    assert not session_tasks("life", out_url)
    await live_source.stop()
    assert not media_threads()
    # Tasks started since, other than this test's own and the servers' (gRPC's waits for the next
    # call, aiohttp's handlers of connections that are closing): none.
    ours = ("watcher", "collect")
    servers = ("AioServer._request_registered_call", "RequestHandler.start")
    leftover = [
        task
        for task in asyncio.all_tasks() - tasks_before - {asyncio.current_task()}
        if not task.get_name().startswith(ours)
        and getattr(task.get_coro(), "__qualname__", "") not in servers
    ]
    assert not leftover, leftover


async def test_zero_transcode_modes_through_the_api(
    trickle_server: TrickleServer,
    live_source: LiveSource,
    relay: Relay,
    make_output: MakeOutput,
    make_watcher: MakeWatcher,
) -> None:
    """AUTO on the 1280×720 source (not the session's size: transcoded, and why), and PASSTHROUGH
    on a 512×512 one (forwarded, nothing decoded); both remux the processor's output."""
    square = Publisher(trickle_server.channel_url("square"))
    await square.create_channel()
    publishing = asyncio.create_task(publish_pattern(square, SIZE, SIZE))
    try:
        async with ProcessorServer() as first, ProcessorServer() as second:
            cases = [
                ("auto", live_source.url, first.url, pb.SESSION_MODE_AUTO, "encode", "1280x720"),
                ("pass", square.url, second.url, pb.SESSION_MODE_PASSTHROUGH, "forward", "512x512"),
            ]
            for session_id, source, processor_url, mode, send_path, reason in cases:
                request = start_request(session_id, source, processor_url, mode=mode)
                output = make_output(request.publish_url)
                await relay.stub.StartSession(request)
                watcher = make_watcher(relay.stub, session_id, 0.25)
                await watcher.until(lambda s: s.stats.frames_returned > 10, within=15)
                stats = watcher.sessions[-1].stats
                assert watcher.sessions[-1].config.mode == mode
                assert (stats.send_path, stats.output_path) == (send_path, "remux")
                assert reason in stats.send_path_reason and stats.output_path_reason
                assert stats.frames_encoded == 0  # remuxed, not encoded
                if send_path == "forward":
                    assert stats.frames_decoded == 0
                frames = await output.wait_for(1)
                assert {(f.width, f.height) for f in frames} == {(SIZE, SIZE)}
                await relay.stub.StopSession(pb.StopSessionRequest(session_id=session_id))
    finally:
        publishing.cancel()
        await asyncio.gather(publishing, return_exceptions=True)
        await square.close()


# -- b. many watchers ------------------------------------------------------------------------------


async def test_a_watcher_that_never_reads_holds_back_neither_the_others_nor_the_session(
    trickle_server: TrickleServer,
    processor: ProcessorServer,
    live_source: LiveSource,
    relay: Relay,
    make_output: MakeOutput,
    make_watcher: MakeWatcher,
) -> None:
    # Every snapshot carries the prompts: with half a megabyte of them, a stream nobody reads
    # fills its flow-control windows within a second and its server side has to wait.
    bulky = {"1": {"class_type": "Invert", "inputs": {"notes": "x" * 500_000}}}
    # Count, without changing them, the snapshots each WatchSession call takes from the session.
    taken: list[tuple[float, list[int]]] = []
    watch = relay.manager.watch

    def counted_watch(session_id: str, interval: float) -> AsyncIterator[SessionSnapshot]:
        count = [0]
        taken.append((interval, count))

        async def snapshots() -> AsyncIterator[SessionSnapshot]:
            async for snapshot in watch(session_id, interval):
                count[0] += 1
                yield snapshot

        return snapshots()

    relay.manager.watch = counted_watch  # type: ignore[method-assign]
    out_url = trickle_server.channel_url("out")
    output = make_output(out_url)
    await relay.stub.StartSession(
        pb.StartSessionRequest(
            session_id="crowd",
            subscribe_url=live_source.url,
            publish_url=out_url,
            processor_url=processor.url,
            prompts=[struct(bulky)],
            encoder=pb.EncoderSettings(gop=seconds(0.5)),
        )
    )
    stalled = relay.stub.WatchSession(pb.WatchSessionRequest(session_id="crowd", interval=seconds(0.1)))
    watched_since = time.monotonic()
    try:
        readers = [make_watcher(relay.stub, "crowd", 0.25) for _ in range(4)]
        await readers[0].until(live)
        segments = len(output.segments)
        start = [len(r.messages) for r in readers]
        # Three seconds of watching, by the readers' own clock.
        for reader, begun in zip(readers, start, strict=True):
            await reader.until_count(begun + 12, within=10)
        # Every reader kept its pace: no gap much longer than its interval.
        for reader, begun in zip(readers, start, strict=True):
            arrivals = [at for at, _ in reader.messages[begun:]]
            gaps = [b - a for a, b in itertools.pairwise(arrivals)]
            assert max(gaps) < 0.75, gaps
            assert reader.sessions[-1].state == RUNNING
        # The session kept going too: frames decoded and returned near the input's 30 fps (a
        # blocked event loop would show none), and output segments, one every half second, still
        # arriving.
        last = readers[0].sessions[-1].stats
        assert last.decoded_fps > 15 and last.returned_fps > 10, last
        await output.wait_for(segments + 2, within=5)
        assert inverted(output.segments[-1])
        # The stream nobody read was held back: its server side took at most half the snapshots
        # one every 0.1 s would have been (gRPC's flow-control windows hold a handful of them,
        # more once its bandwidth probe has grown them: 9 here, 17 once on a busy machine).
        (stalled_count,) = [count[0] for interval, count in taken if interval == pytest.approx(0.1)]
        unheld = (time.monotonic() - watched_since) / 0.1
        assert 1 <= stalled_count < unheld / 2, (stalled_count, unheld)
        # It is alive all the same: what it was sent is there when it is read.
        first = await asyncio.wait_for(stalled.read(), 5)
        assert isinstance(first, pb.WatchSessionResponse) and first.session.session_id == "crowd"
    finally:
        stalled.cancel()
    stopped = await relay.stub.StopSession(pb.StopSessionRequest(session_id="crowd"))
    assert stopped.session.state == STOPPED
    for reader in readers:
        assert await reader.ended() == grpc.StatusCode.OK
        assert reader.sessions[-1].state == STOPPED


# -- c. the error model ----------------------------------------------------------------------------


async def rpc_error(call: Awaitable[object], code: grpc.StatusCode, message: str) -> list[tuple[str, str]]:
    """Await `call`, which must fail with `code` and `message`; its BadRequest field violations
    as (field, description), read from the google.rpc.Status in the trailers (which must also
    hold the relay's ErrorInfo)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    error = caught.value
    assert (error.code(), error.details()) == (code, message)
    details = status_details(error)
    info = details[error_details_pb2.ErrorInfo]
    assert isinstance(info, error_details_pb2.ErrorInfo) and info.domain == "trickle-relay" and info.reason
    request = details.get(error_details_pb2.BadRequest, error_details_pb2.BadRequest())
    assert isinstance(request, error_details_pb2.BadRequest)
    return [(v.field, v.description) for v in request.field_violations]


DETAIL_TYPES = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.RetryInfo,
    error_details_pb2.PreconditionFailure,
)


def status_details(error: grpc.aio.AioRpcError) -> dict[type, Message]:
    """The google.rpc details of a failed call by type, each type at most once."""
    status = rpc_status.from_call(error)  # also checks that it agrees with code and message
    assert status is not None, "no google.rpc.Status in the trailers"
    details: dict[type, Message] = {}
    for packed in status.details:
        (kind,) = [kind for kind in DETAIL_TYPES if packed.Is(kind.DESCRIPTOR)]
        assert kind not in details, kind
        details[kind] = kind()
        packed.Unpack(details[kind])
    return details


def start_request(
    session_id: str, subscribe_url: str, processor_url: str, /, **fields: Any
) -> pb.StartSessionRequest:
    """A session reading `subscribe_url` and publishing to "out-{session_id}" on the same server;
    `fields` set or override any field."""
    base: dict[str, Any] = {
        "session_id": session_id,
        "subscribe_url": subscribe_url,
        "publish_url": subscribe_url.rsplit("/", 1)[0] + f"/out-{session_id}",
        "processor_url": processor_url,
    }
    return pb.StartSessionRequest(**{**base, **fields})


PRESETS = "ultrafast, superfast, veryfast, faster, fast, medium, slow, slower, veryslow, placebo"


@pytest.mark.parametrize(
    ("fields", "violations"),
    [
        ({"session_id": "bad id!"}, [("session_id", "use 1-128 letters, digits, '.', '_' or '-'")]),
        ({"session_id": "x" * 129}, [("session_id", "use 1-128 letters, digits, '.', '_' or '-'")]),
        (
            {"subscribe_url": "", "publish_url": "", "processor_url": ""},
            [("subscribe_url", "required"), ("publish_url", "required"), ("processor_url", "required")],
        ),
        (
            {"subscribe_url": "ftp://127.0.0.1/in", "events_url": "http:///events"},
            [
                ("subscribe_url", "must be an http(s) URL with a host, got 'ftp://127.0.0.1/in'"),
                ("events_url", "must be an http(s) URL with a host, got 'http:///events'"),
            ],
        ),
        ({"width": 511}, [("width", "must be even, 2..4096, got 511")]),
        ({"height": 4098}, [("height", "must be even, 2..4096, got 4098")]),
        ({"encoder": pb.EncoderSettings(preset="warp")}, [("encoder.preset", f"must be one of {PRESETS}")]),
        ({"mode": 7}, [("mode", "unknown value 7")]),
        (
            {"mode": pb.SESSION_MODE_PASSTHROUGH, "max_fps": 10},
            [("max_fps", "must be 0 in passthrough mode: the input is forwarded frame for frame")],
        ),
        ({"latency_budget": seconds(0.01)}, [("latency_budget", "must be 0.05..10 s, got 0.01")]),
    ],
    ids=[
        "session_id",
        "long_session_id",
        "missing_urls",
        "non_http_urls",
        "odd_width",
        "height",
        "preset",
        "mode",
        "passthrough_fps",
        "latency_budget",
    ],
)
async def test_invalid_argument_for_a_bad_start_request(
    relay: Relay,
    idle_channel: str,
    closed_port_url: str,
    fields: dict[str, object],
    violations: list[tuple[str, str]],
) -> None:
    request = start_request("bad", idle_channel, closed_port_url, **fields)
    message = "; ".join(f"{field}: {description}" for field, description in violations)
    got = await rpc_error(relay.stub.StartSession(request), grpc.StatusCode.INVALID_ARGUMENT, message)
    assert got == violations
    assert not (await relay.stub.ListSessions(pb.ListSessionsRequest())).sessions


async def test_invalid_argument_for_a_bad_update_or_watch(
    relay: Relay, idle_channel: str, closed_port_url: str
) -> None:
    await relay.stub.StartSession(start_request("s", idle_channel, closed_port_url))
    stub, code = relay.stub, grpc.StatusCode.INVALID_ARGUMENT
    nothing = "nothing to update: give prompts, width and height, or pause"
    got = await rpc_error(stub.UpdateSession(pb.UpdateSessionRequest(session_id="s")), code, nothing)
    assert got == [("prompts", "empty, and no other field set either")]
    odd = pb.UpdateSessionRequest(session_id="s", width=641, height=360)
    got = await rpc_error(
        stub.UpdateSession(odd), code, "width and height must be even, 2..4096, got 641x360"
    )
    assert got == [("width", "width and height must be even, 2..4096, got 641x360")]
    half = pb.UpdateSessionRequest(session_id="s", width=640)
    got = await rpc_error(stub.UpdateSession(half), code, "width and height go together")
    assert got == [("height", "set both or neither")]
    other_processor = closed_port_url + "/p"
    await stub.StartSession(
        start_request("p", idle_channel, other_processor, mode=pb.SESSION_MODE_PASSTHROUGH)
    )
    resize = pb.UpdateSessionRequest(session_id="p", width=640, height=360)
    why = "a passthrough session forwards the input at its own size: it cannot be resized"
    await rpc_error(stub.UpdateSession(resize), grpc.StatusCode.FAILED_PRECONDITION, why)
    for interval, shown in ((0.05, "0.05"), (61, "61"), (-1, "-1")):
        watch = stub.WatchSession(pb.WatchSessionRequest(session_id="s", interval=seconds(interval)))
        got = await rpc_error(watch.read(), code, "interval must be 0.1..60 s")
        assert got == [("interval", f"{shown} s is out of range")]
    # The bounds themselves are fine.
    for interval in (0.1, 60):
        watch = stub.WatchSession(pb.WatchSessionRequest(session_id="s", interval=seconds(interval)))
        first = await asyncio.wait_for(watch.read(), 5)
        assert isinstance(first, pb.WatchSessionResponse) and first.session.session_id == "s"
        watch.cancel()


async def test_permission_denied_for_a_host_outside_the_allow_list(
    make_relay: MakeRelay, idle_channel: str, closed_port_url: str
) -> None:
    relay = await make_relay(allowed_hosts=frozenset({"127.0.0.1"}))
    elsewhere = idle_channel.replace("127.0.0.1", "localhost")
    request = start_request("s", elsewhere, closed_port_url, control_url=elsewhere + "-control")
    message = (
        "subscribe_url: host 'localhost' is not in the relay's allow-list; "
        "publish_url: host 'localhost' is not in the relay's allow-list; "
        "control_url: host 'localhost' is not in the relay's allow-list"
    )
    got = await rpc_error(relay.stub.StartSession(request), grpc.StatusCode.PERMISSION_DENIED, message)
    assert got == [
        ("subscribe_url", "host 'localhost' is not in the relay's allow-list"),
        ("publish_url", "host 'localhost' is not in the relay's allow-list"),
        ("control_url", "host 'localhost' is not in the relay's allow-list"),
    ]
    # The same session on the allowed host starts.
    started = await relay.stub.StartSession(start_request("s", idle_channel, closed_port_url))
    assert started.session.state == pb.SESSION_STATE_STARTING


async def test_not_found_for_an_unknown_session(relay: Relay) -> None:
    stub, code, message = relay.stub, grpc.StatusCode.NOT_FOUND, "no session 'ghost'"
    assert await rpc_error(stub.GetSession(pb.GetSessionRequest(session_id="ghost")), code, message) == []
    assert await rpc_error(stub.StopSession(pb.StopSessionRequest(session_id="ghost")), code, message) == []
    update = pb.UpdateSessionRequest(session_id="ghost", pause=pb.PAUSE_ACTION_PAUSE)
    assert await rpc_error(stub.UpdateSession(update), code, message) == []
    watch = stub.WatchSession(pb.WatchSessionRequest(session_id="ghost"))
    assert await rpc_error(watch.read(), code, message) == []


async def test_already_exists_for_a_running_session_id(
    relay: Relay, idle_channel: str, closed_port_url: str
) -> None:
    request = start_request("twin", idle_channel, closed_port_url)
    await relay.stub.StartSession(request)
    message = "session 'twin' is already starting"
    assert await rpc_error(relay.stub.StartSession(request), grpc.StatusCode.ALREADY_EXISTS, message) == []
    # Once it has ended, the id is free again.
    await relay.stub.StopSession(pb.StopSessionRequest(session_id="twin"))
    again = await relay.stub.StartSession(request)
    assert again.session.state == pb.SESSION_STATE_STARTING


async def test_resource_exhausted_at_the_session_limit(
    make_relay: MakeRelay, idle_channel: str, closed_port_url: str
) -> None:
    relay = await make_relay(max_sessions=1)
    await relay.stub.StartSession(start_request("one", idle_channel, closed_port_url))
    second = start_request("two", idle_channel, closed_port_url + "/other")
    message = "this relay runs at most 1 sessions"
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await rpc_error(relay.stub.StartSession(second), code, message) == []
    await relay.stub.StopSession(pb.StopSessionRequest(session_id="one"))
    assert (await relay.stub.StartSession(second)).session.state == pb.SESSION_STATE_STARTING


async def test_failed_precondition_for_a_busy_processor_or_an_ended_session(
    relay: Relay, idle_channel: str, closed_port_url: str
) -> None:
    stub, code = relay.stub, grpc.StatusCode.FAILED_PRECONDITION
    await stub.StartSession(start_request("first", idle_channel, closed_port_url))
    # The same processor (a trailing slash is the same endpoint), sharing not asked for by both.
    same = closed_port_url + "/"
    for shared in (False, True):
        second = start_request("second", idle_channel, same, allow_shared_processor=shared)
        message = (
            f"processor {same} is in use by session 'first'; set allow_shared_processor on both to share it"
        )
        assert await rpc_error(stub.StartSession(second), code, message) == []
    # Both sharing: allowed.
    await stub.StopSession(pb.StopSessionRequest(session_id="first"))
    sharing = [start_request(f"shared-{i}", idle_channel, same, allow_shared_processor=True) for i in (1, 2)]
    for request in sharing:
        assert (await stub.StartSession(request)).session.state == pb.SESSION_STATE_STARTING
    # An ended session takes no updates.
    update = pb.UpdateSessionRequest(session_id="first", prompts=[struct(INVERT)])
    assert await rpc_error(stub.UpdateSession(update), code, "session 'first' has ended") == []


async def test_unavailable_while_draining(
    relay: Relay, idle_channel: str, closed_port_url: str, unresponsive_url: str
) -> None:
    lingering = start_request("lingering", idle_channel, closed_port_url, events_url=unresponsive_url)
    async with drain_under_way(relay, lingering) as draining:
        message = "the relay is shutting down and takes no new sessions"
        request = start_request("late", idle_channel, closed_port_url + "/late")
        assert await rpc_error(relay.stub.StartSession(request), grpc.StatusCode.UNAVAILABLE, message) == []
        assert not draining.done()
        got = await relay.stub.GetSession(pb.GetSessionRequest(session_id="lingering"))
        assert got.session.state in (pb.SESSION_STATE_STOPPING, STOPPED)
    assert relay.manager.get("lingering").state.ended
    # Drained: the server itself is gone, which is UNAVAILABLE too.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await relay.stub.StartSession(request)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_unavailable_to_update_a_session_whose_processor_is_not_connected(
    relay: Relay, idle_channel: str, closed_port_url: str
) -> None:
    await relay.stub.StartSession(start_request("s", idle_channel, closed_port_url))
    update = pb.UpdateSessionRequest(session_id="s", prompts=[struct(INVERT)])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await relay.stub.UpdateSession(update)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    details = caught.value.details()
    assert details.startswith("the processor is not connected (connecting"), details
    got = await relay.stub.GetSession(pb.GetSessionRequest(session_id="s"))
    assert got.session.state == pb.SESSION_STATE_STARTING
    assert json_format.MessageToDict(got.session.config).get("prompts") is None  # unchanged: none


# -- d. a prompt the processor refuses -------------------------------------------------------------


async def test_an_invalid_prompt_fails_the_session_with_the_processors_reason(
    trickle_server: TrickleServer,
    processor: ProcessorServer,
    relay: Relay,
    live_source: LiveSource,
    make_watcher: MakeWatcher,
) -> None:
    bad = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
    request = start_request("bad-prompt", live_source.url, processor.url, prompts=[struct(bad)])
    await relay.stub.StartSession(request)
    watcher = make_watcher(relay.stub, "bad-prompt")
    assert await watcher.ended(within=20) == grpc.StatusCode.OK
    assert watcher.sessions[-1].state == pb.SESSION_STATE_FAILED
    got = (await relay.stub.GetSession(pb.GetSessionRequest(session_id="bad-prompt"))).session
    assert got.state == pb.SESSION_STATE_FAILED
    assert got.reason.startswith("LinkError: "), got.reason
    assert "500: the prompt names no known effect" in got.reason, got.reason
    assert got.reason == watcher.sessions[-1].reason
    # Failed, it has let go of everything: its output channel, its threads.
    assert trickle_server.snapshot(request.publish_url.rsplit("/", 1)[1]) is None
    assert not session_threads("bad-prompt")
    update = pb.UpdateSessionRequest(session_id="bad-prompt", prompts=[struct(INVERT)])
    code, message = grpc.StatusCode.FAILED_PRECONDITION, "session 'bad-prompt' has ended"
    assert await rpc_error(relay.stub.UpdateSession(update), code, message) == []


async def test_a_session_started_before_its_input_waits_for_it_saying_so(
    trickle_server: TrickleServer,
    processor: ProcessorServer,
    relay: Relay,
    make_watcher: MakeWatcher,
) -> None:
    """How Livepeer starts a job: the session first, the stream second. The processor is not
    connected before there is a frame for it (it would starve into its watchdog)."""
    source = LiveSource(trickle_server.channel_url("later"))  # no such channel yet
    request = start_request("early", source.url, processor.url)
    await relay.stub.StartSession(request)
    watcher = make_watcher(relay.stub, "early")
    waiting = await watcher.until(lambda s: s.reason == "waiting for input")
    assert watcher.sessions[waiting].state == pb.SESSION_STATE_STARTING
    assert processor.peers == []
    await source.start()
    try:
        running = await watcher.until(lambda s: s.state == pb.SESSION_STATE_RUNNING)
        assert running > waiting
        reasons = [s.reason for s in watcher.sessions[waiting:running]]
        assert "connecting to the processor" in reasons
    finally:
        await relay.stub.StopSession(pb.StopSessionRequest(session_id="early"))
        await source.stop()
