"""TLS on the client listener: the server context, and the protocol that ALPN chose.

With ``listen.tls`` the listener speaks TLS and offers ALPN ``h2`` (when ``http2.enabled``) and
``http/1.1``. The handshake is over when ``connection_made`` runs, so :class:`AlpnSwitch` hands the
connection to the HTTP/2 or the HTTP/1.1 front there, once per connection.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import cast

from proxy.config import TlsConfig
from proxy.server.front import Front
from proxy.server.h1 import H1Connection

# TLS 1.2 suites that RFC 9113 §9.2.2 allows for HTTP/2 (ephemeral key exchange, AEAD);
# TLS 1.3 suites are all fine and not affected by this string.
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"


def server_context(tls: TlsConfig, http2: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_ciphers(_TLS12_CIPHERS)
    context.load_cert_chain(tls.cert, tls.key)
    context.set_alpn_protocols(["h2", "http/1.1"] if http2 else ["http/1.1"])
    return context


class AlpnSwitch(asyncio.Protocol):
    """Stands in until the handshake is done, then installs the front that ALPN agreed on."""

    def __init__(self, front: Front) -> None:
        self.front = front

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.Transport, transport)
        ssl_object = t.get_extra_info("ssl_object")
        chosen = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        factory = self.front.h2_factory
        protocol = factory() if chosen == "h2" and factory is not None else H1Connection(self.front)
        t.set_protocol(protocol)
        protocol.connection_made(t)
