"""A fault-injecting TCP relay, for the fault campaign in test_faults.py.

A :class:`Relay` listens on 127.0.0.1 and passes every connection on to one
backend; the balancer is given the relay's URL as the backend's. What the
relay does to the traffic is its :class:`Fault`, switched at run time with
:meth:`Relay.set` and applied to the connections already open as well as
to new ones:

- ``PASS``: bytes relayed as they come, both ways;
- ``latency(s)``: each part of the backend's answer held ``s`` seconds;
- ``trickle(n, s)``: the answer sent ``n`` bytes at a time, ``s`` seconds apart;
- ``reset_after(n)``: once ``n`` bytes of answer went out on a connection
  (counted from the switch), it is reset: ``SO_LINGER`` 0, so the close
  sends an RST instead of a FIN;
- ``close_after(n)``: the same with a clean close (FIN);
- ``BLACKHOLE``: a host that vanished. Connections already open swallow
  what the balancer sends and never answer again (they stay silent even
  after the fault is switched off: their HTTP framing is lost). New
  connections are not accepted: the listening socket's queue is cut to
  one, so after it fills the kernel drops SYNs and connects hang until
  the balancer's connect timeout. (Dropping every SYN would need root and
  iptables; this is the honest unprivileged equivalent.)

Faults act on the backend's answers only, so a request is always whole
when it reaches the backend; what the balancer sent is recorded as it
passed (:attr:`Relay.delivered` counts request ids found in request lines)
so a test can tell whether a request went out once or twice, including
one the backend never saw because the relay swallowed it.

Each connection is one thread (``SocketServer``'s) pumping both ways with
``select``; sockets the relay opened are closed when either side closes.
"""

from __future__ import annotations

import re
import selectors
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass

from tests.upstreams import SocketServer

#: Request ids in the request lines the balancer sends: ``GET /<route>/<kind>/<id> HTTP/1.1``.
REQUEST_ID = rb"[A-Z]+ /[a-z]+/[a-z]+/([0-9a-z-]+) HTTP/1\.1\r\n"
#: Longest request line kept between two reads, so an id split across them is found.
_TAIL = 256
_RST = struct.pack("ii", 1, 0)


@dataclass(frozen=True)
class Fault:
    """What a relay does to the backend's answers (see the module docstring)."""

    kind: str = "pass"  # pass | latency | trickle | reset | close | blackhole
    delay: float = 0.0  # latency: before each part; trickle: between pieces
    size: int = 0  # trickle: bytes per piece; reset, close: bytes let through

    def __str__(self) -> str:
        if self.kind in ("pass", "blackhole"):
            return self.kind
        if self.kind == "latency":
            return f"latency {self.delay * 1000:g} ms"
        if self.kind == "trickle":
            return f"trickle {self.size} B / {self.delay * 1000:g} ms"
        return f"{self.kind} after {self.size} B"


PASS = Fault()
BLACKHOLE = Fault("blackhole")


def latency(seconds: float) -> Fault:
    return Fault("latency", delay=seconds)


def trickle(size: int, every: float) -> Fault:
    return Fault("trickle", delay=every, size=size)


def reset_after(size: int) -> Fault:
    return Fault("reset", size=size)


def close_after(size: int) -> Fault:
    return Fault("close", size=size)


class _Link:
    """One relayed connection's state."""

    def __init__(self, generation: int) -> None:
        self.generation = generation  # the relay's fault when counting began
        self.answered = 0  # answer bytes sent under that fault
        self.swallowing = False  # black-holed: silent for good
        self.tail = b""  # the end of the last read, for ids split across reads


class Relay(SocketServer):
    """A TCP relay to the backend on 127.0.0.1:``port`` that injects faults.

    ``record`` is the pattern whose first group names a request in what the
    balancer sends (``None``: record nothing); :attr:`delivered` counts each
    name's occurrences, :attr:`connections` the connections accepted and
    :attr:`cut` those the relay reset or closed on purpose. Set
    :attr:`recording` false to stop counting.
    """

    def __init__(self, port: int, *, record: bytes | None = REQUEST_ID) -> None:
        self.target = ("127.0.0.1", port)
        self.fault = PASS
        self.generation = 0
        self.delivered: Counter[str] = Counter()
        self.connections = 0
        self.cut = 0
        self.recording = record is not None
        self._pattern = re.compile(record or b"")
        self._lock = threading.Lock()
        super().__init__()

    def set(self, fault: Fault) -> None:
        """Switch to ``fault``, for open connections and new ones alike."""
        with self._lock:
            was = self.fault
            self.fault = fault
            self.generation += 1
        if fault.kind == "blackhole" and was.kind != "blackhole":
            self.stop_accepting()
        elif was.kind == "blackhole" and fault.kind != "blackhole":
            self.start_accepting()

    def handle(self, conn: socket.socket) -> None:
        with self._lock:
            self.connections += 1
        link = _Link(self.generation)
        conn.settimeout(5)
        if self.fault.kind == "blackhole":
            link.swallowing = True  # accepted before the switch: no backend for it
            self._pump(link, conn, None)
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            return  # the balancer sees the connection close
        with upstream:
            self._pump(link, conn, upstream)

    def _pump(self, link: _Link, conn: socket.socket, upstream: socket.socket | None) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(conn, selectors.EVENT_READ)
            if upstream is not None:
                selector.register(upstream, selectors.EVENT_READ)
            while not self.stopping:
                for key, _ in selector.select(0.1):
                    try:
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    except OSError:
                        return
                    if not data:
                        return  # either side closed: close both
                    if key.fileobj is conn:
                        self._record(link, data)
                        if self._swallows(link) or upstream is None:
                            continue
                        sent = self._send(upstream, data)
                    else:
                        sent = self._answer(link, conn, data)
                    if not sent:
                        return

    def _swallows(self, link: _Link) -> bool:
        if self.fault.kind == "blackhole":
            link.swallowing = True
        return link.swallowing

    def _record(self, link: _Link, data: bytes) -> None:
        if not self.recording:
            return
        seen = link.tail + data
        end = 0
        names = []
        for match in self._pattern.finditer(seen):
            names.append(match.group(1).decode("ascii"))
            end = match.end()
        link.tail = seen[max(end, len(seen) - _TAIL) :]
        if names:
            with self._lock:
                self.delivered.update(names)

    def _send(self, sock: socket.socket, data: bytes) -> bool:
        try:
            sock.sendall(data)
        except OSError:
            return False
        return True

    def _answer(self, link: _Link, conn: socket.socket, data: bytes) -> bool:
        """Pass on a part of the backend's answer under the current fault;
        whether the connection lives on."""
        fault = self.fault
        if link.generation != self.generation:
            link.generation, link.answered = self.generation, 0
        if self._swallows(link):
            return True
        if fault.kind in ("reset", "close"):
            return self._cut(link, conn, data, fault)
        link.answered += len(data)
        if fault.kind == "latency":
            time.sleep(fault.delay)
        if fault.kind != "trickle":
            return self._send(conn, data)
        for start in range(0, len(data), fault.size):
            if self.stopping or not self._send(conn, data[start : start + fault.size]):
                return False
            time.sleep(fault.delay)
        return True

    def _cut(self, link: _Link, conn: socket.socket, data: bytes, fault: Fault) -> bool:
        room = fault.size - link.answered
        if len(data) < room:
            link.answered += len(data)
            return self._send(conn, data)
        if room > 0:
            self._send(conn, data[:room])
        if fault.kind == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
        with self._lock:
            self.cut += 1
        return False  # SocketServer closes conn: an RST, or a FIN
