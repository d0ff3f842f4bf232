"""The Node.js client (clients/node/client.js) against a real relay: any language with gRPC
and the proto file can drive the relay, no generated code needed."""

from __future__ import annotations

import json
from pathlib import Path

from relay_server.trickle.server import TrickleServer
from tests.clients.harness import (
    SESSION_HEADER,
    Relay,
    refused_starts,
    relay_server,
    self_signed,
    start_bulky_sessions,
)

INVERT = {"1": {"class_type": "Invert", "inputs": {"strength": 0.5, "on": True, "tags": ["a", None]}}}


async def test_start_watch_stop(live_relay: Relay, node_client: Path) -> None:
    relay = live_relay
    started = await relay.node(
        "start",
        "--id", "node-1",
        "--subscribe-url", relay.input_url(),
        "--publish-url", relay.output_url("node-1"),
        "--processor-url", relay.processor_url,
        "--prompts", json.dumps(INVERT),
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    session = json.loads(started.stdout)
    assert session["session_id"] == "node-1"
    assert session["state"] in ("SESSION_STATE_STARTING", "SESSION_STATE_RUNNING")
    assert session["config"]["prompts"] == [INVERT]  # Struct there and back, every JSON kind
    assert session["config"]["subscribe_url"] == relay.input_url()

    watched = await relay.node("watch", "node-1", "--count", "2", "--interval", "0.1")
    assert watched.returncode == 0, watched.stderr
    snapshots = [json.loads(line) for line in watched.stdout.splitlines()]
    assert len(snapshots) == 2
    for snapshot in snapshots:
        assert snapshot["session_id"] == "node-1"
        assert snapshot["state"] in ("SESSION_STATE_STARTING", "SESSION_STATE_RUNNING")
        assert {q["name"] for q in snapshot["stats"]["queues"]} >= {"decoded_frames", "processor_in_flight"}
    assert snapshots[0]["created_time"].endswith("Z")

    listed = await relay.node("list")
    assert [s["session_id"] for s in json.loads(listed.stdout)["sessions"]] == ["node-1"]

    stopped = await relay.node("stop", "node-1")
    assert stopped.returncode == 0, stopped.stderr
    assert json.loads(stopped.stdout)["state"] == "SESSION_STATE_STOPPED"

    got = await relay.node("get", "node-1")
    assert json.loads(got.stdout)["reason"] == "stopped by request"


async def test_errors(bare_relay: Relay, node_client: Path) -> None:
    missing = await bare_relay.node("get", "nope")
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: NOT_FOUND: ")

    invalid = await bare_relay.node("start", "--id", "bad id")
    assert invalid.returncode == 1
    assert invalid.stderr.startswith("error: INVALID_ARGUMENT: ")
    assert "subscribe_url: required" in invalid.stderr

    usage = await bare_relay.node("watch")
    assert usage.returncode == 2
    assert "watch takes one session id" in usage.stderr


async def test_tls(trickle_server: TrickleServer, node_client: Path, tmp_path: Path) -> None:
    credentials, ca = self_signed(tmp_path)
    async with relay_server(trickle_server, credentials=credentials) as relay:
        listed = await relay.node("list", "--ca-cert", str(ca))
        # Node warns (DEP0123) about TLS to an IP address, as 127.0.0.1 is, and goes on.
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout) == {"sessions": []}


async def test_list_follows_the_pages(bare_relay: Relay, node_client: Path) -> None:
    # Five sessions of about 1 MiB each: ListSessions returns them a few per page.
    ids = await start_bulky_sessions(bare_relay, 5)
    listed = await bare_relay.node("list")
    assert listed.returncode == 0, listed.stderr
    assert [s["session_id"] for s in json.loads(listed.stdout)["sessions"]] == ids


async def test_start_takes_every_field(bare_relay: Relay, node_client: Path) -> None:
    relay = bare_relay
    base = relay.input_url().rsplit("/", 1)[0]
    started = await relay.node(
        "start",
        "--id", "node-all",
        "--subscribe-url", relay.input_url(),
        "--publish-url", relay.output_url("node-all"),
        "--processor-url", "http://127.0.0.1:9/processor",
        "--control-url", f"{base}/control",
        "--events-url", f"{base}/events",
        "--data-url", f"{base}/data",
        "--gateway-request-id", "req-1",
        "--prompts", json.dumps(INVERT),
        "--width", "640", "--height", "360",
        "--max-fps", "15",
        "--preset", "veryfast", "--bitrate", "1500000", "--gop", "1.5",
        "--scale-mode", "crop", "--fill", "hold", "--mode", "transcode",
        "--allow-shared-processor",
        "--offer-timeout", "20", "--latency-budget", "0.25",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    config = json.loads(started.stdout)["config"]
    assert {name: config[name] for name in ("control_url", "events_url", "data_url")} == {
        "control_url": f"{base}/control",
        "events_url": f"{base}/events",
        "data_url": f"{base}/data",
    }
    assert config["gateway_request_id"] == "req-1"
    assert (config["width"], config["height"], config["max_fps"]) == (640, 360, 15)
    assert config["encoder"] == {"preset": "veryfast", "bitrate": 1500000, "gop": 1.5}
    assert (config["scale_mode"], config["output_fill"], config["mode"]) == (
        "SCALE_MODE_CROP",
        "OUTPUT_FILL_HOLD",
        "SESSION_MODE_TRANSCODE",
    )
    assert config["allow_shared_processor"] is True
    assert (config["offer_timeout"], config["latency_budget"]) == (20, 0.25)
    assert config["prompts"] == [INVERT]
    stopped = await relay.node("stop", "node-all")
    assert stopped.returncode == 0, stopped.stderr

    bad = await relay.node("start", "--mode", "fast")
    assert bad.returncode == 2 and "--mode: one of auto, transcode, passthrough" in bad.stderr


async def test_calls_naming_a_session_carry_its_id(bare_relay: Relay, node_client: Path) -> None:
    # The proxy in front of the replicas routes by the header; `list` and a start that lets the
    # relay name the session may go to any replica.
    relay = bare_relay
    for args, header in [
        (["start", "--id", "routed", *relay.waiting_session("routed")], "routed"),
        (["get", "routed"], "routed"),
        (["watch", "routed", "--count", "1"], "routed"),
        (["stop", "routed"], "routed"),
        (["start", *relay.waiting_session("unnamed")], None),
        (["list"], None),
    ]:
        result, calls = await relay.calls_during(relay.node(*args))
        assert result.returncode == 0, (args, result.stderr)
        assert [call.metadata.get(SESSION_HEADER) for call in calls] == [header], args


async def test_start_without_id_tries_again_when_refused(
    trickle_server: TrickleServer, node_client: Path
) -> None:
    async with relay_server(trickle_server, max_sessions=1) as relay:
        await refused_starts(relay, relay.node)
        unusable = await relay.node("start", "--attempts", "0")
        assert unusable.returncode == 2 and "--attempts: expected a whole number >= 1" in unusable.stderr
