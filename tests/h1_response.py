"""One HTTP/1.1 response as a client reads it: httptools parses it, framing and all."""

from __future__ import annotations

import httptools


class H1Response:
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.headers: dict[bytes, bytes] = {}  # lower-case names
        self.body = bytearray()
        self.done = False  # the message ended (chunk terminator, or Content-Length reached)

    def feed(self, data: bytes) -> None:
        self.parser.feed_data(data)

    @property
    def status(self) -> int:
        return int(self.parser.get_status_code())

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, chunk: bytes) -> None:
        self.body += chunk

    def on_message_complete(self) -> None:
        self.done = True
