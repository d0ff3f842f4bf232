"""Which build relay_server._fast exports, and RELAY_NO_EXTENSIONS."""

from __future__ import annotations

import os
import subprocess
import sys

import relay_server._fast as fast


def test_exports_the_active_build() -> None:
    active = fast.implementations()[fast.IMPLEMENTATION]
    assert (fast.ChunkQueue, fast.copy_frame) == (active.ChunkQueue, active.copy_frame)
    assert fast.QueueAborted is active.QueueAborted  # one class: catching it works with either build
    expected = "python" if os.environ.get("RELAY_NO_EXTENSIONS", "") not in ("", "0") else "cython"
    assert expected == fast.IMPLEMENTATION


def test_no_extensions_forces_the_plain_build() -> None:
    code = "import relay_server._fast as f; print(f.IMPLEMENTATION, sorted(f.implementations()))"
    env = {**os.environ, "RELAY_NO_EXTENSIONS": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["python", "['python']"]
    assert result.stderr == ""  # a deliberate choice, so no warning
