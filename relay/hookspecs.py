"""The plugin contract of relay: every hook a plugin may implement.

A plugin is a module (or object) with functions marked ``@relay.hookimpl`` whose names are hooks
below. Plugins load from the ``relay.plugins`` entry-point group (the bundled ones too) or from
``--plugin MODULE``. Hooks are called with keyword arguments, so an implementation may accept
only the arguments it needs.

Two kinds of hooks:

* registration hooks run once, when a relay starts: ``relay_register_handlers``,
  ``relay_register_ciphers``, ``relay_add_arguments``, ``relay_configure``;
* session hooks run once per session: ``relay_session_started``, ``relay_target_chosen``,
  ``relay_open_upstream`` (streams) or ``relay_open_datagram_upstream`` (datagrams),
  ``relay_session_finished``. A datagram session is one client address's association.

No hook runs per chunk of data: per-chunk work is done by the objects a hook returns (a cipher's
encoder and decoder, an upstream's socket), which the pump calls directly.

Where session hooks run. A front-end whose handshake is a sans-I/O object
(``RelayHandler.handshake``: tunnel, shadowsocks, socks5, socks4, http, mixed) runs its sessions in relay's
event loop, with no thread per connection, as long as every implementation of the session hooks
it calls there is marked ``@relay.nonblocking``: a promise that it returns promptly, without
waiting on the network, a resolver, or a lock held for long. An unmarked implementation is
always called in a thread of relay's pool, where it may block; it only makes its relay's
sessions costlier (an unmarked ``relay_session_started`` moves the whole session to a thread,
an unmarked ``relay_target_chosen`` or ``relay_open_upstream`` the opening of the upstream).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import pluggy

if TYPE_CHECKING:
    import argparse
    import socketserver

    from .address import Address
    from .codec import Cipher
    from .config import Config
    from .endpoint import Endpoint
    from .session import Session
    from .udp import DatagramUpstream

PROJECT = "relay"
ENTRY_POINT_GROUP = "relay.plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["hookspec", "hookimpl", "nonblocking", "is_nonblocking", "HandlerSpec", "ENTRY_POINT_GROUP"]

_F = TypeVar("_F", bound=Callable[..., Any])


def nonblocking(function: _F) -> _F:
    """Mark a session hook implementation that never blocks, so relay may call it from its
    event loop (see the module docstring). Use it next to ``@hookimpl``, in either order."""
    function.relay_nonblocking = True  # type: ignore[attr-defined]
    return function


def is_nonblocking(caller: Any) -> bool:
    """Whether every implementation of a hook (``pm.hook.NAME``) is marked ``nonblocking``."""
    return all(getattr(impl.function, "relay_nonblocking", False) for impl in caller.get_hookimpls())


@dataclass(frozen=True)
class HandlerSpec:
    """A named handler: what a relay does with an accepted stream (and, optionally, datagrams).

    ``handler`` is a ``socketserver.BaseRequestHandler`` subclass, used exactly as socketserver
    uses one: ``self.request`` is the connected socket, ``self.client_address`` the peer,
    ``self.server`` the relay's server, and ``setup``/``handle``/``finish`` run in order. relay
    also sets ``self.session`` (a ``relay.Session``) before ``setup`` runs. Front-end handlers
    (socks5, tunnel, shadowsocks) subclass ``relay.RelayHandler`` to reach the upstream
    hooks and the pump; terminal handlers (echo, uppercase) answer by themselves.
    """

    name: str
    handler: type[socketserver.BaseRequestHandler]
    description: str = ""
    datagram_handler: type[socketserver.BaseRequestHandler] | None = None
    """The same for datagrams (``--udp``), or None: ``self.request`` is ``(data, socket)`` as
    socketserver's UDP servers give it. Datagram front-ends subclass ``relay.udp.DatagramHandler``."""


@hookspec
def relay_register_handlers() -> list[HandlerSpec]:
    """Return the handlers this plugin provides.

    Called once when a relay starts (and by ``relay plugins``). Every result list is merged; two
    plugins giving the same name is a configuration error. The names are what ``relay serve
    --handler``, ``relay remote --handler`` and ``relay local --protocol`` accept.
    """


@hookspec
def relay_register_ciphers() -> list[Cipher]:
    """Return the Shadowsocks methods this plugin provides.

    Called once when a relay starts. Each item follows ``relay.codec.Cipher``: a ``name`` (what
    ``--method`` accepts), a ``key_size``, ``key_from_password(password)``, and factories for a
    stream ``encryptor(key)`` and ``decryptor(key)``. ``relay.aead.Aead2017Cipher`` builds one from
    an AEAD class, e.g. ``Aead2017Cipher("aes-192-gcm", 24, AESGCM)``.

    The key is the cipher's own business: the core keeps whatever ``key_from_password`` returned
    as ``config.key`` and hands it back to the cipher's factories. A method that serves several
    users on one port (as Shadowsocks 2022 does, SIP023) also has ``key_for_users(password,
    users)``, called for a remote whose config has ``"users"`` (name -> password), and
    ``client_password(password, user_password)``, the password a user's client gives (``relay
    url`` prints it); a method without them makes such a config an error. Both key functions raise
    ConfigError for a key they refuse.
    """


@hookspec
def relay_add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Add command-line options to ``relay COMMAND``.

    Called once per subcommand parser while the CLI is built; ``command`` is ``"local"``,
    ``"remote"``, ``"serve"`` or ``"demo"``. The parsed values reach ``relay_configure`` as
    ``config.options``.
    """


@hookspec
def relay_configure(config: Config) -> None:
    """Look at (and check) the final configuration before any socket is opened.

    Called once per relay (a ``relay demo`` runs two: a remote and a local), and by ``relay
    check`` for each config it checks, which starts nothing. ``config.options``
    holds the parsed command line, ``config.file`` the JSON config file's keys. Raise
    ``relay.ConfigError`` to refuse the configuration; the CLI prints its message on one line and
    exits with status 2.
    """


@hookspec
def relay_session_started(session: Session) -> None:
    """A session was accepted (a stream, or a UDP association's first datagram);
    ``session.client`` is the peer's address.

    Called before the session's handler runs: in the event loop when every implementation is
    ``nonblocking`` and the handler has an evented handshake, else in the session's own thread.
    Raising ends this session only (the traceback is logged once).
    """


@hookspec
def relay_target_chosen(session: Session, target: Address) -> None:
    """The session's handler has chosen a target (from SOCKS5, the tunnel setting, or the
    Shadowsocks request header). For a UDP association: the first time each target is seen.

    Called before ``relay_open_upstream``. Raise ``relay.TargetRefused`` to refuse the target:
    a SOCKS5 client is answered "connection not allowed by ruleset".
    """


@hookspec(firstresult=True)
def relay_open_upstream(session: Session, target: Address, evented: bool) -> Endpoint | None:
    """Open the connection the session's bytes go to, and return it as a ``relay.Endpoint``.

    ``evented`` is True only for ``nonblocking`` implementations called from the event loop:
    then do not wait for the connect; return an Endpoint whose non-blocking socket is still
    connecting (``connecting=True``, as ``relay.net.start_connect`` makes one), or raise
    ``relay.WouldBlock`` to be called again from a thread (with ``evented`` False), for
    example to resolve a host name. With ``evented`` False, return a connected socket.

    The first non-None result wins. The shadowsocks plugin answers on a local relay (an
    encrypted connection to the server, the target in its first flight); the core answers last
    (``trylast``): with the configured terminal handler on a remote started with ``--handler``,
    else with a direct TCP connection after the private-address policy checked every resolved
    address. Return ``None`` to let the next implementation decide; raise ``TargetRefused`` or
    ``OSError`` to fail the session.
    """


@hookspec(firstresult=True)
def relay_open_datagram_upstream(session: Session) -> DatagramUpstream | None:
    """Open where a new UDP association's datagrams go; return a ``relay.udp.DatagramUpstream``.

    Called once per association (the first datagram from a client address), in the relay's
    datagram thread: do not block for long. The upstream's ``send(target, payload)`` is called for
    every datagram, ``receive()`` whenever its ``sock`` is readable. The first non-None result
    wins: the shadowsocks plugin answers on a local relay (an encrypted socket to the server);
    the core answers last with the remote's ``--handler`` or a direct socket whose every
    datagram target is checked against the private-address policy.
    """


@hookspec
def relay_session_finished(session: Session, error: BaseException | None) -> None:
    """The session is over: its handler returned and its sockets are closed.

    Called once for every session that ``relay_session_started`` saw, in a thread of relay's
    pool (a slow hook holds up no other session). ``error``
    is what ended it abnormally (a ``ProtocolError``, ``TargetRefused``, ``OSError``,
    ``TimeoutError`` for the idle timeout), or ``None`` after a clean close both ways.
    ``session.bytes_up`` / ``session.bytes_down`` count the payload moved (for a terminal
    handler on ``relay serve``, as the kernel counted the TCP connection's bytes).
    """
