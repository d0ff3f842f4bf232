"""The trickle protocol: an async subscriber and publisher (the embedded server is in .server)."""

from relay_server.backoff import Backoff
from relay_server.trickle.errors import ChannelClosedError, TrickleError
from relay_server.trickle.publisher import Outcome, Publisher, PublisherStats, SegmentWriter
from relay_server.trickle.subscriber import Segment, Subscriber, SubscriberStats

__all__ = [
    "Backoff",
    "ChannelClosedError",
    "Outcome",
    "Publisher",
    "PublisherStats",
    "Segment",
    "SegmentWriter",
    "Subscriber",
    "SubscriberStats",
    "TrickleError",
]
