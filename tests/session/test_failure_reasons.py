"""A session whose input cannot work fails with a reason a person can act on, through the real
session: the trickle server, the processor and the relay all run."""

from __future__ import annotations

import asyncio
import random

import pytest

from relay_server.media.decoder import PROGRAM_SEARCH
from relay_server.processor import ProcessorServer
from relay_server.session.config import SessionConfig
from relay_server.session.session import Session, SessionState
from relay_server.trickle import Publisher
from relay_server.trickle.server import TrickleServer


async def ended(session: Session) -> list[SessionState]:
    """The states a session went through, until it ended."""
    async with asyncio.timeout(20):
        return [snapshot.state async for snapshot in session.watch(interval=5)]


def session_on(server: TrickleServer, processor: ProcessorServer) -> Session:
    config = SessionConfig(
        session_id="reasons",
        subscribe_url=server.channel_url("in"),
        publish_url=server.channel_url("out"),
        processor_url=processor.url,
    )
    return Session(config)


async def test_an_input_channel_that_never_appears(
    trickle_server: TrickleServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRICKLE_STARTUP_GRACE", "0.5")
    async with ProcessorServer() as processor:
        session = session_on(trickle_server, processor)
        session.start()
        states = await ended(session)
    assert states[0] is SessionState.STARTING and states[-1] is SessionState.FAILED
    assert session.reason == f"input channel {trickle_server.channel_url('in')} not found after 0.5 s"


async def test_an_input_that_is_not_mpeg_ts(trickle_server: TrickleServer) -> None:
    """Bytes without a TS packet: the session fails once the program search has read its bound,
    and says how many bytes it read."""
    garbage = random.Random(7).randbytes(PROGRAM_SEARCH + 65536).replace(b"\x47", b"\x46")
    source = Publisher(trickle_server.channel_url("in"))
    await source.create_channel()
    try:
        async with ProcessorServer() as processor:
            session = session_on(trickle_server, processor)
            session.start()
            async with await source.segment() as segment:
                await segment.write(garbage)
            states = await ended(session)
    finally:
        await source.close()
    assert states[0] is SessionState.STARTING and states[-1] is SessionState.FAILED
    assert session.reason.startswith("the input is not MPEG-TS: no TS packet"), session.reason
    read = int(session.reason.split("first ")[1].split()[0])
    assert PROGRAM_SEARCH <= read <= len(garbage)
    assert session.snapshot().stats.decoder.bytes_read == read
