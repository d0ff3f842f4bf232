"""Fixtures of the link tests: processors (in-process or as processes) and links with an input,
all stopped at teardown, links first."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import av
import pytest

from relay_server.media.handoff import FrameQueue
from relay_server.processor import ProcessorServer
from relay_server.webrtc import LinkSettings, LinkState, ProcessorLink
from tests.webrtc.support import HEIGHT, WIDTH, Changes, ProcessorProcess, Producer, Rig, measure

MakeProcessor = Callable[..., Awaitable[ProcessorServer]]
MakeProcess = Callable[..., Awaitable[ProcessorProcess]]
MakeRig = Callable[..., Rig]


@pytest.fixture
async def make_process(tmp_path: Path) -> AsyncIterator[MakeProcess]:
    """`await make_process(port, "--max-fps", "10")`: the processor CLI, started and healthy."""
    processes: list[ProcessorProcess] = []

    async def make(port: int, *options: str) -> ProcessorProcess:
        process = ProcessorProcess(port, tmp_path / f"processor-{len(processes)}.log", *options)
        processes.append(process)
        await process.start()
        return process

    yield make
    for process in reversed(processes):
        await process.stop()


@pytest.fixture
async def make_rig(make_processor: MakeProcessor, make_process: MakeProcess) -> AsyncIterator[MakeRig]:
    """`make_rig(url, image=solid(60), prompts=..., settings=...)`: a link to `url` fed by a 30 fps
    producer of `image` (none: no input), running unless start=False. Depends on the processor
    fixtures so that links stop before processors do."""
    rigs: list[Rig] = []

    def make(
        url: str,
        *,
        image: av.VideoFrame | None = None,
        prompts: list[dict[str, Any]] | None = None,
        settings: LinkSettings | None = None,
        start: bool = True,
    ) -> Rig:
        changes = Changes()
        frames = FrameQueue(WIDTH, HEIGHT)

        async def on_frame(frame: av.VideoFrame, arrival: float, media: int | None) -> None:
            rig.returns.append(measure(frame, arrival))
            changes.notify()

        def on_state(state: LinkState, reason: str) -> None:
            rig.states.append((state, reason))
            changes.notify()

        link = ProcessorLink(url, frames, on_frame, prompts=prompts, settings=settings, on_state=on_state)
        rig = Rig(link, frames, changes)
        rigs.append(rig)
        if image is not None:
            rig.producer = Producer(frames, image, changes)
        if start:
            rig.start()
        return rig

    yield make
    for rig in reversed(rigs):
        await rig.close()
