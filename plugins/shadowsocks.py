"""Shadowsocks AEAD (SIP004): the methods, the remote's front-ends, and the local's upstreams.

* ``relay_register_ciphers``: aes-128-gcm, aes-256-gcm, chacha20-ietf-poly1305.
* The ``shadowsocks`` handler, what a remote runs on every connection: read the salt and the
  first chunks, take the target from the plaintext, relay. A connection that fails to
  authenticate gets no answer at all: the remote reads and discards until the prober gives up or
  the handshake deadline passes, then closes. Its datagram handler decrypts each packet, forwards
  the payload to the packet's target, and encrypts the answers with their source address.
* ``relay_open_upstream`` on a local: connect to the remote, and send the target (with the
  client's first data when it comes promptly) as the first encrypted flight.
  ``relay_open_datagram_upstream`` on a local: a UDP socket to the remote, one per association.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from relay import Address, Config, ConfigError, Endpoint, HandlerSpec, ProtocolError, RelayHandler, Session, hookimpl
from relay.address import decode_address, encode_address
from relay.aead import Aead2017Cipher
from relay.codec import DatagramCodec
from relay.net import connect_tcp
from relay.udp import MAX_DATAGRAM, DatagramHandler, udp_socket

log = logging.getLogger("relay.shadowsocks")

CIPHERS = [
    Aead2017Cipher("aes-128-gcm", 16, AESGCM),
    Aead2017Cipher("aes-256-gcm", 32, AESGCM),
    Aead2017Cipher("chacha20-ietf-poly1305", 32, ChaCha20Poly1305),
]


class ShadowsocksHandler(RelayHandler):
    def handle(self) -> None:
        config = self.session.config
        assert config.cipher is not None
        conn = self.request
        decryptor = config.cipher.decryptor(config.key)
        plaintext = bytearray()
        # One deadline from accept for the header and for draining a failure alike, so when the
        # connection closes says nothing about how many bytes it took to fail.
        deadline = self.session.started + config.handshake_timeout
        try:
            while (parsed := decode_address(plaintext)) is None:
                conn.settimeout(max(deadline - time.monotonic(), 0.001))
                n = conn.recv_into(decryptor.recv_buffer())
                if not n:
                    decryptor.eof()
                    raise ProtocolError("closed before sending a target")
                plaintext += decryptor.received(n)
        except ProtocolError as e:
            self._drain(deadline)
            raise ProtocolError(f"refused: {e}") from None
        target, end = parsed
        upstream = self.open_upstream(target)
        encryptor = config.cipher.encryptor(config.key)
        self.relay(upstream, decoder=decryptor, encoder=encryptor, early=bytes(plaintext[end:]))

    def _drain(self, deadline: float) -> None:
        """Say nothing to a peer that failed to authenticate: read until it closes or time is up."""
        buffer = bytearray(16 * 1024)
        try:
            while (left := deadline - time.monotonic()) > 0:
                self.request.settimeout(left)
                if not self.request.recv_into(buffer):
                    return
        except OSError:
            return


class ShadowsocksDatagramHandler(DatagramHandler):
    def handle(self) -> None:
        data, sock = self.request
        codec = _codec(self.server.data, self.server.config)
        try:
            target, payload = codec.decode(data)
        except ProtocolError:
            self.drop("undecryptable")
            return
        client = self.client_address
        association = self.association(lambda source, answer: sock.sendto(codec.encode(source, answer), client))
        if association is not None:
            self.forward(association, target, payload)


def _codec(cache: dict, config: Any) -> DatagramCodec:
    codec = cache.get("shadowsocks.codec")
    if codec is None:
        codec = cache["shadowsocks.codec"] = config.cipher.datagram_codec(config.key)
    return codec


class ShadowsocksDatagramUpstream:
    """A local's datagrams to the remote: a connected UDP socket, so only the remote's packets
    come back on it."""

    on_answer = None

    def __init__(self, server: Address, codec: DatagramCodec) -> None:
        family, _, _, _, sockaddr = socket.getaddrinfo(server.host, server.port, type=socket.SOCK_DGRAM)[0]
        self.codec = codec
        self.sock = udp_socket(family)
        self.sock.connect(sockaddr)

    def send(self, target: Address, payload: bytes) -> None:
        self.sock.send(self.codec.encode(target, payload))

    def receive(self) -> tuple[Address, bytes]:
        return self.codec.decode(self.sock.recv(MAX_DATAGRAM))

    def close(self) -> None:
        self.sock.close()


@hookimpl
def relay_configure(config: Config) -> None:
    if config.handler.handler is ShadowsocksHandler and config.cipher is None:
        raise ConfigError("the shadowsocks handler needs a method and a password: run it with `relay remote`")


@hookimpl
def relay_register_ciphers() -> list[Aead2017Cipher]:
    return list(CIPHERS)


@hookimpl
def relay_register_handlers() -> list[HandlerSpec]:
    return [HandlerSpec("shadowsocks", ShadowsocksHandler, "Shadowsocks AEAD server: what a remote runs", ShadowsocksDatagramHandler)]


@hookimpl
def relay_open_upstream(session: Session, target: Address) -> Endpoint | None:
    config = session.config
    if config.role != "local" or config.server is None or config.cipher is None:
        return None
    sock = connect_tcp(config.server, config.connect_timeout)
    return Endpoint(
        sock,
        decoder=config.cipher.decryptor(config.key),
        encoder=config.cipher.encryptor(config.key),
        first_flight=encode_address(target),
    )


@hookimpl
def relay_open_datagram_upstream(session: Session) -> ShadowsocksDatagramUpstream | None:
    config = session.config
    if config.role != "local" or config.server is None or config.cipher is None:
        return None
    return ShadowsocksDatagramUpstream(config.server, _codec(session.server.data, config))
