"""Output readers spread over processes of their own, for benchmarks that read many sessions.

A reader decodes its session's output and reads every frame's index (bench.livesource's
OutputReader); one process reading every session's output, besides running the trickle server
and the live source, reached a core of its own at 8 sessions and became the bound itself. Here
each child process (`python -m bench.readers`, driven over JSON lines as bench.livesource is,
with the same Readers ops) reads SESSIONS_PER_READER sessions at most, and the source's process
keeps the trickle server and the source. time.monotonic is comparable across processes, so the
receive times mean what they do in the source's process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import sys
from typing import Any

from bench.child import Child, answer_requests, reply
from bench.frameindex import IndexCode
from bench.livesource import Readers
from relay_server.media.scaler import ScaleMode

# Sessions per reader process: a reader is cheap while its session runs steadily (one 512×512
# decode at 30 fps), but a joining session's backlog arrives at once; two to a process keep every
# reader process far from a core. The processes cost memory only.
SESSIONS_PER_READER = 2


async def serve(width: int, height: int) -> None:
    """Answer Readers' requests (a `width`×`height` source's index code) until EOF on stdin."""
    readers = Readers(IndexCode(width, height))
    reply({"pid": os.getpid()})
    try:
        await answer_requests(readers.answer)
    finally:
        await readers.stop()


class ReaderProcess(Child):
    """`python -m bench.readers` as a child process."""

    def __init__(self, width: int, height: int) -> None:
        args = ["--width", str(width), "--height", str(height)]
        super().__init__("bench.readers", args, what="output reader process", ready_within=60)


class ReaderPool:
    """Readers of a `width`×`height` source's sessions over ReaderProcess children: session slot
    n (its number within a count) is read by child n // SESSIONS_PER_READER. Children are started
    by ensure() as counts need them and stopped when `stack` closes."""

    def __init__(self, stack: contextlib.AsyncExitStack, width: int, height: int) -> None:
        self.stack = stack
        self.width, self.height = width, height
        self.children: list[ReaderProcess] = []
        self._reading: dict[str, ReaderProcess] = {}  # by reader name

    async def ensure(self, sessions: int) -> None:
        """Children enough for `sessions` sessions, the missing ones started at once."""
        missing = math.ceil(sessions / SESSIONS_PER_READER) - len(self.children)
        started = [ReaderProcess(self.width, self.height) for _ in range(missing)]
        for child in started:
            self.stack.push_async_callback(child.stop)  # first: stopped even if another fails
        await asyncio.gather(*(child.start() for child in started))
        self.children += started

    @property
    def pids(self) -> list[int]:
        return [child.process.pid for child in self.children if child.process is not None]

    async def read(self, slot: int, name: str, url: str, mode: ScaleMode) -> None:
        """Read the channel at `url` (created first) as `name`, in slot `slot`'s child."""
        child = self.children[slot // SESSIONS_PER_READER]
        await child.request("read", name=name, url=url, mode=mode.value)
        self._reading[name] = child

    async def collect(self, name: str, within: float) -> dict[str, Any]:
        """Stop reading `name` once its channel ended (at most `within` s): what it received."""
        return await self._reading.pop(name).request("collect", name=name, within=within)


def main() -> None:
    parser = argparse.ArgumentParser(description="Output readers (bench capacity's children).")
    parser.add_argument("--width", type=int, required=True, help="the source's")
    parser.add_argument("--height", type=int, required=True, help="the source's")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(serve(args.width, args.height))


if __name__ == "__main__":
    main()
