from __future__ import annotations

import asyncio

import pytest

from relay_server import eventloop, settings
from relay_server.trickle import protocol


def test_defaults_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TRICKLE_CHUNK_SIZE", "TRICKLE_BUFFER_SIZE", "TRICKLE_TIMEOUT", "TRICKLE_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    assert (settings.chunk_size(), settings.request_timeout(), settings.workers()) == (65536, 20.0, 2)
    monkeypatch.setenv("TRICKLE_CHUNK_SIZE", "262144")
    monkeypatch.setenv("TRICKLE_TIMEOUT", "2.5")
    assert (settings.chunk_size(), settings.request_timeout()) == (262144, 2.5)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("TRICKLE_CHUNK_SIZE", "big", "must be an integer"),
        ("TRICKLE_CHUNK_SIZE", "10", "at least 1024"),
        ("TRICKLE_TIMEOUT", "nan", "at least"),
        ("TRICKLE_WORKERS", "0", "at least 1"),
    ],
)
def test_bad_values_say_what_is_wrong(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    getter = {
        "TRICKLE_CHUNK_SIZE": settings.chunk_size,
        "TRICKLE_TIMEOUT": settings.request_timeout,
        "TRICKLE_WORKERS": settings.workers,
    }[name]
    with pytest.raises(ValueError, match=f"{name}.*{message}"):
        getter()


@pytest.mark.parametrize(
    ("text", "seq"),
    [("0", 0), ("41", 41), ("-1", -1), ("-2", -2), ("-3", None), ("x", None), (" 1", None), ("", None)],
)
def test_parse_seq(text: str, seq: int | None) -> None:
    assert protocol.parse_seq(text) == seq


def test_the_event_loop_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELAY_EVENT_LOOP", raising=False)
    assert settings.event_loop() == "uvloop"
    monkeypatch.setenv("RELAY_EVENT_LOOP", " AsyncIO ")
    assert settings.event_loop() == "asyncio"
    monkeypatch.setenv("RELAY_EVENT_LOOP", "trio")
    with pytest.raises(ValueError, match="RELAY_EVENT_LOOP must be one of uvloop, asyncio, got 'trio'"):
        settings.event_loop()


@pytest.mark.parametrize("choice", ["uvloop", "asyncio"])
def test_commands_run_on_the_configured_loop(monkeypatch: pytest.MonkeyPatch, choice: str) -> None:
    async def kind() -> str:
        return type(asyncio.get_running_loop()).__module__

    monkeypatch.setenv("RELAY_EVENT_LOOP", choice)
    assert eventloop.run(kind()).split(".")[0] == choice
