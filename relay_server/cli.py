"""The `trickle-relay` command: one subcommand per thing the package can run."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from relay_server import eventloop

if TYPE_CHECKING:
    from relay_server.trickle.limits import TrickleLimits
from relay_server.serving import ListenError


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
    _add_trickle_limits(parser)

    def run(args: argparse.Namespace) -> int:
        from relay_server.trickle.server import serve_forever

        try:
            limits = _trickle_limits(args)
        except ValueError as error:
            parser.error(str(error))
        host, port = args.listen
        server = serve_forever(
            host, port, autocreate=args.autocreate, idle_timeout=args.idle_timeout, limits=limits
        )
        eventloop.run(server)
        return 0

    parser.set_defaults(run=run)


def _add_trickle_limits(parser: argparse.ArgumentParser) -> None:
    from relay_server import settings

    add = _env_flags(parser)

    add(
        "--max-segment-bytes",
        type=_checked(settings.parse_count),
        metavar="BYTES",
        help="bytes one segment may hold; more is answered 413 "
        "(env TRICKLE_MAX_SEGMENT_BYTES, default 67108864)",
    )
    add(
        "--max-buffered-bytes",
        type=_checked(settings.parse_count),
        metavar="BYTES",
        help="bytes all segments together may hold; more is answered 503 "
        "(env TRICKLE_MAX_BUFFERED_BYTES, default 1073741824)",
    )
    add(
        "--max-channels",
        type=_checked(settings.parse_count),
        metavar="N",
        help="channels at once; more are answered 503 (env TRICKLE_MAX_CHANNELS, default 1024)",
    )
    add(
        "--max-connections",
        type=_checked(settings.parse_count),
        metavar="N",
        help="open connections; more are answered 429 (env TRICKLE_MAX_CONNECTIONS, default 512)",
    )
    add(
        "--header-timeout",
        type=_checked(settings.parse_timeout),
        metavar="SECONDS",
        help="close a connection with no complete request head this long after it connected or "
        "finished a request (env TRICKLE_HEADER_TIMEOUT, default 30)",
    )
    add(
        "--first-byte-timeout",
        type=_checked(settings.parse_timeout),
        metavar="SECONDS",
        help="answer 408 to a POST with no body byte after this long "
        "(env TRICKLE_FIRST_BYTE_TIMEOUT, default 60)",
    )


def _trickle_limits(args: argparse.Namespace) -> TrickleLimits:
    """The trickle server's limits: each flag given, else its TRICKLE_* variable, else the default."""
    from relay_server import settings
    from relay_server.trickle.limits import TrickleLimits

    defaults = TrickleLimits()
    return TrickleLimits(
        **{
            name: _flag_or_env(
                getattr(args, name), functools.partial(settings.trickle_limit, name, getattr(defaults, name))
            )
            for name in settings.TRICKLE_LIMITS
        }
    )


def _add_demo(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("demo", help="run the relay end to end on embedded defaults")
    parser.add_argument("--output", default="demo-output", help="directory for the output files")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the test source")

    def run(args: argparse.Namespace) -> int:
        from pathlib import Path

        from relay_server.demo import run_demo

        Path(args.output).mkdir(parents=True, exist_ok=True)
        return eventloop.run(run_demo(Path(args.output), seconds=args.seconds))

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
        "--loss",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="drop this share of the RTP packets sent and received, as a lossy network would "
        "(default 0; 0.01: 1 %%)",
    )
    parser.add_argument(
        "--drop-every", type=int, default=0, metavar="N", help="drop every Nth input frame (0: none)"
    )
    parser.add_argument(
        "--loopback",
        action="store_true",
        help="send the video back as it came, neither decoded nor encoded (no effects, none of the "
        "knobs above): a processor that costs almost nothing, to measure the relay alone",
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

        try:
            knobs = Knobs(
                delay_ms=args.delay_ms,
                drop_every=args.drop_every,
                max_fps=args.max_fps,
                input_timeout=args.input_timeout,
                queue=args.queue,
                loss=args.loss,
                loopback=args.loopback,
            )
        except ValueError as error:
            parser.error(str(error))
        host, port = args.listen
        eventloop.run(serve_forever(host, port, knobs))
        return 0

    parser.set_defaults(run=run)


_FROM_ENV: Any = object()  # a flag not given: its variable, or the default, decides


def _flag_or_env(flag: Any, from_env: Callable[[], Any]) -> Any:
    return from_env() if flag is _FROM_ENV else flag


def _env_flags(parser: argparse.ArgumentParser) -> Callable[..., Any]:
    """parser.add_argument for flags with an environment twin: unset, they read it (_flag_or_env)."""

    def add(*flags: str, **options: Any) -> Any:
        return parser.add_argument(*flags, default=_FROM_ENV, **options)

    return add


def _checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from a settings.parse_* function: its ValueError becomes a usage error."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


def _add_serve(commands: argparse._SubParsersAction) -> None:
    from relay_server import settings

    environment = (settings.__doc__ or "").split("\n", 1)[1].strip("\n")
    parser = commands.add_parser(
        "serve",
        help="run the relay's gRPC service (sessions, health, reflection, metrics)",
        description="Serve relay.v1.RelayService: sessions are started, steered and watched over gRPC\n"
        "(with gRPC health and reflection, and Prometheus metrics on a port of their own).\n\n"
        "SIGTERM or SIGINT drains: health goes NOT_SERVING, every session is stopped, then the\n"
        "server; the exit code is then 0. Invalid options exit with code 2 and say what is wrong.",
        epilog=f"environment variables:\n\n{environment}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    add = _env_flags(parser)

    add(
        "--listen",
        type=_checked(settings.parse_host_port),
        metavar="HOST:PORT",
        help="gRPC address (env RELAY_LISTEN, default 127.0.0.1:50051; port 0: any free port)",
    )
    add(
        "--max-sessions",
        type=_checked(settings.parse_count),
        metavar="N",
        help="sessions run at once at most (env RELAY_MAX_SESSIONS, default 8)",
    )
    add(
        "--allow-hosts",
        type=_checked(settings.parse_hosts),
        metavar="H1,H2",
        help="the only hosts sessions may connect to: channels, processors and their ICE candidates "
        "(env RELAY_ALLOW_HOSTS, default empty: any host)",
    )
    add(
        "--metrics-listen",
        type=_checked(settings.parse_optional_host_port),
        metavar="HOST:PORT",
        help="Prometheus endpoint, GET /metrics (env RELAY_METRICS_LISTEN, default 127.0.0.1:9102; "
        "'off' or empty: none)",
    )
    add(
        "--auth-token",
        metavar="TOKEN",
        help="require 'authorization: Bearer TOKEN' metadata on RelayService calls; health and "
        "reflection stay open (env RELAY_AUTH_TOKEN, default none; prefer the variable: "
        "flags show in the process list)",
    )
    add(
        "--tls-cert",
        type=_checked(settings.parse_file),
        metavar="PATH",
        help="PEM certificate chain: serve TLS only, with --tls-key (env RELAY_TLS_CERT)",
    )
    add("--tls-key", type=_checked(settings.parse_file), metavar="PATH", help="PEM key (env RELAY_TLS_KEY)")
    add(
        "--log-format",
        type=_checked(settings.parse_log_format),
        metavar="text|json",
        help="text lines with [session=ID], or one JSON object per line (env RELAY_LOG_FORMAT, default text)",
    )
    add(
        "--log-level",
        dest="serve_log_level",
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING, ERROR or CRITICAL (env RELAY_LOG_LEVEL, default INFO)",
    )
    add(
        "--workers",
        type=_checked(settings.parse_worker_processes),
        metavar="N",
        help="run sessions in N worker processes behind this endpoint, each with its own event "
        "loop (env RELAY_WORKERS, default 0: one per two cores this process may use; 1: in this "
        "process)",
    )
    add(
        "--replica",
        type=_checked(settings.parse_replica),
        metavar="NAME",
        help="this relay's name among replicas behind a proxy: the session ids it makes start "
        "with 'NAME.', which the proxy routes by (env RELAY_REPLICA, default none)",
    )
    add(
        "--drain-grace",
        type=_checked(settings.parse_seconds),
        metavar="SECONDS",
        help="on shutdown, how long in-flight RPCs may still run once the sessions are stopped "
        "(env RELAY_DRAIN_GRACE, default 5)",
    )

    def run(args: argparse.Namespace) -> int:
        from relay_server.service import app

        pick = _flag_or_env
        try:
            try:
                level_flag = args.serve_log_level
                level = settings.parse_log_level(
                    args.log_level or "INFO" if level_flag is _FROM_ENV else level_flag
                )
            except ValueError as error:
                raise ValueError(f"--log-level / RELAY_LOG_LEVEL: {error}") from None
            options = app.ServeOptions(
                listen=pick(args.listen, settings.listen),
                max_sessions=pick(args.max_sessions, settings.max_sessions),
                allow_hosts=pick(args.allow_hosts, settings.allow_hosts),
                metrics_listen=pick(args.metrics_listen, settings.metrics_listen),
                auth_token=pick(args.auth_token, settings.auth_token),
                tls_cert=pick(args.tls_cert, settings.tls_cert),
                tls_key=pick(args.tls_key, settings.tls_key),
                log_format=pick(args.log_format, settings.log_format),
                log_level=level,
                drain_grace=pick(args.drain_grace, settings.drain_grace),
                replica=pick(args.replica, settings.replica),
                workers=pick(args.workers, settings.worker_processes),
            )
            options.check()
        except ValueError as error:
            parser.error(str(error))
        return app.run(options)

    parser.set_defaults(run=run, own_logging=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trickle-relay", description=__doc__)
    parser.add_argument(
        "--log-level",
        default=os.environ.get("RELAY_LOG_LEVEL", "INFO"),
        help="logging level (env RELAY_LOG_LEVEL, default INFO)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_serve(commands)
    _add_trickle_server(commands)
    _add_demo(commands)
    _add_processor(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not getattr(args, "own_logging", False):  # serve sets up its own (formats, session ids)
        logging.basicConfig(
            level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    try:
        return int(args.run(args))
    except ListenError as error:  # a busy port is the user's to fix: no traceback
        print(f"trickle-relay {args.command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
