"""ProcessorLink against the embedded processor: real aiortc peers on loopback, no mocks."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import statistics
import threading

import pytest

from relay_server.backoff import Backoff
from relay_server.webrtc import (
    ControlError,
    ControlRejected,
    LinkError,
    LinkSettings,
    LinkState,
)
from relay_server.webrtc.link import CONNECTING, WAITING_FOR_INPUT
from relay_server.webrtc.sendtrack import MAX_IN_FLIGHT, REPEAT_AFTER
from tests.webrtc.conftest import MakeProcess, MakeProcessor, MakeRig
from tests.webrtc.support import Changes, Returned, free_port, graph, solid

# The input's levels: a colour, so that both inversion and grayscale are visible.
Y, U, V = 60, 90, 170
# Lossy H.264 of a flat frame stays within a few levels; any effect mistaken for another, or
# passthrough for an effect, is off by far more (≥ 38 levels here).
TOLERANCE = 10
FAST_RECONNECT = Backoff(initial=0.05, factor=2, maximum=0.2, attempts=1000)


def near(value: float, expected: float) -> bool:
    return abs(value - expected) < TOLERANCE


def looks(returned: Returned, y: float, u: float, v: float) -> bool:
    return near(returned.y, y) and near(returned.u, u) and near(returned.v, v)


def encode_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("send-encode")]


async def test_frames_flow_and_the_effect_is_visible(
    make_processor: MakeProcessor, make_rig: MakeRig
) -> None:
    processor = await make_processor()
    rig = make_rig(processor.url, image=solid(Y, U, V), prompts=[graph("Invert")])
    await rig.returned(30)
    # Every returned frame after the first few (the encoder's first frames settle) is inverted.
    assert all(looks(returned, 255 - Y, 255 - U, 255 - V) for returned in rig.returns[5:]), rig.returns[-5:]
    stats = rig.link.stats
    # It connected once there was a frame to send, not before.
    assert rig.states[:3] == [
        (LinkState.CONNECTING, WAITING_FOR_INPUT),
        (LinkState.CONNECTING, CONNECTING),
        (LinkState.CONNECTED, ""),
    ]
    assert stats.state is LinkState.CONNECTED and stats.reason == ""
    assert (stats.connections, stats.losses) == (1, 0)
    # Returned frames were matched to the sent ones: the round trip is known, and short.
    assert math.isfinite(stats.latency_p50) and 0 < stats.latency_p50 < 0.5, stats
    assert stats.latency_p50 <= stats.latency_p95 <= stats.latency_p99
    assert stats.frames_returned == len(rig.returns)
    assert stats.send.frames >= stats.frames_returned and stats.send.repeated == 0
    assert stats.encoder.frames == stats.send.frames and stats.encoder.keyframes >= 1
    assert stats.peer_state == "connected"


async def test_an_input_stall_longer_than_the_processor_watchdog_keeps_video_coming_back(
    make_processor: MakeProcessor, make_rig: MakeRig
) -> None:
    stall = 8.0
    processor = await make_processor()  # its returned track ends after 5 s without input
    assert processor.pipeline.knobs.input_timeout < stall
    rig = make_rig(processor.url, image=solid(Y))
    producer = rig.producer
    assert producer is not None
    await rig.returned(15)
    producer.stall(stall, then=solid(180))
    await rig.until(lambda: producer.resumed_at is not None, stall + 10, "the input resumed")
    assert producer.stalled_at is not None and producer.resumed_at is not None
    resumed = producer.resumed_at

    def fresh() -> list[Returned]:
        return [returned for returned in rig.returns if returned.at > resumed and near(returned.y, 180)]

    await rig.until(lambda: len(fresh()) >= 10, 10, "fresh frames back after the input resumed")
    # During the stall the last frame kept going out every REPEAT_AFTER and coming back.
    during = [returned for returned in rig.returns if producer.stalled_at < returned.at <= resumed]
    assert all(near(returned.y, Y) for returned in during)
    gaps = [b.at - a.at for a, b in itertools.pairwise(during)]
    assert len(during) >= 0.6 * stall / REPEAT_AFTER, len(during)
    assert max(gaps) < 2.5 * REPEAT_AFTER, gaps
    assert during[-1].at > resumed - 2 * REPEAT_AFTER  # until the very end of the stall
    stats = rig.link.stats
    assert stats.send.repeated >= 0.6 * stall / REPEAT_AFTER
    assert (stats.connections, stats.losses) == (1, 0)
    assert rig.states[2:] == [(LinkState.CONNECTED, "")]  # never lost, not even for a moment


async def test_a_killed_processor_restarted_on_its_port_gets_the_link_back(
    make_process: MakeProcess, make_rig: MakeRig
) -> None:
    port = free_port()
    first = await make_process(port)
    settings = LinkSettings(return_timeout=1.0, reconnect=FAST_RECONNECT)
    rig = make_rig(first.url, image=solid(Y), settings=settings)
    await rig.returned(10)
    assert rig.link.state is LinkState.CONNECTED
    await first.kill()
    await rig.until(lambda: rig.link.state is LinkState.RECONNECTING, 10, "the loss noticed")
    assert rig.link.reason
    lost_at = len(rig.returns)
    await make_process(port)
    await rig.until(lambda: rig.link.state is LinkState.CONNECTED, 30, "connected again")
    await rig.returned(10, after=lost_at)
    seen = [state for state, _ in rig.states]
    assert seen[2] is LinkState.CONNECTED and seen[-1] is LinkState.CONNECTED
    assert LinkState.RECONNECTING in seen and LinkState.FAILED not in seen
    # Every reason given while reconnecting says something; the first is the loss itself.
    reasons = [reason for state, reason in rig.states if state is LinkState.RECONNECTING]
    assert all(reasons) and "no processed frame came back" in reasons[0], reasons
    stats = rig.link.stats
    assert stats.losses >= 1 and stats.connections >= 2
    assert stats.state is LinkState.CONNECTED and stats.reason == ""


@pytest.mark.parametrize("max_in_flight", [MAX_IN_FLIGHT, 0], ids=["limited", "unlimited"])
async def test_a_processor_slower_than_the_input(
    make_processor: MakeProcessor, make_rig: MakeRig, max_in_flight: int
) -> None:
    # ComfyStream-like: processes 10 frames a second from a FIFO of everything that arrived.
    processor = await make_processor(max_fps=10, queue=300)
    rig = make_rig(processor.url, image=solid(Y), settings=LinkSettings(max_in_flight=max_in_flight))
    await rig.returned(35 if max_in_flight else 30)  # ~3.5 s (3 s) at 10 fps
    max_queued = max(int(stats["max_queued"]) for stats in processor.stats().values())
    latencies = list(rig.link.latencies.values)
    early, late = statistics.median(latencies[:10]), statistics.median(latencies[-10:])
    steady = rig.returns[5:]
    rate = (len(steady) - 1) / (steady[-1].at - steady[0].at)
    assert 7 < rate < 12, rate  # the processor's pace either way
    if max_in_flight:
        # Held to the processor's pace: no queue there, a bounded round trip that does not grow.
        assert max_queued <= max_in_flight + 2, max_queued
        assert rig.link.stats.latency_p99 < 1.0, latencies
        assert late < early + 0.25, (early, late)
        # What the processor cannot take in time is let go, counted, not queued.
        assert rig.link.timeline.stats.late > 0
    else:
        # Without the limit the FIFO fills up and the round trip grows with it: the assertions
        # above would fail.
        assert max_queued > 5 * MAX_IN_FLIGHT, max_queued
        assert late > early + 0.5, (early, late)
        assert rig.link.stats.latency_p99 > 1.0


async def test_an_invalid_prompt_fails_the_link_with_the_processors_reason(
    make_processor: MakeProcessor, make_rig: MakeRig
) -> None:
    processor = await make_processor()
    rig = make_rig(processor.url, image=solid(Y), prompts=[graph("NoSuchNode")])
    assert rig.task is not None
    with pytest.raises(LinkError) as failure:
        await asyncio.wait_for(rig.task, 20)
    assert "500" in str(failure.value) and "names no known effect" in str(failure.value)
    assert rig.link.state is LinkState.FAILED
    assert rig.states[-1] == (LinkState.FAILED, str(failure.value))
    assert rig.link.stats.connections == 0
    assert not encode_threads()
    assert processor.peers == []


async def test_prompt_updates_on_the_control_channel(
    make_processor: MakeProcessor, make_rig: MakeRig
) -> None:
    processor = await make_processor()
    idle = make_rig(processor.url, start=False)
    with pytest.raises(ControlError) as not_connected:
        await idle.link.control({"type": "update_prompts", "prompts": [graph("Grayscale")]})
    assert type(not_connected.value) is ControlError and "not connected" in str(not_connected.value)

    first = [graph("Passthrough")]
    rig = make_rig(processor.url, image=solid(Y, U, V), prompts=first)
    await rig.returned(10)
    assert looks(rig.returns[-1], Y, U, V)  # colour comes back as it went out
    grey = [graph("Grayscale")]
    reply = await rig.link.control({"type": "update_prompts", "prompts": grey})
    assert reply == {"type": "prompts_updated", "success": True}
    assert rig.link.prompts == grey
    assert processor.pipeline.chain.names == ("grayscale",)
    updated = len(rig.returns)

    def neutral() -> bool:
        tail = rig.returns[updated:][-10:]
        return len(tail) == 10 and all(looks(returned, Y, 128, 128) for returned in tail)

    await rig.until(neutral, 10, "grey frames back")

    with pytest.raises(ControlRejected) as rejected:
        await rig.link.control({"type": "update_prompts", "prompts": grey * 2})
    assert "Number of updated prompts must match" in str(rejected.value)
    assert rejected.value.reply["success"] is False
    assert rig.link.prompts == grey  # a refused update changes nothing

    await rig.link.stop()
    assert rig.task is not None
    await asyncio.wait_for(rig.task, 20)
    with pytest.raises(ControlError) as closed:
        await rig.link.control({"type": "update_prompts", "prompts": grey})
    assert type(closed.value) is ControlError and "closed" in str(closed.value)


class _Attempts(logging.Handler):
    """Counts the link's failed connection attempts (it logs each), waking waiters."""

    def __init__(self, changes: Changes) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.changes = changes

    def emit(self, record: logging.LogRecord) -> None:
        if "reconnecting" in record.getMessage():
            self.count += 1
            self.changes.notify()


async def test_a_processor_down_at_start_is_retried_until_it_comes_up(
    make_processor: MakeProcessor, make_rig: MakeRig
) -> None:
    port = free_port()
    rig = make_rig(
        f"http://127.0.0.1:{port}",
        image=solid(Y),
        settings=LinkSettings(reconnect=FAST_RECONNECT),
        start=False,
    )
    attempts = _Attempts(rig.changes)
    logger = logging.getLogger("relay_server.webrtc.link")
    logger.addHandler(attempts)
    try:
        rig.start()
        await rig.until(lambda: attempts.count >= 3, 10, "three failed attempts")
        assert rig.link.state is LinkState.CONNECTING
        assert str(port) in rig.link.reason
        assert {state for state, _ in rig.states} == {LinkState.CONNECTING}  # no loss: none connected
        await make_processor(port=port)
        await rig.until(lambda: rig.link.state is LinkState.CONNECTED, 20, "connected")
        await rig.returned(10)
    finally:
        logger.removeHandler(attempts)
    stats = rig.link.stats
    assert (stats.connections, stats.losses) == (1, 0)


async def test_stop_leaves_no_thread_or_task_behind(make_process: MakeProcess, make_rig: MakeRig) -> None:
    # The processor runs in its own process: every task left in this loop is then the link's.
    process = await make_process(free_port())
    before = asyncio.all_tasks()
    rig = make_rig(process.url, image=solid(Y))
    await rig.returned(10)
    assert encode_threads()
    await rig.link.stop()
    assert rig.task is not None
    await asyncio.wait_for(rig.task, 20)
    assert rig.link.state is LinkState.CLOSED and rig.states[-1][0] is LinkState.CLOSED
    assert rig.link.stats.peer_state == ""
    assert not encode_threads()
    left = asyncio.all_tasks() - before - {asyncio.current_task()}
    assert not left, [task.get_coro() for task in left]
