"""Pages of a listing, as Google's API guidelines have them (AIP-158).

A page token is opaque to callers: it holds the position of the last session a page returned (its
start sequence number) and the epoch of the relay process that issued it, base64url-encoded. The
next page starts after that position, so sessions that start or end between two pages are neither
repeated nor skipped (ended ones that were forgotten meanwhile are simply gone). A page stops at
page_size sessions or before it would pass MAX_PAGE_BYTES, whichever comes first: with prompts
of up to bounds.MAX_PROMPT_BYTES a session is about 1 MiB, so a page never reaches gRPC's default
4 MB message limit.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Sequence
from typing import TypeVar

from google.protobuf.message import Message

from relay_server.errors import ConfigError, FieldViolation

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100  # a larger page_size is read as this
MAX_PAGE_BYTES = 3 << 20  # encoded sessions in one page at most (one larger session still goes alone)
MAX_TOKEN_LENGTH = 64
TOKEN = re.compile(r"(?P<epoch>[0-9a-f]{8}):(?P<position>[0-9]{1,18})")
# Each entry of a repeated message field costs its tag and a length prefix besides its bytes.
ENTRY_OVERHEAD = 1 + 5

M = TypeVar("M", bound=Message)


def page_size(requested: int) -> int:
    if requested < 0:
        raise ConfigError([FieldViolation("page_size", f"must not be negative, got {requested}")])
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_token(epoch: str, position: int) -> str:
    return base64.urlsafe_b64encode(f"{epoch}:{position}".encode()).decode().rstrip("=")


def decode_token(token: str, epoch: str, last_position: int) -> int:
    """The position a page token continues after (0 for the first page); ConfigError naming
    page_token for one this relay process did not issue."""
    if not token:
        return 0
    invalid = ConfigError(
        [FieldViolation("page_token", "not a page token of this relay: list from the start")]
    )
    if len(token) > MAX_TOKEN_LENGTH:
        raise invalid
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        raise invalid from None
    match = TOKEN.fullmatch(text)
    if match is None or match["epoch"] != epoch or int(match["position"]) > last_position:
        raise invalid
    return int(match["position"])


def take_page(entries: Sequence[tuple[int, Callable[[], M]]], size: int) -> tuple[list[M], int | None]:
    """The messages of one page from (position, make message) pairs in position order: up to
    `size` of them and MAX_PAGE_BYTES (at least one); and the position after which the next
    page starts, or None when this is the last page. Only the messages taken are made."""
    page: list[M] = []
    used = 0
    for index, (_, make) in enumerate(entries):
        if len(page) == size:
            return page, entries[index - 1][0]
        message = make()
        cost = message.ByteSize() + ENTRY_OVERHEAD
        if page and used + cost > MAX_PAGE_BYTES:
            return page, entries[index - 1][0]
        page.append(message)
        used += cost
    return page, None
