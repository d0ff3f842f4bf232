"""`trickle-relay processor` as a process: it serves, and SIGTERM stops it cleanly."""

from __future__ import annotations

import asyncio
import re
import signal
import sys

import aiohttp


async def test_cli_serves_and_stops_on_sigterm() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay_server",
        "processor",
        "--listen",
        "127.0.0.1:0",
        "--input-timeout",
        "0.5",
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        url = None
        async with asyncio.timeout(20):
            while url is None:
                line = (await process.stderr.readline()).decode()
                assert line, "the processor exited before listening"
                if match := re.search(r"processor listening on (http://\S+)", line):
                    url = match.group(1)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/live/health") as response:
                assert response.status == 200
            async with http.post(f"{url}/offer", data="not json") as response:
                assert response.status == 400 and await response.text()
            body = {"offer": {"sdp": "v=0", "type": "offer"}, "resolution": {"width": "x"}}
            async with http.post(f"{url}/offer", json=body) as response:
                assert response.status == 400 and "resolution" in await response.text()
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
