"""Trickle client cost: a 10-minute 2 Mbit/s channel streamed server → subscriber.

The embedded server and a paced publisher run in this process; each reader runs in a process
of its own so its CPU time is its alone. The publisher writes the channel like an encoder
would (2 s segments of 30 writes per second) at `speedup` times real time, and records when
each write left; the reader records when each chunk arrived. A write's latency is the arrival
of the chunk holding its last byte minus the write time (one monotonic clock for the machine).

Readers: our Subscriber at 8, 64 and 256 KiB chunks, and, as the baseline in the same run, a
bare aiohttp loop reading the same segments at 64 KiB (what the protocol costs without our
client's preconnect, retries and bookkeeping).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp

from bench import report
from relay_server.trickle import Publisher, Subscriber
from relay_server.trickle.server import TrickleServer

BITRATE = 2_000_000  # bits per second of media
SEGMENT_SECONDS = 2
WRITES_PER_SECOND = 30
READERS = [
    ("subscriber", 8 * 1024),
    ("subscriber", 64 * 1024),
    ("subscriber", 256 * 1024),
    ("bare-aiohttp", 64 * 1024),
]


def main(quick: bool = False) -> Path:
    media_seconds = 60 if quick else 600
    speedup = 20.0
    rows = []
    runs = {}
    for kind, chunk_size in READERS:
        run = asyncio.run(_run(kind, chunk_size, media_seconds, speedup))
        runs[f"{kind}-{chunk_size // 1024}k"] = run
        rows.append(
            {
                "reader": kind,
                "chunk KiB": chunk_size // 1024,
                "MB": run["megabytes"],
                "CPU ms/MB": run["cpu_ms_per_mb"],
                "chunks": run["chunks"],
                "mean chunk KiB": run["mean_chunk_kib"],
                "latency p50 ms": run["latency_ms"]["p50"],
                "p95 ms": run["latency_ms"]["p95"],
                "p99 ms": run["latency_ms"]["p99"],
            }
        )
    base = runs["bare-aiohttp-64k"]["cpu_ms_per_mb"]
    for row in rows:
        row["CPU vs bare"] = row["CPU ms/MB"] / base
    notes = (
        f"{media_seconds} s of {BITRATE / 1e6:g} Mbit/s media in {SEGMENT_SECONDS} s segments, "
        f"{WRITES_PER_SECOND} writes/s, streamed at {speedup:g}x real time on loopback. "
        "CPU is the reader process's own (user+system) while streaming. Latency is per publisher "
        "write: publisher write → the reader holds its last byte."
    )
    return report.write(
        "trickle",
        "Trickle subscriber: CPU per MB and write-to-read latency by chunk size",
        {"media_seconds": media_seconds, "speedup": speedup, "runs": runs},
        rows,
        notes,
    )


async def _run(kind: str, chunk_size: int, media_seconds: int, speedup: float) -> dict[str, Any]:
    segments = media_seconds // SEGMENT_SECONDS
    writes = SEGMENT_SECONDS * WRITES_PER_SECOND
    write_size = BITRATE // 8 // WRITES_PER_SECOND
    async with TrickleServer() as server:
        url = server.channel_url("bench")
        async with aiohttp.ClientSession() as http, http.post(url, headers={"Expect-Content": "video/MP2T"}):
            pass  # the channel exists before anyone reads it
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        reader = context.Process(target=_reader_process, args=(kind, url, chunk_size, segments, child))
        reader.start()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, parent.recv)  # the reader is connected and waiting
        sent: dict[tuple[int, int], int] = {}
        payload = bytes(write_size)
        interval = 1.0 / WRITES_PER_SECOND / speedup
        async with Publisher(url) as publisher:
            start = loop.time()
            tick = 0
            for _ in range(segments):
                async with await publisher.segment() as segment:
                    for index in range(writes):
                        tick += 1
                        # Pacing by media time, as a live encoder would deliver.
                        await asyncio.sleep(max(0.0, start + tick * interval - loop.time()))
                        sent[(segment.seq, index)] = time.monotonic_ns()
                        await segment.write(payload)
            result: dict[str, Any] = await loop.run_in_executor(None, parent.recv)
        reader.join()
    arrivals: list[tuple[int, int, int]] = result.pop("arrivals")
    latencies = []
    chunk_sizes = []
    previous_end = {}
    for seq, end, arrived in arrivals:
        begin = previous_end.get(seq, 0)
        previous_end[seq] = end
        chunk_sizes.append(end - begin)
        # Writes whose last byte is in [begin, end) completed with this chunk.
        for index in range(begin // write_size, end // write_size):
            latencies.append((arrived - sent[(seq, index)]) / 1e6)
    megabytes = result["bytes"] / 1e6
    return {
        **result,
        "megabytes": megabytes,
        "cpu_ms_per_mb": result["cpu_seconds"] * 1000 / megabytes,
        "chunks": len(chunk_sizes),
        "mean_chunk_kib": sum(chunk_sizes) / len(chunk_sizes) / 1024,
        "latency_ms": {
            "p50": report.percentile(latencies, 50),
            "p95": report.percentile(latencies, 95),
            "p99": report.percentile(latencies, 99),
            "count": len(latencies),
        },
    }


def _reader_process(kind: str, url: str, chunk_size: int, segments: int, pipe: Connection) -> None:
    result = asyncio.run(_read(kind, url, chunk_size, segments, pipe))
    pipe.send(result)


async def _read(kind: str, url: str, chunk_size: int, segments: int, pipe: Connection) -> dict[str, Any]:
    arrivals: list[tuple[int, int, int]] = []
    total = 0
    if kind == "subscriber":
        async with Subscriber(url, start_seq=0, chunk_size=chunk_size) as subscriber:
            pipe.send("ready")
            cpu = time.process_time()
            for _ in range(segments):
                segment = await anext(subscriber)
                async for chunk in segment:
                    total += len(chunk)
                    arrivals.append((segment.seq, segment.offset, time.monotonic_ns()))
            cpu = time.process_time() - cpu
    else:
        async with aiohttp.ClientSession(read_bufsize=chunk_size) as http:
            pipe.send("ready")
            cpu = time.process_time()
            for seq in range(segments):
                async with http.get(f"{url}/{seq}") as response:
                    offset = 0
                    while chunk := await response.content.read(chunk_size):
                        offset += len(chunk)
                        arrivals.append((seq, offset, time.monotonic_ns()))
                    total += offset
            cpu = time.process_time() - cpu
    return {"bytes": total, "cpu_seconds": cpu, "arrivals": arrivals}


if __name__ == "__main__":
    print(main(quick=True).read_text())
