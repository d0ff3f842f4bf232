"""Redirects: no outbound request of the relay follows one.

The allow-list (`--allow-hosts`) is checked against the URLs a session is started with; a server
on an allowed host answering 3xx would otherwise send the request, its body included, to any
host it names. Every request is made with `allow_redirects=False`, and a 3xx answer is an error
that says where it pointed. It is not retried: the relay will not follow it however often it is
asked.
"""

from __future__ import annotations

import aiohttp

# Longest Location quoted in an error: enough to recognise it, bounded whatever a server sends.
LOCATION_SHOWN = 300


def refusal(url: str, response: aiohttp.ClientResponse) -> str | None:
    """What to say about `url` answering with a redirect (its body is not read); None when the
    answer is not one."""
    if not 300 <= response.status < 400:
        return None
    location = response.headers.get("Location", "")
    if len(location) > LOCATION_SHOWN:
        location = location[:LOCATION_SHOWN] + "…"
    where = f" (a redirect to {location})" if location else ""
    return f"{url} answered {response.status}{where}; redirects are not followed"
