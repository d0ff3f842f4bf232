"""relay_server._fast: the compiled build against the plain one, measured in the same run.

`run(quick)` returns the figures (medians of several repeats) and the speedup of the compiled build
for each (plain time / compiled time, so above 1 means Cython wins). `python -m bench.fast [--quick]`
writes them to results/fast.{json,md}.
No figure here waits on a timer: threads hand off through the primitives.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import av
import numpy as np

from bench import report
from relay_server._fast import implementations

CHUNK = 64 * 1024
PYAV_READ = 32 * 1024  # what PyAV asks a file-like object for unless av.open(buffer_size=...) says otherwise


def _median(repeats: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(repeats))


def chunkqueue_threaded(impl: SimpleNamespace, chunks: int, read_size: int) -> dict[str, float]:
    """A producer thread puts 64 KiB chunks (waiting when told to), a reader thread drains them."""
    queue = impl.ChunkQueue(16 * CHUNK)
    writable = threading.Event()
    queue.set_writable_callback(writable.set)
    chunk = bytes(CHUNK)

    def produce() -> None:
        for _ in range(chunks):
            if queue.put(chunk):
                writable.wait()
                writable.clear()
        queue.close()

    def consume() -> None:
        while queue.read(read_size):
            pass

    threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
    wall, cpu = time.perf_counter(), time.process_time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "mb_per_s": chunks * CHUNK / wall / 1e6,
        "ns_per_chunk": wall / chunks * 1e9,
        "cpu_ns_per_chunk": cpu / chunks * 1e9,
    }


def chunkqueue_single(impl: SimpleNamespace, pairs: int) -> dict[str, float]:
    """put() + read() of one 64 KiB chunk in one thread: the bookkeeping alone."""
    queue = impl.ChunkQueue(16 * CHUNK)
    chunk = bytes(CHUNK)
    put, read = queue.put, queue.read
    start = time.perf_counter()
    for _ in range(pairs):
        put(chunk)
        read()
    return {"ns_per_pair": (time.perf_counter() - start) / pairs * 1e9}


def _frame(width: int, height: int, line_size: int | None = None) -> av.VideoFrame:
    if line_size is None:
        return av.VideoFrame(width, height, "yuv420p")
    rows = np.zeros((height * 3 // 2, line_size), np.uint8)
    return av.VideoFrame.from_numpy_buffer(rows, format="yuv420p", width=width)


def copy_frame(impl: SimpleNamespace, width: int, height: int, padded: bool, copies: int) -> dict[str, float]:
    """copy_frame() of a yuv420p frame; `padded` makes the source lines longer (copied row by row)."""
    src = _frame(width, height, width + 64 if padded else None)
    dst = _frame(width, height)
    copy = impl.copy_frame
    copy(src, dst)  # fault the destination pages in first
    start = time.perf_counter()
    for _ in range(copies):
        copy(src, dst)
    return {"us_per_frame": (time.perf_counter() - start) / copies * 1e6}


def run(quick: bool) -> dict[str, Any]:
    scale, repeats = (1, 3) if quick else (5, 7)
    measures: dict[str, Callable[[SimpleNamespace], dict[str, float]]] = {
        "chunkqueue_threads_whole_chunks": lambda impl: chunkqueue_threaded(impl, 20_000 * scale, -1),
        "chunkqueue_threads_pyav_reads": lambda impl: chunkqueue_threaded(impl, 20_000 * scale, PYAV_READ),
        "chunkqueue_single_thread": lambda impl: chunkqueue_single(impl, 50_000 * scale),
        "copy_frame_512": lambda impl: copy_frame(impl, 512, 512, False, 300 * scale),
        "copy_frame_512_row_by_row": lambda impl: copy_frame(impl, 512, 512, True, 300 * scale),
        "copy_frame_720p": lambda impl: copy_frame(impl, 1280, 720, False, 100 * scale),
        "copy_frame_720p_row_by_row": lambda impl: copy_frame(impl, 1280, 720, True, 100 * scale),
    }
    impls = implementations()
    results: dict[str, Any] = {"quick": quick, "repeats": repeats, "implementations": sorted(impls)}
    for name, measure in measures.items():
        samples: dict[str, list[dict[str, float]]] = {impl_name: [] for impl_name in impls}
        for _ in range(repeats):  # interleaved, so that drift in the machine's speed hits both alike
            for impl_name, impl in impls.items():
                samples[impl_name].append(measure(impl))
        figures = {
            impl_name: {key: round(statistics.median(run[key] for run in runs), 2) for key in runs[0]}
            for impl_name, runs in samples.items()
        }
        if len(figures) == 2:
            python, cython = figures["python"], figures["cython"]
            figures["speedup"] = {key: _speedup(key, python[key], cython[key]) for key in python}
        results[name] = figures
    return results


def _speedup(key: str, python: float, cython: float) -> float:
    """Above 1, the Cython build wins: plain over compiled for times, compiled over plain for rates."""
    return round(cython / python if key.endswith("_per_s") else python / cython, 2)


def main(quick: bool = False) -> Path:
    """Run and write results/fast.json and fast.md: one row per figure, both builds side by side."""
    results = run(quick)
    rows = []
    for measure, figures in results.items():
        if not isinstance(figures, dict) or "python" not in figures:
            continue  # run parameters, not a measure
        for key, python in figures["python"].items():
            cython = figures.get("cython", {}).get(key)
            rows.append(
                {
                    "measure": measure,
                    "figure": key,
                    "cython": cython,
                    "python": python,
                    "cython speedup": figures.get("speedup", {}).get(key),
                }
            )
    notes = (
        "Medians of repeated runs, both builds interleaved in the same run. Speedup above 1 means the "
        "Cython build wins (plain time / compiled time, or compiled rate / plain rate)."
    )
    return report.write(
        "fast", "Hot-path hand-offs: Cython vs plain Python", {"results": results}, rows, notes
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (about 5 s)")
    print(main(parser.parse_args().quick).read_text())
