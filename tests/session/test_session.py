"""Session: the state machine, the control relay from control_url and the status events."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from relay_server.media.testsource import publish_pattern
from relay_server.processor import ProcessorServer
from relay_server.session.config import SessionConfig
from relay_server.session.session import Session, SessionState
from relay_server.trickle import Publisher, Subscriber
from relay_server.trickle.server import TrickleServer

INVERT = {"1": {"class_type": "Invert", "inputs": {}}}
GRAYSCALE = {"1": {"class_type": "Grayscale", "inputs": {}}}


async def messages(url: str) -> AsyncIterator[dict[str, Any]]:
    """The JSON messages on a channel from its first segment on."""
    async with Subscriber(url, start_seq=0, startup_grace=20) as subscriber:
        async for segment in subscriber:
            yield json.loads(b"".join([chunk async for chunk in segment]))


async def next_matching(
    stream: AsyncIterator[dict[str, Any]], within: float = 20, **fields: Any
) -> dict[str, Any]:
    async with asyncio.timeout(within):
        async for message in stream:
            if all(message.get(key) == value for key, value in fields.items()):
                return message
    raise AssertionError(f"the channel ended without a message with {fields}")


@contextlib.asynccontextmanager
async def live_input(server: TrickleServer) -> AsyncIterator[str]:
    url = server.channel_url("in")
    source = Publisher(url)
    await source.create_channel()
    publishing = asyncio.create_task(publish_pattern(source, 640, 360))
    try:
        yield url
    finally:
        publishing.cancel()
        await asyncio.gather(publishing, return_exceptions=True)
        await source.close()


async def test_control_messages_reach_the_processor_and_events_report_states(
    trickle_server: TrickleServer,
) -> None:
    async with ProcessorServer() as processor, live_input(trickle_server) as input_url:
        for name in ("control", "events", "out"):
            creator = Publisher(trickle_server.channel_url(name))
            await creator.create_channel()
            await creator.close(delete_channel=False)
        events = messages(trickle_server.channel_url("events"))
        config = SessionConfig(
            session_id="s1",
            subscribe_url=input_url,
            publish_url=trickle_server.channel_url("out"),
            processor_url=processor.url,
            control_url=trickle_server.channel_url("control"),
            events_url=trickle_server.channel_url("events"),
            gateway_request_id="gw-1",
            prompts=(INVERT,),
        )
        session = Session(config)
        session.start()
        try:
            running = await next_matching(events, type="status", state="running")
            assert running["session_id"] == "s1" and running["gateway_request_id"] == "gw-1"
            # A Livepeer-style parameter update on the control channel becomes update_prompts.
            async with Publisher(trickle_server.channel_url("control")) as control:
                async with await control.segment() as segment:
                    await segment.write(json.dumps({"prompts": [GRAYSCALE]}).encode())
                reply = await next_matching(events, type="control_reply")
                assert reply["reply"] == {"type": "prompts_updated", "success": True}
                assert processor.pipeline.chain.names == ("grayscale",)
                assert session.relay.link.prompts == [GRAYSCALE]
                # Something that is not a control message is reported, and changes nothing.
                async with await control.segment() as segment:
                    await segment.write(b"not json")
                reply = await next_matching(events, type="control_reply")
                assert reply["reply"]["type"] == "error" and "not JSON" in reply["reply"]["error"]
        finally:
            await session.stop()
        stopped = await next_matching(events, type="status", state="stopped")
        assert stopped["reason"] == "stopped by request"
        await events.aclose()
    assert session.state is SessionState.STOPPED
    assert trickle_server.snapshot("out") is None  # the output channel was DELETEd


async def test_a_session_whose_prompt_the_processor_refuses_fails_with_its_reason(
    trickle_server: TrickleServer,
) -> None:
    async with ProcessorServer() as processor, live_input(trickle_server) as input_url:
        config = SessionConfig(
            session_id="bad",
            subscribe_url=input_url,
            publish_url=trickle_server.channel_url("out"),
            processor_url=processor.url,
            prompts=({"1": {"class_type": "NoSuchNode", "inputs": {}}},),
        )
        session = Session(config)
        session.start()
        snapshots = session.watch(interval=5)
        async with asyncio.timeout(20):
            states = [snapshot.state async for snapshot in snapshots]
    assert states[0] is SessionState.STARTING and states[-1] is SessionState.FAILED
    assert "no known effect" in session.reason
