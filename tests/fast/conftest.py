"""Every test here runs once per build of relay_server._fast: the compiled one and the plain one."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from relay_server._fast import implementations


@pytest.fixture(params=["cython", "python"])
def impl(request: pytest.FixtureRequest) -> SimpleNamespace:
    available = implementations()
    if request.param not in available:
        if os.environ.get("RELAY_NO_EXTENSIONS", "") not in ("", "0"):
            pytest.skip("RELAY_NO_EXTENSIONS is set")
        pytest.fail("the compiled relay_server._fast is not built: run `pip install -e .`")
    return available[request.param]
