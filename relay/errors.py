"""The one error tree of relay.

    RelayError
     +-- ConfigError        a user's settings are wrong; the CLI prints one line and exits 2
     +-- TargetRefused      the policy (or a plugin) will not let a session reach its target
     +-- ProtocolError      a peer sent bytes that break the protocol
          +-- Socks5Error   ... and SOCKS5 has a reply code for it
          +-- Socks4Error   ... and SOCKS4 answers it with a reply code (91, rejected or failed)
          +-- DecryptError  ... an AEAD tag did not verify (wrong key, tampering, a probe)

OSError stays OSError: it is translated once, where a socket is used (see relay.server).
"""

from __future__ import annotations

__all__ = [
    "WouldBlock",
    "RelayError",
    "ConfigError",
    "TargetRefused",
    "ProtocolError",
    "Socks5Error",
    "Socks4Error",
    "DecryptError",
]


class RelayError(Exception):
    """Base class of every error relay raises on purpose."""


class WouldBlock(RelayError):
    """Raised by a ``relay.nonblocking`` hook implementation, called from the event loop, that
    must block after all (a host name to resolve): relay calls it again from a thread."""


class ConfigError(RelayError):
    """Invalid configuration: a one-line message naming the key and the problem."""


class TargetRefused(RelayError):
    """A session's target is not allowed (private address, plugin veto)."""


class ProtocolError(RelayError):
    """A peer violated the wire protocol."""


class Socks5Error(ProtocolError):
    """A SOCKS5 failure that has a reply code (RFC 1928 section 6)."""

    def __init__(self, reply_code: int, message: str) -> None:
        super().__init__(message)
        self.reply_code = reply_code


class Socks4Error(ProtocolError):
    """A SOCKS4/4a request the server answers with a failure code before closing.

    ``reply_code`` is the CD byte of that answer: 91 (request rejected or failed) for every
    malformed or unsupported request; 92 and 93 are identd verdicts, not protocol errors.
    """

    def __init__(self, reply_code: int, message: str) -> None:
        super().__init__(message)
        self.reply_code = reply_code


class DecryptError(ProtocolError):
    """An AEAD chunk failed authentication."""
