"""relay-rot13: an example third-party handler plugin for relay.

It shows what a handler plugin usually does, with the public ``relay`` API only:

* ``relay_register_handlers``: provide a handler, ``rot13``, that streams back the ROT13 of what
  it receives (ASCII letters only, everything else unchanged) until the client closes;
* ``relay_add_arguments`` / ``relay_configure``: add ``--rot13-shift N`` (a general Caesar
  shift, default 13) and check it before any socket is opened;
* ``relay_session_started`` / ``relay_session_finished``: log one DEBUG line at each end of the
  sessions this handler serves, on the ``relay.rot13`` logger.

Use it with ``relay serve --handler rot13`` (a plain TCP port) or ``relay remote --handler rot13``
(the far end of a Shadowsocks tunnel answers every stream itself).
"""

from __future__ import annotations

import argparse
import functools
import logging
import socketserver
import string

from relay import Config, ConfigError, HandlerSpec, Session, hookimpl, nonblocking

__version__ = "0.1.0"

log = logging.getLogger("relay.rot13")

DEFAULT_SHIFT = 13
CHUNK = 64 * 1024

_LOWER = string.ascii_lowercase.encode()
_UPPER = string.ascii_uppercase.encode()


@functools.cache
def caesar_table(shift: int) -> bytes:
    """The ``bytes.translate`` table rotating ASCII letters by ``shift``.

    Cached by shift: the table is built once per value, not per session or per chunk, and
    every relay in a process (``relay demo`` runs two) with the same shift shares it.
    """
    shift %= 26
    return bytes.maketrans(
        _LOWER + _UPPER,
        _LOWER[shift:] + _LOWER[:shift] + _UPPER[shift:] + _UPPER[:shift],
    )


def shift_of(config: Config) -> int:
    """The shift this relay was configured with.

    ``getattr`` with a default: ``config.options`` is the parsed command line of whichever
    command started the relay, and lacks the attribute where the option was not added (or when
    a relay is built in-process without the CLI).
    """
    return int(getattr(config.options, "rot13_shift", DEFAULT_SHIFT))


class Rot13Handler(socketserver.BaseRequestHandler):
    """Send back every byte received, letters rotated, until EOF.

    A terminal handler: it answers by itself, so it subclasses socketserver's base class rather
    than ``relay.server.RelayHandler``. relay sets ``self.session`` before ``setup`` runs.
    """

    session: Session

    def setup(self) -> None:
        # Looked up once per session (a cache hit), so the loop below is translate + send only.
        self.table = caesar_table(shift_of(self.session.config))

    def handle(self) -> None:
        while data := self.request.recv(CHUNK):
            self.request.sendall(data.translate(self.table))


@hookimpl
def relay_register_handlers() -> list[HandlerSpec]:
    return [HandlerSpec("rot13", Rot13Handler, "send back what was received, ROT13 (see --rot13-shift)")]


@hookimpl
def relay_add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    # Every command that can run a handler: serve and remote (--handler), local (--protocol),
    # demo (its remote and local both see the option).
    parser.add_argument(
        "--rot13-shift",
        type=int,
        default=DEFAULT_SHIFT,
        metavar="N",
        help=f"rot13 handler: rotate letters by N, 0-25 (default {DEFAULT_SHIFT}; 26-N undoes N)",
    )


@hookimpl
def relay_configure(config: Config) -> None:
    """Refuse a bad shift before any socket is opened: the CLI prints one line and exits 2.

    Called for every relay, whatever its handler; only a relay that runs rot13 is checked.
    """
    if not _serves_rot13(config):
        return
    shift = shift_of(config)
    if not 0 <= shift <= 25:
        raise ConfigError(f"--rot13-shift must be between 0 and 25, not {shift}")
    caesar_table(shift)  # build it now, not in the first session


@hookimpl
@nonblocking  # it only logs: relay may call it from its event loop
def relay_session_started(session: Session) -> None:
    if _serves_rot13(session.config):
        log.debug("session %d from %s: started (shift %d)", session.id, session.client, shift_of(session.config))


@hookimpl
def relay_session_finished(session: Session, error: BaseException | None) -> None:
    if _serves_rot13(session.config):
        outcome = f": {type(error).__name__}: {error}" if error is not None else ""
        log.debug(
            "session %d from %s: %d B in, %d B out%s",
            session.id, session.client, session.bytes_up, session.bytes_down, outcome,
        )


def _serves_rot13(config: Config) -> bool:
    """Session and configure hooks fire for every relay in the process (a ``relay demo`` runs a
    local and a remote): act only where rot13 answers, as the front handler or a remote's
    ``--handler``."""
    handlers = (config.handler, config.upstream_handler)
    return any(spec is not None and spec.handler is Rot13Handler for spec in handlers)
