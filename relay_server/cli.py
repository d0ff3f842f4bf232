"""The `trickle-relay` command: one subcommand per thing the package can run."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Sequence


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _add_trickle_server(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "trickle-server",
        help="run the embedded trickle server",
        description="Serve trickle channels over HTTP, as the reference server does.",
    )
    parser.add_argument("--listen", type=_host_port, default=("127.0.0.1", 2939), metavar="HOST:PORT")
    parser.add_argument(
        "--no-autocreate",
        dest="autocreate",
        action="store_false",
        help="answer 404 to a POST on an unknown channel instead of creating it",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="close channels that received no segment data for this long (default 300)",
    )

    def run(args: argparse.Namespace) -> int:
        from relay_server.trickle.server import serve_forever

        host, port = args.listen
        asyncio.run(serve_forever(host, port, autocreate=args.autocreate, idle_timeout=args.idle_timeout))
        return 0

    parser.set_defaults(run=run)


def _add_demo(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("demo", help="run the relay end to end on embedded defaults")
    parser.add_argument("--output", default="demo-output", help="directory for the output files")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the test source")

    def run(args: argparse.Namespace) -> int:
        from pathlib import Path

        from relay_server.demo import run_demo

        Path(args.output).mkdir(parents=True, exist_ok=True)
        return asyncio.run(run_demo(Path(args.output), seconds=args.seconds))

    parser.set_defaults(run=run)


def _add_processor(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "processor",
        help="run the embedded WebRTC processor",
        description="Serve ComfyStream's WebRTC contract with simple effects (passthrough, invert, "
        "grayscale, edges) chosen by the prompt's node class types.",
    )
    parser.add_argument("--listen", type=_host_port, default=("127.0.0.1", 8889), metavar="HOST:PORT")
    parser.add_argument(
        "--delay-ms", type=float, default=0.0, help="artificial processing time per frame (test knob)"
    )
    parser.add_argument(
        "--max-fps",
        type=float,
        default=0.0,
        help="process at most this many frames per second (0: no cap)",
    )
    parser.add_argument(
        "--queue",
        type=int,
        default=0,
        metavar="N",
        help="queue up to N input frames and process the oldest first, as ComfyStream does "
        "(default 0: only the newest frame waits)",
    )
    parser.add_argument(
        "--drop-every", type=int, default=0, metavar="N", help="drop every Nth input frame (0: none)"
    )
    parser.add_argument(
        "--input-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="end a returned track for good after this long without input, as ComfyStream does "
        "(default 5, 0: never)",
    )

    def run(args: argparse.Namespace) -> int:
        from relay_server.processor.pipeline import Knobs
        from relay_server.processor.server import serve_forever

        knobs = Knobs(
            delay_ms=args.delay_ms,
            drop_every=args.drop_every,
            max_fps=args.max_fps,
            input_timeout=args.input_timeout,
            queue=args.queue,
        )
        host, port = args.listen
        asyncio.run(serve_forever(host, port, knobs))
        return 0

    parser.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trickle-relay", description=__doc__)
    parser.add_argument(
        "--log-level",
        default=os.environ.get("RELAY_LOG_LEVEL", "INFO"),
        help="logging level (env RELAY_LOG_LEVEL, default INFO)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_trickle_server(commands)
    _add_demo(commands)
    _add_processor(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130
