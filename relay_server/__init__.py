"""trickle-relay: joins Livepeer trickle channels to WebRTC video processors."""

__version__ = "0.1.0"
