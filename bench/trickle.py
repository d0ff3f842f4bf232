"""Trickle client cost: a 10-minute 2 Mbit/s channel streamed server → subscriber.

The embedded server and a paced publisher run in this process. The publisher writes the channel
like an encoder would (2 s segments, 30 writes per second) at `speedup` times real time and
records when each write left. Every reader reads the same stream at the same time, each in a
process of its own so its CPU time is its alone, and records when each chunk arrived. A write's
latency is the arrival of the chunk holding its last byte minus the write time (one monotonic
clock for the machine).

Readers: our Subscriber at 8, 64 and 256 KiB chunks, and the baseline, a bare aiohttp loop
reading the same segments at 64 KiB (the protocol's cost without our client's preconnect,
retries and bookkeeping). Running them side by side puts them under the same machine noise.
CPU is sampled per minute of media; the table gives the median minute.
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
WRITE_SIZE = BITRATE // 8 // WRITES_PER_SECOND
BLOCK_SEGMENTS = 60 // SEGMENT_SECONDS  # one minute of media per CPU sample
READERS = [
    ("subscriber", 8 * 1024),
    ("subscriber", 64 * 1024),
    ("subscriber", 256 * 1024),
    ("bare-aiohttp", 64 * 1024),
]


def main(quick: bool = False) -> Path:
    media_seconds = 120 if quick else 600
    speedup = 20.0
    runs = asyncio.run(_run(media_seconds, speedup))
    base = runs["bare-aiohttp-64k"]["cpu_ms_per_mb"]
    rows = [
        {
            "reader": run["reader"],
            "chunk KiB": run["chunk_kib"],
            "MB": run["megabytes"],
            "CPU ms/MB (median minute)": run["cpu_ms_per_mb"],
            "vs bare": run["cpu_ms_per_mb"] / base,
            "chunks": run["chunks"],
            "mean chunk KiB": run["mean_chunk_kib"],
            "latency p50 ms": run["latency_ms"]["p50"],
            "p95 ms": run["latency_ms"]["p95"],
            "p99 ms": run["latency_ms"]["p99"],
        }
        for run in runs.values()
    ]
    notes = (
        f"{media_seconds} s of {BITRATE / 1e6:g} Mbit/s media in {SEGMENT_SECONDS} s segments, "
        f"{WRITES_PER_SECOND} writes/s, streamed at {speedup:g}x real time on loopback to all readers at "
        "once. CPU is each reader process's own (user+system), sampled per minute of media; the median "
        "minute is shown. Latency is per publisher write: write → the reader holds its last byte."
    )
    return report.write(
        "trickle",
        "Trickle subscriber: CPU per MB and write-to-read latency by chunk size",
        {"media_seconds": media_seconds, "speedup": speedup, "runs": runs},
        rows,
        notes,
    )


async def _run(media_seconds: int, speedup: float) -> dict[str, dict[str, Any]]:
    segments = media_seconds // SEGMENT_SECONDS
    writes = SEGMENT_SECONDS * WRITES_PER_SECOND
    loop = asyncio.get_running_loop()
    context = multiprocessing.get_context("spawn")
    async with TrickleServer() as server:
        url = server.channel_url("bench")
        async with aiohttp.ClientSession() as http, http.post(url, headers={"Expect-Content": "video/MP2T"}):
            pass  # the channel exists before anyone reads it
        readers = []
        for kind, chunk_size in READERS:
            parent, child = context.Pipe()
            process = context.Process(target=_reader_process, args=(kind, url, chunk_size, segments, child))
            process.start()
            readers.append((kind, chunk_size, parent, process))
        for *_, parent, _ in readers:
            await loop.run_in_executor(None, parent.recv)  # connected and waiting
        sent: dict[tuple[int, int], int] = {}
        payload = bytes(WRITE_SIZE)
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
            results = {}
            for kind, chunk_size, parent, process in readers:
                result = await loop.run_in_executor(None, parent.recv)
                process.join()
                results[f"{kind}-{chunk_size // 1024}k"] = _summarise(kind, chunk_size, result, sent)
    return results


def _summarise(
    kind: str, chunk_size: int, result: dict[str, Any], sent: dict[tuple[int, int], int]
) -> dict[str, Any]:
    latencies = []
    chunk_sizes = []
    previous_end: dict[int, int] = {}
    for seq, end, arrived in result["arrivals"]:
        begin = previous_end.get(seq, 0)
        previous_end[seq] = end
        chunk_sizes.append(end - begin)
        # Writes whose last byte is in [begin, end) completed with this chunk.
        for index in range(begin // WRITE_SIZE, end // WRITE_SIZE):
            latencies.append((arrived - sent[(seq, index)]) / 1e6)
    per_block = [cpu * 1000 / (size / 1e6) for cpu, size in result["blocks"]]
    return {
        "reader": kind,
        "chunk_kib": chunk_size // 1024,
        "megabytes": result["bytes"] / 1e6,
        "cpu_seconds": result["cpu_seconds"],
        "cpu_ms_per_mb": report.median(per_block),
        "cpu_ms_per_mb_per_minute": per_block,
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
    pipe.send(asyncio.run(_read(kind, url, chunk_size, segments, pipe)))


async def _read(kind: str, url: str, chunk_size: int, segments: int, pipe: Connection) -> dict[str, Any]:
    arrivals: list[tuple[int, int, int]] = []
    blocks: list[tuple[float, int]] = []  # (CPU seconds, bytes) per minute of media
    total = 0
    start = block = (0.0, 0)

    def ready() -> None:
        nonlocal start, block
        pipe.send("ready")
        start = block = (time.process_time(), 0)

    def segment_done(seq: int) -> None:
        nonlocal block
        if (seq + 1) % BLOCK_SEGMENTS == 0:
            now = (time.process_time(), total)
            blocks.append((now[0] - block[0], now[1] - block[1]))
            block = now

    if kind == "subscriber":
        async with Subscriber(url, start_seq=0, chunk_size=chunk_size) as subscriber:
            ready()
            for _ in range(segments):
                segment = await anext(subscriber)
                async for chunk in segment:
                    total += len(chunk)
                    arrivals.append((segment.seq, segment.offset, time.monotonic_ns()))
                segment_done(segment.seq)
    else:
        async with aiohttp.ClientSession(read_bufsize=chunk_size) as http:
            ready()
            for seq in range(segments):
                async with http.get(f"{url}/{seq}") as response:
                    offset = 0
                    while chunk := await response.content.read(chunk_size):
                        offset += len(chunk)
                        arrivals.append((seq, offset, time.monotonic_ns()))
                    total += offset
                segment_done(seq)
    cpu = time.process_time() - start[0]
    return {"bytes": total, "cpu_seconds": cpu, "blocks": blocks, "arrivals": arrivals}


if __name__ == "__main__":
    print(main(quick=True).read_text())
