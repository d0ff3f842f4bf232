"""Bounds on what a RelayService request may carry, checked before anything else reads it.

The relay keeps what a session is started with for as long as it keeps the session and sends it
back in every snapshot, so nothing a request holds is unbounded. The bounds are far beyond what a
real caller needs: a few ComfyUI workflows are tens of kilobytes. What a field means (a URL's
syntax, an id's characters) is checked by session.config.
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.struct_pb2 import Struct

from relay_server.errors import ConfigError, FieldViolation
from relay_server.session.config import SESSION_ID

MAX_PROMPTS = 16  # workflows in one request
MAX_PROMPT_BYTES = 1 << 20  # the workflows of one request together, as encoded on the wire


def prompt_violations(prompts: Sequence[Struct]) -> list[FieldViolation]:
    if len(prompts) > MAX_PROMPTS:
        return [FieldViolation("prompts", f"{len(prompts)} workflows, at most {MAX_PROMPTS}")]
    size = sum(prompt.ByteSize() for prompt in prompts)
    if size > MAX_PROMPT_BYTES:
        return [FieldViolation("prompts", f"{size} bytes encoded, at most {MAX_PROMPT_BYTES} in all")]
    return []


def check_session_id(session_id: str) -> None:
    """ConfigError unless `session_id` could name a session (so no error message echoes more)."""
    if not SESSION_ID.fullmatch(session_id):
        raise ConfigError([FieldViolation("session_id", "use 1-128 letters, digits, '.', '_' or '-'")])


def check_prompts(prompts: Sequence[Struct]) -> None:
    problems = prompt_violations(prompts)
    if problems:
        raise ConfigError(problems)
