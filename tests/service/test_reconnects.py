"""gRPC and Prometheus give the same reconnects, while the processor is away and once it is back
(both read RelayStats.reconnects), and the same frames published."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from relay_server.api.relay.v1 import relay_service_pb2 as pb
from relay_server.api.relay.v1 import relay_service_pb2_grpc as pb_grpc
from relay_server.processor import ProcessorServer
from relay_server.service.app import RelayApp
from tests.service.conftest import LiveSource, Watcher
from tests.service.test_api import start_request
from tests.service.test_ops import RPC_TIMEOUT, options, scrape, value
from tests.session.test_relay import RECONNECT


async def test_grpc_and_prometheus_count_the_same_reconnects(
    live_source: LiveSource, make_watcher: Callable[..., Watcher]
) -> None:
    app = RelayApp(options(), link=RECONNECT)
    await app.start()
    processor = ProcessorServer()
    await processor.start()
    try:
        metrics_url = app.metrics_url
        assert metrics_url is not None
        async with grpc.aio.insecure_channel(app.target) as channel:
            stub = pb_grpc.RelayServiceStub(channel)
            await stub.StartSession(
                start_request("again", live_source.url, processor.url), timeout=RPC_TIMEOUT
            )
            watcher = make_watcher(stub, "again", 0.1)

            async def both() -> tuple[int, float | None]:
                got = await stub.GetSession(pb.GetSessionRequest(session_id="again"), timeout=RPC_TIMEOUT)
                scraped = value(
                    await scrape(metrics_url), "relay_session_reconnects_total", session_id="again"
                )
                return got.session.stats.reconnects, scraped

            await watcher.until(lambda s: s.stats.frames_returned > 0)
            assert await both() == (0, 0)
            port = processor.port
            await processor.stop()
            # The connection is lost and not yet made again: no reconnect yet, on either side.
            await watcher.until(lambda s: s.stats.webrtc_state == "reconnecting")
            assert await both() == (0, 0)
            processor = ProcessorServer(port=port)
            await processor.start()
            returned = watcher.sessions[-1].stats.frames_returned
            await watcher.until(
                lambda s: s.stats.frames_returned > returned and s.stats.webrtc_state == "connected"
            )
            assert await both() == (1, 1)
            await stub.StopSession(pb.StopSessionRequest(session_id="again"), timeout=RPC_TIMEOUT)
            # Ended, the session's counters hold still: both say the same of the frames published.
            final = await stub.GetSession(pb.GetSessionRequest(session_id="again"), timeout=RPC_TIMEOUT)
            scraped = value(
                await scrape(metrics_url), "relay_session_frames_published_total", session_id="again"
            )
            assert final.session.stats.frames_published == scraped > 0
    finally:
        await processor.stop()
        await app.drain()
