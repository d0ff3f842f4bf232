"""The trickle clients follow no redirect: a 307 is an error that says where it pointed, the host
it names gets nothing, and the request is not tried again."""

from __future__ import annotations

from collections import Counter

import pytest

from relay_server.backoff import Backoff
from relay_server.trickle.errors import RedirectRefused
from relay_server.trickle.publisher import Publisher
from relay_server.trickle.subscriber import Subscriber
from tests.redirecting import redirect_pair

# Were a redirect retried like a failure, each request would show up this many times and more.
QUICK = Backoff(initial=0.01, factor=2.0, maximum=0.05, attempts=4)


def refusal(method: str, url: str, target: str) -> str:
    return f"{method} {url} answered 307 (a redirect to {target}); redirects are not followed"


async def test_the_subscriber_refuses_a_redirect() -> None:
    async with redirect_pair() as (redirector, recorder):
        async with Subscriber(f"{redirector.url}/in", backoff=QUICK) as subscriber:
            with pytest.raises(RedirectRefused) as raised:
                await anext(subscriber)
        assert str(raised.value) == refusal("GET", f"{redirector.url}/in/-2", f"{recorder.url}/in/-2")
        assert redirector.requests == [("GET", "/in/-2")]
        assert recorder.requests == []


async def test_the_publisher_refuses_redirects_for_every_request() -> None:
    async with redirect_pair() as (redirector, recorder):
        url = f"{redirector.url}/out"
        publisher = Publisher(url, backoff=QUICK)
        with pytest.raises(RedirectRefused) as raised:
            await publisher.create_channel()
        assert str(raised.value) == "creating: " + refusal("POST", url, f"{recorder.url}/out")
        with pytest.raises(RedirectRefused) as raised:
            async with await publisher.segment() as segment:
                await segment.write(b"segment bytes")
        assert str(raised.value) == refusal("POST", f"{url}/0", f"{recorder.url}/out/0")
        await publisher.close()  # its DELETE is refused too (and only logged: a close goes on)

        continuing = Publisher(url, start_seq=None, backoff=QUICK)
        with pytest.raises(RedirectRefused) as raised:
            await continuing.segment()
        assert str(raised.value) == refusal("GET", f"{url}/next", f"{recorder.url}/out/next")
        await continuing.close(delete_channel=False)

        assert recorder.requests == []
        seen = Counter(redirector.requests)
        assert set(seen) >= {
            ("POST", "/out"),
            ("POST", "/out/0"),
            ("DELETE", "/out"),
            ("GET", "/out/next"),
        }, seen
        assert set(seen.values()) == {1}, f"a redirected request was tried again: {seen}"
