"""The link to a WebRTC processor speaking ComfyStream's contract (see link.py)."""

from relay_server.webrtc.control import ControlError, ControlRejected
from relay_server.webrtc.link import LinkError, LinkSettings, LinkState, LinkStats, ProcessorLink
from relay_server.webrtc.signaling import OfferRejected, ProcessorError

__all__ = [
    "ControlError",
    "ControlRejected",
    "LinkError",
    "LinkSettings",
    "LinkState",
    "LinkStats",
    "OfferRejected",
    "ProcessorError",
    "ProcessorLink",
]
