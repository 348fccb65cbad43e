"""The PROXY protocol (HAProxy's, versions 1 and 2), read before the first
request on a connection from an L4 balancer, so that the client's address
survives the hop.

Only the header is parsed here, without I/O: :func:`parse` takes the bytes
received so far and says whether the header is complete, how long it is and
which source address it carries. The specification is HAProxy's
``doc/proxy-protocol.txt``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

#: Version 2's fixed signature.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: A v1 line is at most 107 bytes, CRLF included.
V1_MAX = 107
#: A v2 header's bound here: 16 bytes and addresses, with room for TLVs.
V2_MAX = 16 + 1024


class ProxyHeaderError(ValueError):
    """Bytes that are not a PROXY header: the connection is closed."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete header: its ``length`` in bytes and the ``source`` it
    names, or None (``LOCAL``, ``UNKNOWN``: the connection's own address
    stands, as for a health check from the balancer itself)."""

    length: int
    source: tuple[str, int] | None


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of ``data``; None while it is incomplete.

    Raises :class:`ProxyHeaderError` as soon as the bytes cannot begin one.
    """
    if data[:12] == V2_SIGNATURE[: len(data[:12])] and data[:1] == b"\r":
        return _parse_v2(data)
    if data[:6] == b"PROXY "[: len(data[:6])]:
        return _parse_v1(data)
    raise ProxyHeaderError("no PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 line longer than 107 bytes")
        return None
    fields = data[:end].split(b" ")
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":
        return ProxyHeader(end + 2, None)
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError(f"malformed PROXY v1 line: {data[:end]!r}")
    _, family, source, destination, source_port, destination_port = fields
    version = 4 if family == b"TCP4" else 6
    address = _address(source, version)
    _address(destination, version)
    port = _port(source_port)
    _port(destination_port)
    return ProxyHeader(end + 2, (address, port))


def _address(text: bytes, version: int) -> str:
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError(f"not an IPv{version} address: {text!r}") from None
    if address.version != version:
        raise ProxyHeaderError(f"not an IPv{version} address: {text!r}")
    return str(address)


def _port(text: bytes) -> int:
    # Decimal digits only, no sign or leading zero (the specification's form).
    if not text.isdigit() or (len(text) > 1 and text[:1] == b"0") or int(text) > 65535:
        raise ProxyHeaderError(f"not a port: {text!r}")
    return int(text)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < 16:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2 or command not in (0, 1):
        raise ProxyHeaderError(f"PROXY v2 version/command byte {data[12]:#04x}")
    family = data[13]
    length = 16 + int.from_bytes(data[14:16], "big")
    if length > V2_MAX:
        raise ProxyHeaderError(f"PROXY v2 header of {length} bytes")
    if len(data) < length:
        return None
    if command == 0:  # LOCAL: the balancer speaking for itself
        return ProxyHeader(length, None)
    body = data[16:length]
    if family == 0x11:  # TCP over IPv4
        if len(body) < 12:
            raise ProxyHeaderError("PROXY v2 TCP4 addresses cut short")
        address = str(ipaddress.IPv4Address(body[0:4]))
        return ProxyHeader(length, (address, int.from_bytes(body[8:10], "big")))
    if family == 0x21:  # TCP over IPv6
        if len(body) < 36:
            raise ProxyHeaderError("PROXY v2 TCP6 addresses cut short")
        address = str(ipaddress.IPv6Address(body[0:16]))
        return ProxyHeader(length, (address, int.from_bytes(body[32:34], "big")))
    if family == 0x00:  # UNSPEC: nothing to say about the source
        return ProxyHeader(length, None)
    raise ProxyHeaderError(f"PROXY v2 family {family:#04x} is not TCP")
