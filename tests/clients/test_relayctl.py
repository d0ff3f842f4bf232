"""relayctl (clients/python/relayctl.py) against a real relay, run as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import re
import sys
from pathlib import Path

from relay_server.trickle.server import TrickleServer
from tests.clients.harness import (
    CLIENT_TIMEOUT,
    RELAYCTL,
    SESSION_HEADER,
    Relay,
    client_env,
    refused_starts,
    relay_server,
    run,
    self_signed,
    start_bulky_sessions,
)

INVERT = {"1": {"class_type": "Invert", "inputs": {}}}
GRAYSCALE = {"1": {"class_type": "Grayscale", "inputs": {}}}
FPS = re.compile(r"fps dec=(?P<decoded>[\d.]+) sent=[\d.]+ ret=[\d.]+ enc=(?P<encoded>[\d.]+)")


def flowing(line: str) -> bool:
    """A watch line showing the session running with frames coming out."""
    match = FPS.search(line)
    return " RUNNING " in line and match is not None and float(match["encoded"]) > 0


async def test_session_lifecycle(live_relay: Relay, tmp_path: Path) -> None:
    relay = live_relay
    started = await relay.relayctl(
        "start",
        "--id", "ctl-1",
        "--subscribe-url", relay.input_url(),
        "--publish-url", relay.output_url("ctl-1"),
        "--processor-url", relay.processor_url,
        "--prompts", json.dumps(INVERT),
        "--width", "256", "--height", "256",
        "--gop", "1", "--scale-mode", "crop", "--fill", "hold", "--offer-timeout", "20",
        "--mode", "transcode",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    session = json.loads(started.stdout)["session"]
    assert session["sessionId"] == "ctl-1"
    assert session["state"] in ("SESSION_STATE_STARTING", "SESSION_STATE_RUNNING")
    config = session["config"]
    assert config["prompts"] == [INVERT]
    assert (config["width"], config["height"]) == (256, 256)
    assert config["encoder"]["gop"] == "1s"
    assert config["scaleMode"] == "SCALE_MODE_CROP"
    assert config["outputFill"] == "OUTPUT_FILL_HOLD"
    assert config["offerTimeout"] == "20s"
    assert config["mode"] == "SESSION_MODE_TRANSCODE"

    got = await relay.relayctl("get", "ctl-1")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["session"]["config"]["subscribeUrl"] == relay.input_url()

    listed = await relay.relayctl("list")
    assert [s["sessionId"] for s in json.loads(listed.stdout)["sessions"]] == ["ctl-1"]
    table = await relay.relayctl("list", "--output", "table")
    header, row = table.stdout.splitlines()
    assert header.split()[:2] == ["ID", "STATE"]
    assert row.split()[:2] == ["ctl-1", "RUNNING"] or row.split()[:2] == ["ctl-1", "STARTING"]

    # Not a terminal: one line per update, until the session ends.
    watch = await relay.relayctl_streaming("watch", "ctl-1", "--interval", "0.2")
    try:
        line = await watch.until(flowing)
        parts = ("ctl-1", "latency p50=", "p95=", "p99=", "frames dec=", "queues ", "drops ", "reconnects=0")
        for part in parts:
            assert part in line, line
        assert re.search(r"decoded_frames=\d+/32\b", line), line

        await check_terminal_watch(relay, "ctl-1")

        workflow = tmp_path / "grayscale.json"
        workflow.write_text(json.dumps([GRAYSCALE]))
        updated = await relay.relayctl("update", "ctl-1", "--prompts", f"@{workflow}")
        assert updated.returncode == 0, updated.stderr
        reply = json.loads(updated.stdout)
        assert reply["replies"] == [{"type": "prompts_updated", "success": True}]
        assert reply["session"]["config"]["prompts"] == [GRAYSCALE]

        paused = await relay.relayctl("update", "ctl-1", "--pause", "--output", "table")
        assert paused.returncode == 0, paused.stderr
        assert paused.stdout.splitlines()[1].startswith("ctl-1")
        assert paused.stdout.splitlines()[-1] == 'reply: {"success": true, "type": "prompts_paused"}'

        stopped = await relay.relayctl("stop", "ctl-1")
        assert stopped.returncode == 0, stopped.stderr
        session = json.loads(stopped.stdout)["session"]
        assert session["state"] == "SESSION_STATE_STOPPED"
        assert session["reason"] == "stopped by request"
        assert int(session["stats"]["framesEncoded"]) > 0

        # The watch ends by itself with the session's final snapshot.
        finished = await watch.finish()
        assert finished.returncode == 0, finished.stderr
        assert " STOPPED " in finished.stdout.splitlines()[-1]
    finally:
        await watch.close()


async def check_terminal_watch(relay: Relay, session_id: str) -> None:
    """On a terminal, watch draws a table and redraws it in place (cursor up, clear, redraw)."""
    master, slave = pty.openpty()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, RELAYCTL, "--server", relay.address,
            "watch", session_id, "--interval", "0.1", "--count", "2",
            stdin=asyncio.subprocess.DEVNULL, stdout=slave, stderr=asyncio.subprocess.PIPE, env=client_env(),
        )  # fmt: skip
        os.close(slave)
        slave = -1
        async with asyncio.timeout(CLIENT_TIMEOUT):
            _, stderr = await process.communicate()
        assert process.returncode == 0, stderr.decode()
        output = read_available(master).replace("\r\n", "\n")
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    first, redraw = output.split("\x1b[", 1)
    assert re.match(r"\d+F\x1b\[J", redraw), redraw[:20]  # back to the block's first line, clear below
    for block in (first, redraw):
        assert f"session {session_id} on {relay.address}" in block
        assert "state   RUNNING" in block
        assert re.search(r"^fps(\s+[\d.]+){5}$", block, re.M), block  # decoded ... published
        assert re.search(r"^processor_in_flight\s+\d+\s+4$", block, re.M), block
        assert "latency p50 " in block and "reconnects 0" in block


def read_available(fd: int) -> str:
    """All the output a pty holds once its writer has exited."""
    os.set_blocking(fd, False)
    chunks = []
    with contextlib.suppress(BlockingIOError, OSError):  # EIO: every writer has closed
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


async def test_errors_print_code_and_field_violations(bare_relay: Relay) -> None:
    relay = bare_relay
    bad = await relay.relayctl(
        "start", "--id", "bad id", "--subscribe-url", "ftp://example", "--publish-url", relay.output_url("x")
    )
    assert bad.returncode == 1
    assert bad.stdout == ""
    lines = bad.stderr.splitlines()
    assert lines[0].startswith("error: INVALID_ARGUMENT: ")
    assert "  session_id: use 1-128 letters, digits, '.', '_' or '-'" in lines
    assert "  subscribe_url: must be an http(s) URL with a host, got 'ftp://example'" in lines
    assert "  processor_url: required" in lines

    missing = await relay.relayctl("get", "nope")
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: NOT_FOUND: ")

    watch_missing = await relay.relayctl("watch", "nope")
    assert (watch_missing.returncode, watch_missing.stderr[:17]) == (1, "error: NOT_FOUND:")

    nothing = await relay.relayctl("update", "nope")
    assert nothing.returncode == 1
    assert nothing.stderr.splitlines()[1:] == ["  prompts: empty, and no other field set either"]

    assert json.loads((await relay.relayctl("list")).stdout) == {"sessions": []}
    empty = await relay.relayctl("list", "--output", "table")
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout.split()[:4] == ["ID", "STATE", "AGE", "SIZE"]
    assert len(empty.stdout.splitlines()) == 1  # the header alone


async def test_usage_errors_exit_2(bare_relay: Relay) -> None:
    for args, message in [
        (["update", "x", "--prompts", "[1]"], "--prompts: workflow 0 is not a JSON object"),
        (["update", "x", "--prompts", "{nope"], "--prompts: not JSON"),
        (["update", "x", "--prompts", "@/nonexistent/workflow.json"], "No such file"),
        (["start", "--scale-mode", "stretch"], "invalid choice: 'stretch'"),
        (["update", "x", "--pause", "--resume"], "not allowed with argument"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ]:
        result = await bare_relay.relayctl(*args)
        assert result.returncode == 2, (args, result)
        assert message in result.stderr, (args, result.stderr)


async def test_token_and_address_from_the_environment(trickle_server: TrickleServer) -> None:
    async with relay_server(trickle_server) as relay:
        env = client_env(RELAY_ADDRESS=relay.address, RELAY_AUTH_TOKEN="from-env")
        result = await relay.relayctl("list", env=env)  # --server given too: the flag wins
        assert result.returncode == 0, result.stderr
        by_env = await run([sys.executable, RELAYCTL, "list", "--output", "table"], env=env)
        assert by_env.returncode == 0, by_env.stderr
        flag = await relay.relayctl("--token", "from-flag", "list", env=env)
        assert flag.returncode == 0, flag.stderr
        no_token = await relay.relayctl("list")
        assert no_token.returncode == 0, no_token.stderr
    tokens = [call.metadata.get("authorization") for call in relay.calls]
    assert tokens == ["Bearer from-env", "Bearer from-env", "Bearer from-flag", None]


async def test_tls(trickle_server: TrickleServer, tmp_path: Path) -> None:
    credentials, ca = self_signed(tmp_path)
    async with relay_server(trickle_server, credentials=credentials) as relay:
        verified = await relay.relayctl("--ca-cert", str(ca), "list")
        assert (verified.returncode, verified.stderr) == (0, "")
        plaintext = await relay.relayctl("list", "--timeout", "2")
        assert plaintext.returncode == 1
        assert plaintext.stderr.startswith("error: UNAVAILABLE: ")


async def test_list_follows_the_pages(bare_relay: Relay) -> None:
    # Five sessions of about 1 MiB each: ListSessions returns them a few per page.
    ids = await start_bulky_sessions(bare_relay, 5)
    listed = await bare_relay.relayctl("list")
    assert listed.returncode == 0, listed.stderr
    assert [s["sessionId"] for s in json.loads(listed.stdout)["sessions"]] == ids
    table = await bare_relay.relayctl("list", "--output", "table")
    assert [line.split()[0] for line in table.stdout.splitlines()[1:]] == ids


async def test_errors_print_their_reason_and_details(bare_relay: Relay) -> None:
    (first,) = await start_bulky_sessions(bare_relay, 1)
    got = await bare_relay.relayctl("get", "nope")
    assert got.stderr.splitlines() == ["error: NOT_FOUND: no session 'nope' [SESSION_NOT_FOUND]"]
    processor = json.loads((await bare_relay.relayctl("get", first)).stdout)["session"]["config"][
        "processorUrl"
    ]
    busy = await bare_relay.relayctl(
        "start",
        "--subscribe-url", bare_relay.input_url(),
        "--publish-url", bare_relay.output_url("second"),
        "--processor-url", processor,
    )  # fmt: skip
    assert busy.returncode == 1
    lines = busy.stderr.splitlines()
    assert lines[0].startswith("error: FAILED_PRECONDITION: ") and lines[0].endswith(" [PROCESSOR_IN_USE]")
    assert lines[1:] == [
        f"  PROCESSOR_FREE {processor}: in use by session '{first}', which does not share it"
    ]


async def test_calls_naming_a_session_carry_its_id(bare_relay: Relay) -> None:
    # The proxy in front of the replicas routes by the header; `list` and a start that lets the
    # relay name the session may go to any replica.
    relay = bare_relay
    for args, header, error in [
        (["start", "--id", "routed", *relay.waiting_session("routed")], "routed", ""),
        (["get", "routed"], "routed", ""),
        # A session waiting for its input has no processor to ask yet, and the relay says so.
        (["update", "routed", "--pause"], "routed", "PROCESSOR_UNAVAILABLE"),
        (["watch", "routed", "--count", "1"], "routed", ""),
        (["stop", "routed"], "routed", ""),
        (["start", *relay.waiting_session("unnamed")], None, ""),
        (["list"], None, ""),
    ]:
        result, calls = await relay.calls_during(relay.relayctl(*args))
        assert [call.metadata.get(SESSION_HEADER) for call in calls] == [header], args
        if error:
            assert result.returncode == 1 and result.stderr.splitlines()[0].endswith(f" [{error}]"), result
        else:
            assert result.returncode == 0, (args, result.stderr)


async def test_start_without_id_tries_again_when_refused(trickle_server: TrickleServer) -> None:
    async with relay_server(trickle_server, max_sessions=1) as relay:
        refusals = await refused_starts(relay, relay.relayctl)
        for refused in refusals.full:
            first, *rest = refused.stderr.splitlines()
            assert first.endswith(" [SESSION_LIMIT_REACHED]"), first
            assert [line.split()[:2] for line in rest] == [["retry", "in"]]
        assert " [DRAINING]" in refusals.draining.stderr.splitlines()[0]

        unusable = await relay.relayctl("start", "--attempts", "0")
        assert unusable.returncode == 2 and "--attempts: must be at least 1" in unusable.stderr
