"""Every `trickle-relay` server, started on a port another socket holds: one line that says so, exit 1."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest


@pytest.fixture
def held_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        (["processor"], "--listen"),
        (["trickle-server"], "--listen"),
        (["serve", "--metrics-listen", "127.0.0.1:0"], "--listen"),  # the gRPC port
        (["serve", "--listen", "127.0.0.1:0"], "--metrics-listen"),
    ],
)
def test_a_busy_port_is_one_line_and_exit_1(held_port: int, command: list[str], flag: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "relay_server", *command, flag, f"127.0.0.1:{held_port}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "GRPC_VERBOSITY": "NONE"},  # gRPC's own log of the failed bind
    )
    expected = f"port {held_port} is in use: another process listens on 127.0.0.1:{held_port}"
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    problems = [line for line in done.stderr.splitlines() if "INFO" not in line]
    assert len(problems) == 1 and problems[0].endswith(expected), done.stderr
