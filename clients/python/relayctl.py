#!/usr/bin/env python3
"""relayctl: start, steer and watch trickle-relay sessions over gRPC (relay.v1.RelayService).

    python clients/python/relayctl.py start --subscribe-url URL --publish-url URL --processor-url URL
    python clients/python/relayctl.py get SESSION_ID
    python clients/python/relayctl.py list --output table
    python clients/python/relayctl.py update SESSION_ID --prompts @workflow.json
    python clients/python/relayctl.py watch SESSION_ID --interval 0.5
    python clients/python/relayctl.py stop SESSION_ID

The connection options (--server, --token, --tls, --ca-cert, --timeout, --output) go before or
after the subcommand. --server defaults to $RELAY_ADDRESS or 127.0.0.1:50051, --token to
$RELAY_AUTH_TOKEN (sent as `authorization: Bearer TOKEN`).

`list` follows ListSessions' pages to the end and shows every session at once.

Behind a proxy in front of several relay replicas: every call that names a session carries it as
`relay-session-id` metadata, for the proxy to route by. `start` without --id, refused by a full
(SESSION_LIMIT_REACHED) or draining (DRAINING) replica, is tried again at once, up to --attempts
times (default 3).

Exit status: 0 on success, 1 when the relay answers with an error (printed as
`error: CODE: message [REASON]`, then one line per field violation, failed precondition or retry
hint), 2 for a usage error, 130 on Ctrl-C.
Uses the stubs generated into the installed relay_server package (`pip install -e .`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import grpc
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from relay_server.api.relay.v1 import relay_service_pb2 as pb
from relay_server.api.relay.v1 import relay_service_pb2_grpc as pb_grpc

DEFAULT_SERVER = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 30.0  # seconds, for every RPC but WatchSession
DEFAULT_ATTEMPTS = 3  # StartSession calls for `start` without --id
# A proxy cannot read protobuf requests: it routes a call to the replica that owns the session
# by this header.
SESSION_HEADER = "relay-session-id"
# The refusals of a StartSession that created nothing, and that another replica may accept.
RETRIED_REASONS = frozenset({"SESSION_LIMIT_REACHED", "DRAINING"})
# The google.rpc error details relayctl reads (google.rpc.Status.details is a list of Any).
DETAIL_TYPES = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.RetryInfo,
)
SCALE_MODES = {"letterbox": pb.SCALE_MODE_LETTERBOX, "crop": pb.SCALE_MODE_CROP}
FILLS = {"repeat": pb.OUTPUT_FILL_REPEAT, "hold": pb.OUTPUT_FILL_HOLD}
MODES = {
    "transcode": pb.SESSION_MODE_TRANSCODE,
    "passthrough": pb.SESSION_MODE_PASSTHROUGH,
    "auto": pb.SESSION_MODE_AUTO,
}
ENDED = {pb.SESSION_STATE_STOPPED, pb.SESSION_STATE_FAILED}


class UsageError(Exception):
    """A bad argument value found after parsing (exit status 2)."""


# -- arguments -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # The connection options live in a parent parser shared by the top level and every
    # subcommand, with SUPPRESS defaults so a value given in either position survives.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    option = common.add_argument
    option("--server", metavar="HOST:PORT", help=f"relay address ($RELAY_ADDRESS, {DEFAULT_SERVER})")
    option("--token", help="bearer token sent as authorization metadata ($RELAY_AUTH_TOKEN)")
    option("--tls", action="store_true", help="connect with TLS (system roots unless --ca-cert)")
    option("--ca-cert", metavar="PATH", help="PEM roots to verify the server with (implies --tls)")
    option("--timeout", type=float, metavar="S", help=f"RPC deadline (default {DEFAULT_TIMEOUT:g} s)")
    option("--output", choices=("json", "table"), help="output format (default json)")

    parser = argparse.ArgumentParser(
        prog="relayctl", description="Control trickle-relay sessions over gRPC.", parents=[common]
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    start = commands.add_parser("start", parents=[common], help="start a session")
    start.add_argument("--id", dest="session_id", default="", help="session id (generated when empty)")
    start.add_argument(
        "--attempts",
        type=int,
        default=DEFAULT_ATTEMPTS,
        metavar="N",
        help=f"without --id: calls while replicas are full or draining (default {DEFAULT_ATTEMPTS})",
    )
    start.add_argument("--subscribe-url", default="", help="input trickle channel (required)")
    start.add_argument("--publish-url", default="", help="output trickle channel (required)")
    start.add_argument("--control-url", default="")
    start.add_argument("--events-url", default="")
    start.add_argument("--data-url", default="")
    start.add_argument("--gateway-request-id", default="")
    start.add_argument("--processor-url", default="", help="the processor's base URL (required)")
    add_prompts(start)
    start.add_argument("--width", type=int, default=0, help="processor frame width (default 512)")
    start.add_argument("--height", type=int, default=0, help="processor frame height (default 512)")
    start.add_argument("--max-fps", type=float, default=0.0, help="cap on frames/s sent to the processor")
    start.add_argument("--preset", default="", help="x264 preset of the output (default ultrafast)")
    start.add_argument("--bitrate", type=int, default=0, help="output bitrate in bits/s")
    start.add_argument("--gop", type=float, metavar="S", help="seconds between output keyframes (default 2)")
    start.add_argument("--scale-mode", choices=sorted(SCALE_MODES), help="fit to the processor size")
    start.add_argument("--fill", choices=sorted(FILLS), help="output while no processed frame returns")
    start.add_argument(
        "--mode", choices=sorted(MODES), help="auto (default): forward H.264 as it is when it qualifies"
    )
    start.add_argument("--allow-shared-processor", action="store_true", help="share the processor URL")
    start.add_argument("--offer-timeout", type=float, metavar="S", help="processor answer deadline (60 s)")
    start.add_argument(
        "--latency-budget",
        type=float,
        metavar="S",
        help="how far behind the input's live edge a frame may still be sent (0.5 s)",
    )

    for name, text in (("stop", "stop a session"), ("get", "show one session")):
        command = commands.add_parser(name, parents=[common], help=text)
        command.add_argument("session_id", metavar="ID")

    commands.add_parser("list", parents=[common], help="list the relay's sessions")

    update = commands.add_parser("update", parents=[common], help="change a running session's parameters")
    update.add_argument("session_id", metavar="ID")
    add_prompts(update)
    update.add_argument("--width", type=int, default=0, help="new processor width (with --height)")
    update.add_argument("--height", type=int, default=0, help="new processor height (with --width)")
    pause = update.add_mutually_exclusive_group()
    pause.add_argument("--pause", dest="pause", action="store_const", const=pb.PAUSE_ACTION_PAUSE)
    pause.add_argument("--resume", dest="pause", action="store_const", const=pb.PAUSE_ACTION_RESUME)

    watch = commands.add_parser("watch", parents=[common], help="follow a session's state and stats live")
    watch.add_argument("session_id", metavar="ID")
    watch.add_argument("--interval", type=float, metavar="S", help="seconds between snapshots (default 1)")
    watch.add_argument("--count", type=int, metavar="N", help="stop after N snapshots")
    return parser


def add_prompts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompts",
        metavar="JSON|@FILE",
        help="ComfyUI API workflows: a JSON list of objects, or one object",
    )


def parse_prompts(text: str | None) -> list[Struct]:
    if text is None:
        return []
    source = "--prompts"
    if text.startswith("@"):
        source = text[1:]
        try:
            with open(source, encoding="utf-8") as file:
                text = file.read()
        except OSError as error:
            raise UsageError(f"--prompts: {error}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"{source}: not JSON: {error}") from None
    workflows = value if isinstance(value, list) else [value]
    structs = []
    for index, workflow in enumerate(workflows):
        if not isinstance(workflow, dict):
            raise UsageError(f"{source}: workflow {index} is not a JSON object")
        struct = Struct()
        struct.update(workflow)
        structs.append(struct)
    return structs


def seconds(value: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(round(value * 1e9))
    return duration


def start_request(args: argparse.Namespace) -> pb.StartSessionRequest:
    for name in ("width", "height", "bitrate"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name}: must not be negative")
    request = pb.StartSessionRequest(
        session_id=args.session_id,
        subscribe_url=args.subscribe_url,
        publish_url=args.publish_url,
        control_url=args.control_url,
        events_url=args.events_url,
        data_url=args.data_url,
        gateway_request_id=args.gateway_request_id,
        processor_url=args.processor_url,
        prompts=parse_prompts(args.prompts),
        width=args.width,
        height=args.height,
        max_fps=args.max_fps,
        encoder=pb.EncoderSettings(preset=args.preset, bitrate=args.bitrate),
        allow_shared_processor=args.allow_shared_processor,
    )
    if args.gop is not None:
        request.encoder.gop.CopyFrom(seconds(args.gop))
    if args.scale_mode is not None:
        request.scale_mode = SCALE_MODES[args.scale_mode]
    if args.fill is not None:
        request.output_fill = FILLS[args.fill]
    if args.offer_timeout is not None:
        request.offer_timeout.CopyFrom(seconds(args.offer_timeout))
    if args.latency_budget is not None:
        request.latency_budget.CopyFrom(seconds(args.latency_budget))
    if args.mode is not None:
        request.mode = MODES[args.mode]
    return request


def update_request(args: argparse.Namespace) -> pb.UpdateSessionRequest:
    if args.width < 0 or args.height < 0:
        raise UsageError("--width/--height: must not be negative")
    return pb.UpdateSessionRequest(
        session_id=args.session_id,
        prompts=parse_prompts(args.prompts),
        width=args.width,
        height=args.height,
        pause=args.pause or pb.PAUSE_ACTION_UNSPECIFIED,
    )


# -- connection ------------------------------------------------------------------------------------


def connect(args: argparse.Namespace) -> grpc.Channel:
    if args.ca_cert or args.tls:
        roots = None
        if args.ca_cert:
            try:
                with open(args.ca_cert, "rb") as file:
                    roots = file.read()
            except OSError as error:
                raise UsageError(f"--ca-cert: {error}") from None
        return grpc.secure_channel(args.server, grpc.ssl_channel_credentials(root_certificates=roots))
    return grpc.insecure_channel(args.server)


def metadata(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The token, and the session the call names (none for `list` or `start` without --id)."""
    pairs = [("authorization", f"Bearer {args.token}")] if args.token else []
    # An id that is not printable ASCII cannot be a header value, nor a session id: sent without
    # the header, it reaches some replica, which says what is wrong with it.
    if args.session_id and args.session_id.isascii() and args.session_id.isprintable():
        pairs.append((SESSION_HEADER, args.session_id))
    return pairs


# -- errors ----------------------------------------------------------------------------------------


def error_details(error: grpc.RpcError) -> list[Message]:
    """The google.rpc details of an error (from its grpc-status-details-bin trailer), unpacked."""
    status = rpc_status.from_call(error) if isinstance(error, grpc.Call) else None
    unpacked: list[Message] = []
    for detail in status.details if status is not None else ():
        for kind in DETAIL_TYPES:
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                unpacked.append(message)
    return unpacked


def error_reason(error: grpc.RpcError) -> str:
    """The reason from the error's google.rpc.ErrorInfo ("" without one)."""
    infos = [d for d in error_details(error) if isinstance(d, error_details_pb2.ErrorInfo)]
    return infos[0].reason if infos else ""


def report_error(error: grpc.RpcError, stream: TextIO) -> None:
    """`error: CODE: message [REASON]` (the reason from google.rpc.ErrorInfo), then the field
    violations (BadRequest), failed preconditions (PreconditionFailure) and retry hint
    (RetryInfo), one a line."""
    code = error.code() if isinstance(error, grpc.Call) else None
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    name = code.name if code is not None else "UNKNOWN"
    lines: list[str] = []
    reason = ""
    for detail in error_details(error):
        if isinstance(detail, error_details_pb2.ErrorInfo):
            reason = f" [{detail.reason}]"
        elif isinstance(detail, error_details_pb2.BadRequest):
            lines += [f"  {v.field}: {v.description}" for v in detail.field_violations]
        elif isinstance(detail, error_details_pb2.PreconditionFailure):
            lines += [f"  {v.type} {v.subject}: {v.description}" for v in detail.violations]
        elif isinstance(detail, error_details_pb2.RetryInfo):
            lines.append(f"  retry in {detail.retry_delay.ToNanoseconds() / 1e9:g} s")
    print(f"error: {name}: {details}{reason}", file=stream)
    for line in lines:
        print(line, file=stream)


# -- output ----------------------------------------------------------------------------------------


def to_json(message: Message) -> str:
    return json_format.MessageToJson(message, indent=2)


def state_name(state: int) -> str:
    return pb.SessionState.Name(state).removeprefix("SESSION_STATE_")


def millis(duration: Duration) -> str:
    return f"{duration.ToNanoseconds() / 1e6:.0f}ms"


def age(session: pb.Session, now: float) -> str:
    if not session.HasField("created_time"):
        return "-"
    total = max(0, int(now - session.created_time.ToNanoseconds() / 1e9))
    hours, rest = divmod(total, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def format_table(rows: Sequence[Sequence[str]], numeric: bool = False) -> str:
    """Columns padded to their widest cell; with `numeric`, all but the first aligned right."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.rjust(width) if numeric and column else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def sessions_table(sessions: Iterable[pb.Session]) -> str:
    now = time.time()
    rows = [["ID", "STATE", "AGE", "SIZE", "FPS IN/OUT", "P50", "FRAMES OUT", "REASON"]]
    for session in sessions:
        stats, config = session.stats, session.config
        rows.append(
            [
                session.session_id,
                state_name(session.state),
                age(session, now),
                f"{config.width or 512}x{config.height or 512}",
                f"{stats.decoded_fps:.1f}/{stats.published_fps:.1f}",
                millis(stats.latency.p50),
                str(stats.frames_published),
                session.reason or "-",
            ]
        )
    return format_table(rows)


def show(args: argparse.Namespace, response: Message) -> None:
    if args.output == "json" and isinstance(response, pb.ListSessionsResponse):
        # As MessageToJson, but an empty listing says so rather than printing {}.
        print(json.dumps({"sessions": [json_format.MessageToDict(s) for s in response.sessions]}, indent=2))
        return
    if args.output == "json":
        print(to_json(response))
        return
    if isinstance(response, pb.ListSessionsResponse):
        print(sessions_table(response.sessions))
        return
    print(sessions_table([response.session]))  # type: ignore[attr-defined]  # every other response
    if isinstance(response, pb.UpdateSessionResponse):
        for reply in response.replies:
            print("reply: " + json.dumps(json_format.MessageToDict(reply), sort_keys=True))


# -- watch -----------------------------------------------------------------------------------------


def queue_size(depth: int, unit: str) -> str:
    if unit != "bytes":
        return str(depth)
    for suffix, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if depth >= scale:
            return f"{depth / scale:.1f}{suffix}"
    return f"{depth}B"


def watch_line(session: pb.Session) -> str:
    """One update as a single line, for logs and pipes."""
    stats = session.stats
    latency = stats.latency
    queues = " ".join(
        f"{q.name}={queue_size(q.depth, q.unit)}/{queue_size(q.capacity, q.unit)}" for q in stats.queues
    )
    drops = " ".join(f"{name}={count}" for name, count in sorted(stats.drops.items()) if count) or "none"
    parts = [
        datetime.now(UTC).strftime("%H:%M:%S"),
        session.session_id,
        state_name(session.state),
        f"fps dec={stats.decoded_fps:.1f} sent={stats.sent_fps:.1f} "
        f"ret={stats.returned_fps:.1f} enc={stats.encoded_fps:.1f} pub={stats.published_fps:.1f}",
        f"latency p50={millis(latency.p50)} p95={millis(latency.p95)} p99={millis(latency.p99)}",
        f"frames dec={stats.frames_decoded} sent={stats.frames_sent} "
        f"ret={stats.frames_returned} enc={stats.frames_encoded} pub={stats.frames_published}",
        f"queues {queues or 'none'}",
        f"drops {drops}",
        f"reconnects={stats.reconnects}",
    ]
    if session.reason:
        parts.append(f"reason={session.reason!r}")
    return " | ".join(parts)


def watch_block(session: pb.Session, server: str) -> str:
    """One update as a small screen, for a terminal."""
    stats = session.stats
    latency = stats.latency
    lines = [
        f"session {session.session_id} on {server}   {datetime.now(UTC):%H:%M:%S} UTC",
        f"state   {state_name(session.state)}" + (f"  ({session.reason})" if session.reason else ""),
        f"webrtc  {stats.webrtc_state or '-'}   reconnects {stats.reconnects}"
        f"   fast path {stats.fast_path or '-'}",
        f"latency p50 {millis(latency.p50)}   p95 {millis(latency.p95)}   p99 {millis(latency.p99)}",
        f"paths   in {stats.send_path or '-'} ({stats.send_path_reason or '-'})"
        f"   out {stats.output_path or '-'} ({stats.output_path_reason or '-'})",
        "",
    ]
    fps = (stats.decoded_fps, stats.sent_fps, stats.returned_fps, stats.encoded_fps, stats.published_fps)
    frames = (
        stats.frames_decoded,
        stats.frames_sent,
        stats.frames_returned,
        stats.frames_encoded,
        stats.frames_published,
    )
    stages = [
        ["", "DECODED", "SENT", "RETURNED", "ENCODED", "PUBLISHED"],
        ["fps", *(f"{value:.1f}" for value in fps)],
        ["frames", *(str(value) for value in frames)],
    ]
    lines += [format_table(stages, numeric=True), ""]
    queues = [["QUEUE", "DEPTH", "CAPACITY"]] + [
        [q.name, queue_size(q.depth, q.unit), queue_size(q.capacity, q.unit)] for q in stats.queues
    ]
    lines.append(format_table(queues, numeric=True))
    drops = ", ".join(f"{name} {count}" for name, count in sorted(stats.drops.items()) if count)
    lines += ["", f"drops   {drops or 'none'}"]
    return "\n".join(lines)


def watch(stub: pb_grpc.RelayServiceStub, args: argparse.Namespace) -> int:
    request = pb.WatchSessionRequest(session_id=args.session_id)
    if args.interval is not None:
        request.interval.CopyFrom(seconds(args.interval))
    terminal = sys.stdout.isatty()
    drawn = 0  # lines of the last block, to move back over
    stream = stub.WatchSession(request, metadata=metadata(args))
    try:
        for count, response in enumerate(stream, start=1):
            if terminal:
                block = watch_block(response.session, args.server)
                # Back to the first line of the previous block, clear to the end of the screen, redraw.
                prefix = f"\x1b[{drawn}F\x1b[J" if drawn else ""
                sys.stdout.write(prefix + block + "\n")
                drawn = block.count("\n") + 1
            else:
                sys.stdout.write(watch_line(response.session) + "\n")
            sys.stdout.flush()
            if args.count is not None and count >= args.count:
                break
    finally:
        stream.cancel()
    return 0


# -- start -----------------------------------------------------------------------------------------


def start(stub: pb_grpc.RelayServiceStub, args: argparse.Namespace, options: dict[str, Any]) -> Message:
    """StartSession. Without a session id the proxy sends each call to the next replica, so a
    refusal that created nothing (full, draining) is tried again at once, up to --attempts calls.
    With an id the proxy would send the retry to the same replica: one call."""
    if args.attempts < 1:
        raise UsageError("--attempts: must be at least 1")
    request = start_request(args)
    retries = 0 if request.session_id else args.attempts - 1
    for _ in range(retries):
        try:
            return stub.StartSession(request, **options)
        except grpc.RpcError as error:
            if error_reason(error) not in RETRIED_REASONS:  # it may have created the session
                raise
    return stub.StartSession(request, **options)


# -- list ------------------------------------------------------------------------------------------


def list_sessions(stub: pb_grpc.RelayServiceStub, options: dict[str, Any]) -> pb.ListSessionsResponse:
    """Every session, page after page (each page is one ListSessions call under the deadline)."""
    listing = pb.ListSessionsResponse()
    token = ""
    while True:
        page = stub.ListSessions(pb.ListSessionsRequest(page_token=token), **options)
        listing.sessions.extend(page.sessions)
        token = page.next_page_token
        if not token:
            return listing


# -- main ------------------------------------------------------------------------------------------


def defaults(args: argparse.Namespace) -> argparse.Namespace:
    values = {
        "server": os.environ.get("RELAY_ADDRESS") or DEFAULT_SERVER,
        "token": os.environ.get("RELAY_AUTH_TOKEN") or None,
        "tls": False,
        "ca_cert": None,
        "timeout": DEFAULT_TIMEOUT,
        "output": "json",
        "prompts": None,
        "pause": None,
        "interval": None,
        "count": None,
        "session_id": "",  # `list` names none
    }
    for name, value in values.items():
        if not hasattr(args, name):
            setattr(args, name, value)
    return args


def run(args: argparse.Namespace) -> int:
    with connect(args) as channel:
        stub = pb_grpc.RelayServiceStub(channel)
        if args.command == "watch":
            return watch(stub, args)
        options: dict[str, Any] = {"metadata": metadata(args), "timeout": args.timeout}
        calls: dict[str, Callable[[], Message]] = {
            "start": lambda: start(stub, args, options),
            "stop": lambda: stub.StopSession(pb.StopSessionRequest(session_id=args.session_id), **options),
            "get": lambda: stub.GetSession(pb.GetSessionRequest(session_id=args.session_id), **options),
            "list": lambda: list_sessions(stub, options),
            "update": lambda: stub.UpdateSession(update_request(args), **options),
        }
        show(args, calls[args.command]())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = defaults(parser.parse_args(argv))
    try:
        return run(args)
    except UsageError as error:
        parser.error(str(error))  # exits 2
    except grpc.RpcError as error:
        report_error(error, sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `relayctl watch ID | head`: quiet, and no second error flushing at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
