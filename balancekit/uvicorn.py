"""uvicorn's httptools protocol, with a chunked request's trailers dropped.

uvicorn's httptools protocol (0.55 and earlier) appends every field httptools
reports to the list it gave the app as ``scope["headers"]``, and httptools
reports a chunked body's trailer fields the same way as header fields: a
client can then add ``Cookie`` or ``Host`` to a request after the app was
called, and a proxy forwards them as headers (RFC 9110 section 6.5.1 forbids
merging the two sections). This subclass drops trailer fields, as NGINX
does. ``balancekit serve --server uvicorn`` uses it; run uvicorn yourself
with it as::

    uvicorn app:app --http balancekit.uvicorn:HttpToolsProtocol

uvicorn's h11 protocol (``--http h11``) never merged trailers.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Base

__all__ = ["HttpToolsProtocol"]


class HttpToolsProtocol(_Base):
    """uvicorn's ``HttpToolsProtocol`` that never adds trailers to headers."""

    _in_body = False

    def on_message_begin(self) -> None:
        self._in_body = False
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_body:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_body = True
        super().on_headers_complete()
