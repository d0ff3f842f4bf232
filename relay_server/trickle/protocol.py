"""Wire-level names and numbers of the trickle protocol, shared by client and server."""

from __future__ import annotations

import re

# Response headers.
SEQ = "Lp-Trickle-Seq"
LATEST = "Lp-Trickle-Latest"
CLOSED = "Lp-Trickle-Closed"
CLOSED_VALUE = "terminated"
# Request headers.
RESET = "Lp-Trickle-Reset"
EXPECT_CONTENT = "Expect-Content"

# Non-standard status: the channel exists but the requested seq is outside the live window.
STATUS_NOT_IN_RING = 470

# Special seqs: -1 is the next segment that has not started, -2 the one in progress.
SEQ_NEXT = -1
SEQ_IN_PROGRESS = -2

# Segments held per channel, counting in-progress and pre-created ones.
RING_SLOTS = 5

_SEQ_PATTERN = re.compile(r"-?[0-9]{1,18}")


def parse_seq(text: str) -> int | None:
    """The seq in a URL path or header, or None when it is not a valid one (integer >= -2)."""
    if not _SEQ_PATTERN.fullmatch(text):
        return None
    seq = int(text)
    return seq if seq >= SEQ_IN_PROGRESS else None


def channel_url(base: str, channel: str) -> str:
    """The URL of a channel under a server base URL (trailing slashes tolerated)."""
    return f"{base.rstrip('/')}/{channel}"
