"""Memory: the relay's RSS per session, and its drift over a long session. `python -m bench memory
[--quick]`.

The relay runs in this process (an in-process RelayServer, sessions started through its gRPC
API); the live 1280×720 30 fps source, the trickle server and the output readers run in a child
process (bench.livesource) and each session's processor (passthrough) in a process of its own,
so this process's RSS (VmRSS, /proc/self/status) is the relay's, its gRPC server's and the
benchmark's own bookkeeping (a few small lists).

- Per session: the median RSS over a few seconds with no session (idle: everything imported, the
  gRPC server up), then with 1 and with 2 sessions (512×512, each after a warm-up).
- Drift: one session for `duration` (10 min; quick: 1 min), RSS sampled `SAMPLES` times, evenly.
  drift = (median of the last tenth − median of the second tenth) / median of the second tenth:
  for 10 min, the last minute against minute 2 (the first minute is warm-up: buffers, pools and
  codec state settle).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.capacity import rss_bytes, start_processors, until
from bench.e2e import serve_relay
from bench.livesource import FPS, SourceProcess
from bench.webrtc import Processor
from relay_server.api.relay.v1 import relay_service_pb2 as pb
from relay_server.api.relay.v1 import relay_service_pb2_grpc as pb_grpc
from relay_server.media.scaler import ScaleMode
from relay_server.service.server import RelayServer
from relay_server.session.manager import KEEP_ENDED, SessionManager

SOURCE = (1280, 720)
SIZE = (512, 512)
DURATION = {True: 60.0, False: 600.0}  # seconds of the drift run
WARMUP = {True: 5.0, False: 15.0}  # seconds a session runs before its RSS is taken
SAMPLES = 60  # RSS samples over the drift run (every 10 s for 10 min)
SETTLED = 5  # samples, 0.5 s apart, whose median is a per-session figure
CONNECT_TIMEOUT = 30.0
TARGET_DRIFT = 5.0  # %, issue

# Session churn: sessions one after another, RSS after each ended. Once with the manager keeping
# no ended session, once with its default (ended sessions stay readable through Get/List).
CHURN_CYCLES = {True: 5, False: 10}
CHURN_SECONDS = 3.0
CHURN_SETTLE = 2  # cycles before the per-session growth is taken

MIB = 1024 * 1024


def drift(samples: list[tuple[float, int]], duration: float) -> dict[str, float]:
    """From (seconds since the run started, RSS bytes): the medians of the second tenth of the run
    and of its last tenth, their relative change (%), and the least-squares slope (bytes per
    minute) after the first tenth."""
    early = [rss for at, rss in samples if duration / 10 <= at < duration / 5]
    late = [rss for at, rss in samples if at >= duration * 9 / 10]
    settled = [(at, rss) for at, rss in samples if at >= duration / 10]
    base = report.median(early)
    last = report.median(late)
    slope = float("nan")
    if len(settled) >= 2:
        mean_t = sum(at for at, _ in settled) / len(settled)
        mean_r = sum(rss for _, rss in settled) / len(settled)
        var = sum((at - mean_t) ** 2 for at, _ in settled)
        if var > 0:
            slope = 60 * sum((at - mean_t) * (rss - mean_r) for at, rss in settled) / var
    return {
        "early median": base,
        "late median": last,
        "drift %": 100 * (last - base) / base if base else float("nan"),
        "slope bytes/min": slope,
        "early samples": len(early),
        "late samples": len(late),
    }


async def settled_rss() -> float:
    """The median of SETTLED samples of this process's RSS, 0.5 s apart."""
    samples = []
    for _ in range(SETTLED):
        samples.append(rss_bytes())
        await asyncio.sleep(0.5)
    return report.median(samples)


class Bench:
    def __init__(
        self,
        source: SourceProcess,
        processors: list[Processor],
        stack: contextlib.AsyncExitStack,
        manager: SessionManager | None = None,
    ) -> None:
        self.source = source
        self.processors = processors
        self.stack = stack
        self.manager = manager or SessionManager()
        self.server: RelayServer | None = None
        self.stub: pb_grpc.RelayServiceStub | None = None
        self.running: list[str] = []

    async def start(self) -> None:
        self.server, self.stub = await serve_relay(self.stack, self.manager)
        self.stack.push_async_callback(self.stop_all)

    async def start_session(self, session_id: str, processor: Processor) -> None:
        assert self.stub is not None
        reading = await self.source.request(
            "read", name=session_id, channel=session_id, mode=ScaleMode.LETTERBOX.value
        )
        await self.stub.StartSession(
            pb.StartSessionRequest(
                session_id=session_id,
                subscribe_url=self.source.input,
                publish_url=reading["url"],
                processor_url=processor.url,
                width=SIZE[0],
                height=SIZE[1],
                mode=pb.SESSION_MODE_TRANSCODE,  # the transcoding path's memory
            )
        )
        self.running.append(session_id)
        relay = self.manager.get(session_id).relay
        await until(
            lambda: relay.stats.frames_returned > 0, CONNECT_TIMEOUT, f"returned frame ({session_id})"
        )

    async def stop_session(self, session_id: str) -> list[Any]:
        """Stop it and return what its output reader received: (index, receive time, decode time)."""
        assert self.stub is not None
        self.running.remove(session_id)
        await self.stub.StopSession(pb.StopSessionRequest(session_id=session_id))
        return (await self.source.request("collect", name=session_id, within=1.0))["received"]

    async def stop_all(self) -> None:
        for session_id in list(self.running):
            with contextlib.suppress(Exception):
                await self.stop_session(session_id)

    async def per_session(self, warmup: float) -> dict[str, Any]:
        await asyncio.sleep(2.0)
        idle = await settled_rss()
        print(f"  idle: {idle / MIB:.1f} MiB", flush=True)
        figures: dict[str, Any] = {"idle": idle}
        for count in (1, 2):
            await self.start_session(f"mem-{count}", self.processors[count - 1])
            await asyncio.sleep(warmup)
            figures[f"{count} sessions"] = await settled_rss()
            print(f"  {count} session(s): {figures[f'{count} sessions'] / MIB:.1f} MiB", flush=True)
        figures["processor rss"] = [rss_bytes(p.process.pid) for p in self.processors if p.process]
        for count in (2, 1):
            await self.stop_session(f"mem-{count}")
        await asyncio.sleep(3.0)
        figures["idle after"] = await settled_rss()
        print(f"  idle after both ended: {figures['idle after'] / MIB:.1f} MiB", flush=True)
        return figures

    async def drift_run(self, duration: float) -> dict[str, Any]:
        session_id = "mem-drift"
        processor = self.processors[0]
        await self.start_session(session_id, processor)
        relay = self.manager.get(session_id).relay
        interval = duration / SAMPLES
        samples: list[dict[str, Any]] = []
        origin = time.monotonic()
        for number in range(SAMPLES + 1):
            await asyncio.sleep(max(0.0, origin + number * interval - time.monotonic()))
            stats = relay.stats
            samples.append(
                {
                    "at": time.monotonic() - origin,
                    "rss": rss_bytes(),
                    "processor rss": rss_bytes(processor.process.pid) if processor.process else 0,
                    "source+readers rss": rss_bytes(self.source.process.pid) if self.source.process else 0,
                    "returned": stats.frames_returned,
                    "encoded": stats.frames_encoded,
                    "state": self.manager.get(session_id).state.value,
                }
            )
            if number % max(1, SAMPLES // 10) == 0:
                print(f"  {samples[-1]['at']:5.0f} s: {samples[-1]['rss'] / MIB:.1f} MiB", flush=True)
        received = await self.stop_session(session_id)
        rates = [
            (b["returned"] - a["returned"]) / (b["at"] - a["at"]) for a, b in itertools.pairwise(samples)
        ]
        fresh = len({index for index, _, _ in received if index is not None})
        return {
            "duration": duration,
            "interval": interval,
            "samples": samples,
            "relay": drift([(s["at"], s["rss"]) for s in samples], duration),
            "processor": drift([(s["at"], s["processor rss"]) for s in samples], duration),
            "returned fps min": min(rates, default=float("nan")),
            "returned fps mean": (samples[-1]["returned"] - samples[0]["returned"]) / samples[-1]["at"],
            "output frames": fresh,
            "output fps": fresh / samples[-1]["at"],
            "states": sorted({s["state"] for s in samples}),
        }

    async def churn(self, cycles: int, seconds: float) -> dict[str, Any]:
        """`cycles` sessions one after another, each for `seconds`, on processor 0: RSS after each
        has ended (and a gc pass)."""
        rss = [await settled_rss()]
        for cycle in range(cycles):
            session_id = f"churn-{id(self.manager) % 1000}-{cycle}"
            await self.start_session(session_id, self.processors[0])
            await asyncio.sleep(seconds)
            await self.stop_session(session_id)
            await asyncio.sleep(1.0)
            gc.collect()
            rss.append(await settled_rss())
        kept = sum(1 for session in self.manager.snapshots() if session.state.ended)
        # After the first few cycles (the allocator's pools fill up), bytes per further session.
        settled = rss[CHURN_SETTLE:]
        per = (settled[-1] - settled[0]) / (len(settled) - 1) if len(settled) > 1 else float("nan")
        print(f"  churn (keep_ended {self.manager.keep_ended}): {per / MIB:+.1f} MiB per session", flush=True)
        return {
            "keep ended": self.manager.keep_ended,
            "rss": rss,
            "ended sessions kept": kept,
            "per session": per,
        }


async def run(quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {
        "quick": quick,
        "source": f"{SOURCE[0]}x{SOURCE[1]} {FPS} fps",
        "size": f"{SIZE[0]}x{SIZE[1]}",
        "warmup": WARMUP[quick],
    }
    async with contextlib.AsyncExitStack() as stack:
        source = await stack.enter_async_context(SourceProcess(*SOURCE))
        processors = await start_processors(stack, 2)
        bench = Bench(source, processors, stack)
        await bench.start()
        results["per session"] = await bench.per_session(WARMUP[quick])
        results["drift"] = await bench.drift_run(DURATION[quick])
        results["churn"] = []
        for keep in (0, KEEP_ENDED):
            churning = Bench(source, processors, stack, SessionManager(keep_ended=keep))
            await churning.start()
            results["churn"].append(await churning.churn(CHURN_CYCLES[quick], CHURN_SECONDS))
    return results


def main(quick: bool = False) -> Path:
    return write(report.timed_run(run, quick))


def _mib(value: float) -> float:
    return round(value / MIB, 1)


def write(results: dict[str, Any]) -> Path:
    per = results["per session"]
    idle, one, two = per["idle"], per["1 sessions"], per["2 sessions"]
    run = results["drift"]
    relay, processor = run["relay"], run["processor"]
    duration = run["duration"]
    short = duration < 600
    rows: list[dict[str, Any]] = [
        {"what": "idle (no session yet)", "relay RSS MiB": _mib(idle), "per session MiB": None},
        {"what": "1 session", "relay RSS MiB": _mib(one), "per session MiB": _mib(one - idle)},
        {"what": "2 sessions", "relay RSS MiB": _mib(two), "per session MiB": _mib((two - idle) / 2)},
        {"what": "2nd session (2 − 1)", "relay RSS MiB": None, "per session MiB": _mib(two - one)},
        {"what": "idle after both ended", "relay RSS MiB": _mib(per["idle after"]), "per session MiB": None},
    ]
    label = f"{duration / 60:g} min run" + (
        " (SHORT RUN: quick mode, not the 10-min figure)" if short else ""
    )
    minutes = (duration / 10, duration / 5, duration * 9 / 10, duration)
    verdict = "met" if abs(relay["drift %"]) < TARGET_DRIFT else "missed"
    processor_rss = ", ".join(f"{_mib(value)}" for value in per["processor rss"])
    early, late = _mib(relay["early median"]), _mib(relay["late median"])
    slope = relay["slope bytes/min"] / 1024
    notes = f"""
RSS drift of the relay over a {label}, one session: **{relay["drift %"]:+.2f} %** (median RSS
{early} MiB over [{minutes[0]:g} s, {minutes[1]:g} s) → {late} MiB over [{minutes[2]:g} s, {minutes[3]:g} s];
least-squares slope after the first tenth {slope:+.0f} KiB/min). Target (issue) < {TARGET_DRIFT:g} %:
{verdict}{" (short run)" if short else ""}.
The processor process over the same run: {processor["drift %"]:+.2f} %
({_mib(processor["early median"])} → {_mib(processor["late median"])} MiB).

Per session, the relay process's RSS (VmRSS), medians of {SETTLED} samples 0.5 s apart after a
{results["warmup"]:g} s warm-up per session. Source: {results["source"]} live, one input channel; sessions
{results["size"]}, each with its own output channel (read in the child process) and its own passthrough
processor process (RSS {processor_rss} MiB each with a session running). Total {results["total seconds"]:g} s.

- per session: (RSS with N sessions − idle) ÷ N; the 2nd session's row is the marginal cost, the
  cleanest figure (the first session also pays for one-off state: codec libraries' tables,
  aiortc's and aiohttp's pools). idle after: RSS once both sessions ended: what the process keeps,
  the allocator's free memory and the ended sessions the manager keeps for Get/List (see churn).
- drift: RSS sampled {SAMPLES} times over the run (every {run["interval"]:g} s) from the session's first
  returned frame; drift = (median of the last tenth − median of the second tenth) ÷ the latter.
  The session returned {run["returned fps mean"]:.1f} fps on average (slowest sample interval
  {run["returned fps min"]:.1f} fps) and its output carried {run["output frames"]} distinct frames
  ({run["output fps"]:.1f} fps): it ran live the whole time (states seen: {", ".join(run["states"])}).
"""
    churn_rows = [
        {
            "manager keeps ended sessions": entry["keep ended"],
            "sessions run": len(entry["rss"]) - 1,
            "RSS before MiB": _mib(entry["rss"][0]),
            "RSS after MiB": _mib(entry["rss"][-1]),
            f"MiB per session after the first {CHURN_SETTLE}": _mib(entry["per session"]),
            "ended sessions kept": entry["ended sessions kept"],
        }
        for entry in results.get("churn", [])
    ]
    if churn_rows:
        notes += f"""
Session churn: sessions one after another ({CHURN_SECONDS:g} s each, stopped through the API, a gc pass
after each), RSS after each ended; once with a SessionManager that keeps no ended session
(keep_ended=0), once with its default keep_ended={KEEP_ENDED} (ended sessions stay readable through
Get/List until {KEEP_ENDED} newer ones ended). Growth per session after the first {CHURN_SETTLE} (allocator
pools filling):

{report.markdown_table(churn_rows)}"""
    return report.write("memory", "Memory: relay RSS per session and drift", results, rows, notes)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 1-minute drift run (labelled short)")
    print(main(parser.parse_args().quick).read_text())
