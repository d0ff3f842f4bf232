"""A benchmark's helper process: a Python module run as a child, driven over JSON lines.

The child writes one line when it is ready, then answers each request line with one line; EOF on
its stdin tells it to stop. Work the relay would not do itself (a live source, output readers, a
trickle server) runs there, so the benchmark process's CPU is the relay's.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any


def reply(message: dict[str, Any]) -> None:
    """In the child: one answer line."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def answer_requests(answer: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]) -> None:
    """In the child, once ready: answer each request line on stdin with one line, until EOF."""
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    while line := await stdin.readline():
        reply(await answer(json.loads(line)))


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (NaN when unavailable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Child:
    """`python -m <module> <args>` as a child process; `ready` is its first line, request()
    sends one op and returns its answer."""

    def __init__(self, module: str, args: list[str], *, what: str, ready_within: float) -> None:
        self.module = module
        self.args = args
        self.what = what
        self.ready_within = ready_within
        self.process: asyncio.subprocess.Process | None = None
        self.ready: dict[str, Any] = {}
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            self.module,
            *self.args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=64 * 1024 * 1024,  # an answer with every frame's arrival is one long line
        )
        try:
            self.ready = await asyncio.wait_for(self._read(), self.ready_within)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        assert process.stdin is not None
        process.stdin.close()  # EOF: the child stops its work and exits
        try:
            await asyncio.wait_for(process.wait(), 15)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def request(self, op: str, **arguments: Any) -> dict[str, Any]:
        process = self.process
        assert process is not None and process.stdin is not None
        async with self._lock:
            process.stdin.write((json.dumps({"op": op, **arguments}) + "\n").encode())
            await process.stdin.drain()
            answer = await self._read()
        if "error" in answer:
            raise RuntimeError(f"{self.what}: {answer['error']}")
        return answer

    def cpu_seconds(self) -> float:
        """The child's CPU time so far (Linux /proc; NaN elsewhere)."""
        assert self.process is not None
        return process_cpu_seconds(self.process.pid)

    async def _read(self) -> dict[str, Any]:
        assert self.process is not None and self.process.stdout is not None
        line = await self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.what} exited ({await self.process.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer
