"""Errors of the trickle layer."""


class TrickleError(ConnectionError):
    """A trickle request kept failing after every retry."""


class ChannelClosedError(TrickleError):
    """The channel was closed by the server or does not exist; nothing more can be published."""


class RedirectRefused(TrickleError):
    """The server answered a redirect, which the relay does not follow (relay_server.redirects)."""
