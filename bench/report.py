"""Result files: one JSON document and one markdown table per benchmark."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from relay_server import eventloop, settings

RESULTS = Path(__file__).parent / "results"


def timed_run(run: Callable[[bool], Coroutine[Any, Any, dict[str, Any]]], quick: bool) -> dict[str, Any]:
    """A benchmark's results, with the seconds it took in all."""
    started = time.monotonic()
    results = eventloop.run(run(quick))
    results["total seconds"] = round(time.monotonic() - started, 1)
    return results


def rounded(value: Any, digits: int) -> Any:
    """A float to `digits`, anything else (NaN too) as it is."""
    return round(value, digits) if isinstance(value, float) and not math.isnan(value) else value


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0–100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "event loop": settings.event_loop(),  # the relay's, as `trickle-relay serve` runs it
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def cpu_model() -> str:
    """The processor's model name, as /proc/cpuinfo gives it (else the platform's word for it)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(column)) for column in columns) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)


def write(
    name: str, title: str, result: dict[str, Any], rows: Sequence[dict[str, Any]], notes: str = ""
) -> Path:
    """Write results/<name>.json (everything) and results/<name>.md (the table and notes)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    document = {"benchmark": name, "machine": machine(), **result, "rows": list(rows)}
    (RESULTS / f"{name}.json").write_text(json.dumps(document, indent=2) + "\n")
    text = f"# {title}\n\n{markdown_table(rows)}"
    if notes:
        text += f"\n{notes.strip()}\n"
    box = document["machine"]
    text += f"\nMachine: {box['cpu']}, {box['cpus']} CPUs, {box['platform']}, Python {box['python']}.\n"
    path = RESULTS / f"{name}.md"
    path.write_text(text)
    return path
