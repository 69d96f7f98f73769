"""Shadowsocks AEAD (SIP004) and its 2022 edition (SIP022): the methods, the remote's front-ends,
and the local's upstreams.

* ``relay_register_ciphers``: aes-128-gcm, aes-256-gcm, chacha20-ietf-poly1305, and
  2022-blake3-aes-128-gcm, 2022-blake3-aes-256-gcm, 2022-blake3-chacha20-poly1305 (relay.aead2022;
  their "password" is a base64 key of exactly the key size). A 2022 cipher frames its own request
  and response headers, so the handlers ask it for its request decoder and response encoder, and
  for UDP key associations by the client session id its packets carry.
* The ``shadowsocks`` handler, what a remote runs on every connection: read the salt and the
  first chunks, take the target from the plaintext, relay. Its datagram handler decrypts each
  packet, forwards the payload to the packet's target, and encrypts the answers with their
  source address.
* Replay and reflection (relay.replay): once a connection's first chunk authenticates, its salt
  is checked and recorded in one atomic step; the remote also records the salt of every flight
  it sends. A first flight whose salt is remembered (replayed, sent twice at once, or one of the
  remote's own flights sent back) is refused as a probe, with one WARNING line and a count in
  ``server.data["shadowsocks.replays"]``. Datagrams likewise, per packet: a remembered salt is
  dropped and counted in the UDP server's ``stats["replay"]``. One filter per remote config,
  for all its TCP listeners; another for its UDP ones.
* Probe resistance: whatever fails (authentication, framing, a bad address, a replay, EOF or
  nothing at all within the deadline), the remote never answers and closes at one deadline,
  ``handshake_timeout`` seconds after accept (default 30): it reads and discards until then,
  and when the prober half-closes it keeps the connection until then too, so the prober gets
  EOF back after the same delay whatever it sent. Only a reset ends it sooner (nobody is left
  to see the close then).
* ``relay_open_upstream`` on a local: connect to the remote, and send the target (with the
  client's first data when it comes promptly) as the first encrypted flight.
  ``relay_open_datagram_upstream`` on a local: a UDP socket to the remote, one per association.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from relay import (
    Address,
    Config,
    ConfigError,
    Endpoint,
    HandlerSpec,
    ProtocolError,
    RelayError,
    RelayHandler,
    Session,
    hookimpl,
    nonblocking,
)
from relay.server import Handshake, Ready
from relay.address import decode_address, encode_address
from relay.aead import Aead2017Cipher
from relay.aead2022 import CIPHERS as CIPHERS_2022
from relay.aead2022 import PskChain, ReplayError, SaltStore
from relay.codec import DatagramCodec
from relay.gso import GRO_CONTROL_SPACE, DatagramBatch, enable_gro, read_burst
from relay.net import connect_tcp, start_connect
from relay.replay import SaltFilter
from relay.udp import MAX_DATAGRAM, DatagramHandler, RelayUDPServer, udp_socket

log = logging.getLogger("relay.shadowsocks")

CIPHERS = [
    Aead2017Cipher("aes-128-gcm", 16, AESGCM),
    Aead2017Cipher("aes-256-gcm", 32, AESGCM),
    Aead2017Cipher("chacha20-ietf-poly1305", 32, ChaCha20Poly1305),
    *CIPHERS_2022,
]


def _headed(cipher: Any) -> bool:
    """A cipher that frames its own request and response headers (SIP022: types, timestamps,
    padding, the echoed request salt) provides request_decoder/response_encoder, client_stream
    and datagram_client/datagram_server; an AEAD-2017 one carries the bare address instead."""
    return hasattr(cipher, "request_decoder")


class ReplayGuard:
    """A remote's memory of salts: one SaltFilter for streams and one for datagrams (each made
    on first use, sized by ``replay_capacity`` and ``replay_window``), shared by every listening
    socket of one config, so an IPv6 and an IPv4 listener of the same remote refuse each other's
    replays too. Each ``--workers`` process has its own."""

    def __init__(self, config: Config) -> None:
        # The sizes, not the config: the guard is the value of a weak dict keyed by the config,
        # and a reference back to its key would keep both alive forever.
        self.capacity = config.replay_capacity
        self.window = config.replay_window
        self._lock = threading.Lock()
        self._filters: dict[str, SaltFilter] = {}
        self.salts_2022 = SaltStore()  # SIP022: every salt for 60 s, no false positives
        self._next_datagram_log = 0.0
        self._unlogged_datagrams = 0

    def filter(self, kind: str) -> SaltFilter:
        """``"tcp"`` or ``"udp"``."""
        salts = self._filters.get(kind)
        if salts is None:
            with self._lock:
                salts = self._filters.get(kind)
                if salts is None:
                    salts = SaltFilter(
                        self.capacity,
                        self.window,
                        on_rotate=lambda lifetime, full: self._rotated(kind, lifetime, full),
                    )
                    self._filters[kind] = salts
        return salts

    def _rotated(self, kind: str, lifetime: float, full: bool) -> None:
        window = self.window
        if full and lifetime < window:
            log.warning(
                "replay filter (%s): %d salts in %.0f s, sooner than replay_window (%.0f s): salts are now "
                "remembered for at least %.0f s; raise replay_capacity to keep them longer",
                kind,
                self.capacity,
                lifetime,
                window,
                lifetime,
            )

    def datagram_replayed(self, client: Any) -> None:
        """Log replayed datagrams, at most one line a second (a replayed burst is not a log flood)."""
        now = time.monotonic()
        with self._lock:
            self._unlogged_datagrams += 1
            if now < self._next_datagram_log:
                return
            count, self._unlogged_datagrams = self._unlogged_datagrams, 0
            self._next_datagram_log = now + 1.0
        log.warning(
            "datagram from %s dropped: its salt was seen before (a replayed or reflected packet); "
            "%d such since the last such line",
            _peer(client),
            count,
        )


_guards: weakref.WeakKeyDictionary[Config, ReplayGuard] = weakref.WeakKeyDictionary()
_guards_lock = threading.Lock()
_count_lock = threading.Lock()


def replay_guard(config: Config) -> ReplayGuard:
    """The ReplayGuard of a remote's config (made on first use; it lives as long as the config)."""
    guard = _guards.get(config)
    if guard is None:
        with _guards_lock:
            guard = _guards.get(config)
            if guard is None:
                guard = _guards[config] = ReplayGuard(config)
    return guard


class _Replayed(ProtocolError):
    """A first flight whose salt the remote remembers (logged when found: a WARNING line)."""

    reported = True


_OWN_SALT_TRIES = 4  # a fresh salt taken for a remembered one: its 64-bit fingerprint matched, ~1e-13 a try


class ShadowsocksHandler(RelayHandler):
    """The remote's front-end: authenticate the first flight, check its salt, relay.

    Its handshake (FirstFlight) drains what it refuses: one deadline, ``session.started +
    handshake_timeout``, covers the target header and the refusal of anything else alike, so
    when a refused connection closes says nothing about how many bytes it took to fail (see the
    module docstring).
    """

    @classmethod
    def handshake(cls, session: Session) -> FirstFlight:
        return FirstFlight(session)


class FirstFlight(Handshake):
    """A client's first flight, sans-I/O: ready once the target header has authenticated and
    the salt was found fresh. ProtocolError for whatever is not a fresh client flight."""

    drain_on_failure = True

    def __init__(self, session: Session) -> None:
        config = session.config
        assert config.cipher is not None
        self.session = session
        self.cipher = config.cipher
        self.headed = _headed(config.cipher)
        if self.headed:
            # SIP022: the cipher's decoder checks the request headers (type, timestamp, padding)
            # and records the salt in the 60-second store once they authenticated.
            self.decoder = config.cipher.request_decoder(config.key, salts=replay_guard(session.server.config).salts_2022)  # type: ignore[attr-defined]
        else:
            self.decoder = config.cipher.decryptor(config.key)
        self.plaintext = bytearray()
        self.salt_checked = False

    def recv_buffer(self) -> memoryview:
        return self.decoder.recv_buffer()

    def eof(self) -> None:
        self.decoder.eof()
        raise ProtocolError("closed before sending a target")

    def received(self, nbytes: int) -> None:
        decoder = self.decoder
        if self.headed:
            try:
                self.plaintext += decoder.received(nbytes)
            except ReplayError as e:
                _count_replay(self.session)
                raise _Replayed(str(e)) from None
            if decoder.target is not None:  # type: ignore[attr-defined]
                # The request's own key: a multi-user remote (SIP023) answers with the user's.
                encoder = self.cipher.response_encoder(decoder.session_key, decoder.request_salt)  # type: ignore[attr-defined]
                if decoder.user is not None:  # type: ignore[attr-defined]
                    log.debug("%s: user %s", self.session, decoder.user)  # type: ignore[attr-defined]
                self.ready = Ready(decoder.target, decoder, encoder, bytes(self.plaintext))  # type: ignore[attr-defined]
            return
        data = decoder.received(nbytes)
        if data and not self.salt_checked:
            # The first chunk, length and payload, has authenticated: only now is the salt
            # recorded, so a truncated copy sent ahead of the real client cannot block it.
            self.salt_checked = True
            self._check_salt(getattr(decoder, "salt", None))
        # Usually the whole target header comes in the first chunk: read it from there, without
        # accumulating a copy (``data`` is valid until the decoder's next call).
        buffered = self.plaintext + data if self.plaintext else data
        parsed = decode_address(buffered)
        if parsed is None:
            self.plaintext = bytearray(buffered)
            return
        target, end = parsed
        self.ready = Ready(target, decoder, self._encryptor(), bytes(buffered[end:]))

    def _check_salt(self, salt: bytes | None) -> None:
        if salt is None:
            return  # a cipher without salts: nothing to remember
        if _tcp_salts(self.session.server).add_if_new(salt):
            return
        _count_replay(self.session)
        raise _Replayed("salt seen before (a replayed or reflected flight)")

    def _encryptor(self) -> Any:
        """The encryptor of the answer, its salt recorded before any of it is sent: that flight
        sent back at this remote is refused like a replay."""
        config = self.session.config
        salts = _tcp_salts(self.session.server)
        for _ in range(_OWN_SALT_TRIES):
            encryptor = config.cipher.encryptor(config.key)  # type: ignore[union-attr]
            salt = getattr(encryptor, "salt", None)
            if salt is None or salts.add_if_new(salt):
                return encryptor
        raise RelayError("no fresh salt after several tries: is the random source broken?")


def _tcp_salts(server: Any) -> SaltFilter:
    """The remote's stream salt filter, looked up once per listening server (the guard is
    found through a weak dictionary, which costs more than the check itself)."""
    salts = server.data.get("shadowsocks.tcp_salts")
    if salts is None:
        salts = server.data["shadowsocks.tcp_salts"] = replay_guard(server.config).filter("tcp")
    return salts


def _count_replay(session: Session) -> int:
    server = session.server
    with _count_lock:
        count = server.data["shadowsocks.replays"] = server.data.get("shadowsocks.replays", 0) + 1
    log.warning(
        "%s: first flight refused as a probe: its salt was seen before (a replayed or reflected flight); "
        "%d on %s so far",
        session,
        count,
        server.address,
    )
    return count


class ShadowsocksDatagramHandler(DatagramHandler):
    @classmethod
    def receiver(cls, server: RelayUDPServer) -> Callable[[bytes, Any], None]:
        config = server.config
        if _headed(config.cipher):
            return _receiver_2022(server)
        codec = _codec(server.data, config)
        decode, encode = codec.decode, codec.encode
        salt_size = getattr(config.cipher, "salt_size", None)  # None: a third-party cipher without salts
        guard = replay_guard(config)
        salts = guard.filter("udp") if salt_size else None
        is_new = salts.add_if_new if salts is not None else None
        remember = salts.add if salts is not None else None
        send_answer = server.send_answer
        find, associate, forward, drop = server.associations.get, server.associate, server.forward, server.drop

        def receive(data: bytes, client: Any) -> None:
            try:
                target, payload = decode(data)
            except ProtocolError:
                drop("undecryptable", client)
                return
            if is_new is not None and not is_new(data[:salt_size]):
                drop("replay", client)
                guard.datagram_replayed(client)
                return
            association = find(client)
            if association is None:

                def reply(source: Address, answer: bytes) -> None:
                    packet = encode(source, answer)
                    if remember is not None:
                        remember(packet[:salt_size])  # an answer sent back at this remote is refused like a replay
                    send_answer(packet, client)

                association = associate(client, reply)
                if association is None:
                    return
            forward(association, target, payload)

        return receive


def _receiver_2022(server: RelayUDPServer) -> Callable[[bytes, Any], None]:
    """SIP022 UDP: the packet names its client session; the association follows the session
    (not the address, which a NAT may change), and answers go where it last spoke from."""
    sessions = _udp_sessions(server)
    guard = replay_guard(server.config)
    send_answer = server.send_answer
    find, associate, forward, drop = server.associations.get, server.associate, server.forward, server.drop

    def receive(data: bytes, client: Any) -> None:
        try:
            session, target, payload = sessions.decode(data, client)
        except ReplayError:
            drop("replay", client)
            guard.datagram_replayed(client)
            return
        except ProtocolError:
            drop("undecryptable", client)
            return
        session_id = session.client_session_id
        association = find(session_id)
        if association is None:

            def reply(source: Address, answer: bytes) -> None:
                send_answer(session.encode(source, answer), session.client_address)

            association = associate(client, reply, key=session_id, on_close=lambda: sessions.remove(session_id))
            if association is None:
                return
        forward(association, target, payload)

    return receive


def _udp_sessions(server: Any) -> Any:
    """A remote's SIP022 UDP sessions (one table per UDP server; its associations bound it)."""
    sessions = server.data.get("shadowsocks.udp_sessions")
    if sessions is None:
        config = server.config
        sessions = server.data["shadowsocks.udp_sessions"] = config.cipher.datagram_server(
            config.key, session_timeout=max(config.udp_timeout, 60.0), max_sessions=config.udp_max_associations + 1
        )
    return sessions


def _peer(address: Any) -> str:
    try:
        return str(Address(str(address[0]), int(address[1])))
    except (TypeError, ValueError, IndexError):
        return repr(address)


def _codec(cache: dict, config: Any) -> DatagramCodec:
    codec = cache.get("shadowsocks.codec")
    if codec is None:
        codec = cache["shadowsocks.codec"] = config.cipher.datagram_codec(config.key)
    return codec


class ShadowsocksDatagramUpstream:
    """A local's datagrams to the remote: a connected UDP socket, so only the remote's packets
    come back on it. Packets leave in batches (relay.gso): a burst from the client goes to the
    remote in a few system calls."""

    on_answer = None

    def __init__(self, server: Address, codec: DatagramCodec) -> None:
        family, _, _, _, sockaddr = socket.getaddrinfo(server.host, server.port, type=socket.SOCK_DGRAM)[0]
        self.codec = codec
        self.sock = udp_socket(family)
        self.sock.connect(sockaddr)
        self.batch = DatagramBatch(self.sock)
        self._add = self.batch.add
        self._encode = codec.encode
        self._space = GRO_CONTROL_SPACE if enable_gro(self.sock) else 0

    def send(self, target: Address, payload: bytes) -> None:
        self._add(self._encode(target, payload))

    def receive(self) -> tuple[Address, bytes] | list[tuple[Address, bytes] | ProtocolError]:
        data, _ = read_burst(self.sock, self._space, MAX_DATAGRAM)
        if type(data) is not list:
            return self.codec.decode(data)
        answers: list[tuple[Address, bytes] | ProtocolError] = []
        for packet in data:  # the remote's burst, read whole
            try:
                answers.append(self.codec.decode(packet))
            except ProtocolError as e:
                answers.append(e)
        return answers

    def close(self) -> None:
        self.sock.close()


@hookimpl
def relay_configure(config: Config) -> None:
    if config.handler.handler is ShadowsocksHandler:
        if config.cipher is None:
            raise ConfigError("the shadowsocks handler needs a method and a password: run it with `relay remote`")
        if isinstance(config.key, PskChain):
            raise ConfigError('password: a remote takes one key; for several users on one port, give each their own in "users" (SIP023)')
        # The replay filters' memory is taken now, not on the first connection or datagram.
        for kind in ("tcp", "udp"):
            if getattr(config, kind):
                replay_guard(config).filter(kind)


@hookimpl
def relay_register_ciphers() -> list[Any]:
    return list(CIPHERS)


@hookimpl
def relay_register_handlers() -> list[HandlerSpec]:
    return [HandlerSpec("shadowsocks", ShadowsocksHandler, "Shadowsocks AEAD server: what a remote runs", ShadowsocksDatagramHandler)]


@hookimpl
@nonblocking
def relay_open_upstream(session: Session, target: Address, evented: bool) -> Endpoint | None:
    config = session.config
    if config.role != "local" or config.server is None or config.cipher is None:
        return None
    if evented:
        sock, connecting = start_connect(config.server), True
    else:
        sock, connecting = connect_tcp(config.server, config.connect_timeout), False
    if _headed(config.cipher):
        # The request encoder takes the target from the start of its first input: the first flight.
        encoder, decoder = config.cipher.client_stream(config.key)  # type: ignore[attr-defined]
    else:
        encoder, decoder = config.cipher.encryptor(config.key), config.cipher.decryptor(config.key)
    return Endpoint(
        sock,
        decoder=decoder,
        encoder=encoder,
        first_flight=encode_address(target),
        connecting=connecting,
        connect_timeout=config.connect_timeout,
    )


@hookimpl
def relay_open_datagram_upstream(session: Session) -> ShadowsocksDatagramUpstream | None:
    config = session.config
    if config.role != "local" or config.server is None or config.cipher is None:
        return None
    if _headed(config.cipher):
        codec = config.cipher.datagram_client(config.key)  # type: ignore[attr-defined]  # one per association
    else:
        codec = _codec(session.server.data, config)
    return ShadowsocksDatagramUpstream(config.server, codec)
