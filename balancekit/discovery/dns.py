"""``type = "dns"``: backends from A/AAAA or SRV records, through dnspython's
async resolver (extra ``dns``).

``record = "a"``: one backend per A and AAAA address of ``name``, on
``port``. ``record = "srv"``: ``name`` is an SRV name
(``_http._tcp.api.internal``); each record's target is resolved to its
addresses (from the answer's additional section when the server sends them,
as Kubernetes' and Consul's do, else by asking), and gives one backend per
address with the record's port and weight (weight 0, "rarely", counts as 1).
The records of the lowest priority are the primaries, the others backups.

An answer that exists without records (NXDOMAIN, NODATA) is an empty list:
the pool keeps only its static backends. A timeout, SERVFAIL, a refusal or
an unreachable resolver raise :class:`DiscoveryError`, and the pool keeps
its last good set. An SRV target that does not resolve is logged and left
out. The answer's smallest TTL is the ``ttl`` the runner re-resolves at when
it is shorter than ``interval`` (never more often than once a second).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

from .._exceptions import DiscoveryError

logger = logging.getLogger("balancekit")

DEFAULT_INTERVAL = 30.0
#: Seconds one resolution may take, every query and retry included.
DEFAULT_TIMEOUT = 2.0
RECORDS = ("a", "srv")
SCHEMES = ("http", "https")


def _resolver_address(value: Any) -> tuple[str, int]:
    if not isinstance(value, str):
        raise TypeError(f"resolver: must be a string 'host:port', got {value!r}")
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        number = 0
    if not sep or not 0 < number < 65536:
        raise ValueError(
            f"resolver: must be an IP address and a port, 'host:port' such as"
            f" '127.0.0.1:5353' or '[::1]:53', got {value!r}"
        )
    return host, number


def _check(name: Any, port: Any, scheme: Any, record: Any, timeout: Any) -> None:
    if not isinstance(name, str) or not name.strip(". "):
        raise ValueError(f"name: must be a DNS name such as 'api.internal', got {name!r}")
    if record not in RECORDS:
        raise ValueError(f"record: must be 'a' (A and AAAA) or 'srv', got {record!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: must be 'http' or 'https', got {scheme!r}")
    if record == "a" and port is None:
        raise ValueError("port: is required with record = 'a' (A and AAAA records carry no port)")
    if record == "srv" and port is not None:
        raise ValueError("port: comes from the SRV records; leave it out with record = 'srv'")
    if port is not None and (
        not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536
    ):
        raise ValueError(f"port: must be a port number from 1 to 65535, got {port!r}")
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not timeout > 0:
        raise ValueError(f"timeout: must be a positive number of seconds, got {timeout!r}")


class DNSDiscovery:
    """The backends DNS gives for a name: A/AAAA addresses or SRV targets."""

    name = "dns"

    def __init__(
        self,
        *,
        name: str,
        port: int | None = None,
        scheme: str = "http",
        record: str = "a",
        resolver: str | None = None,
        interval: float = DEFAULT_INTERVAL,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        _check(name, port, scheme, record, timeout)
        address = None if resolver is None else _resolver_address(resolver)
        try:
            import dns.asyncresolver
            import dns.exception
            import dns.name
            import dns.nameserver
            import dns.resolver
        except ImportError:
            raise ValueError(
                "type = 'dns' needs dnspython: pip install 'balancekit[dns]'"
            ) from None
        try:
            dns.name.from_text(name)
        except dns.exception.DNSException as exc:
            raise ValueError(f"name: not a DNS name ({exc}), got {name!r}") from None
        try:
            self._resolver = dns.asyncresolver.Resolver(configure=address is None)
        except dns.resolver.NoResolverConfiguration:
            raise ValueError(
                "resolver: the system has no resolver configured; set resolver = 'host:port'"
            ) from None
        if address is not None:
            self._resolver.nameservers = [dns.nameserver.Do53Nameserver(*address)]
        self._resolver.lifetime = float(timeout)
        self.dns_name = name
        self.port = port
        self.scheme = scheme
        self.record = record
        self.interval = interval
        #: How log lines name this discovery.
        self.target = f"{name} ({'SRV' if record == 'srv' else 'A/AAAA'})"
        #: The last answer's smallest TTL, None without records.
        self.ttl: float | None = None
        self._unresolved: set[str] = set()
        self._ttls: list[float] = []

    async def resolve(self) -> list[Any]:
        """The backends the records give now."""
        self._ttls = []
        if self.record == "srv":
            backends = await self._srv()
        else:
            assert self.port is not None  # checked in __init__
            addresses = await self._addresses(self.dns_name)
            backends = [self._url(address, self.port) for address in addresses]
        self.ttl = min(self._ttls, default=None)
        return backends

    def _url(self, address: str, port: int) -> str:
        host = f"[{address}]" if ":" in address else address
        return f"{self.scheme}://{host}:{port}"

    async def _query(self, name: str, rdtype: str) -> Any:
        """The answer for ``name`` and ``rdtype``, None for NXDOMAIN (an
        answer without records has ``rrset`` None)."""
        import dns.exception
        import dns.resolver

        try:
            answer = await self._resolver.resolve(name, rdtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return None
        except (dns.exception.DNSException, OSError) as exc:
            # Timeout, SERVFAIL or a refusal from every server, a malformed
            # answer, an unreachable resolver: nothing known, keep the last.
            raise DiscoveryError(f"{name} {rdtype}: {exc}") from None
        if answer.rrset is not None:
            self._ttls.append(float(answer.rrset.ttl))
        return answer

    async def _addresses(self, name: str) -> list[str]:
        answers = await asyncio.gather(
            self._query(name, "A"), self._query(name, "AAAA"), return_exceptions=True
        )
        addresses: list[str] = []
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
            if answer is not None and answer.rrset is not None:
                addresses += [rdata.address for rdata in answer.rrset]
        return addresses

    async def _srv(self) -> list[Any]:
        answer = await self._query(self.dns_name, "SRV")
        if answer is None or answer.rrset is None:
            return []
        records = [r for r in answer.rrset if r.target.to_text() != "."]  # "." : no service
        known = _additional(answer)
        targets = sorted({r.target.to_text() for r in records} - known.keys())
        found = await asyncio.gather(*(self._addresses(t) for t in targets))
        known.update(zip(targets, found, strict=True))
        self._left_out(sorted(t for t, addresses in known.items() if not addresses))
        lowest = min((r.priority for r in records), default=0)
        return [
            {
                "url": self._url(address, r.port),
                "weight": max(1, r.weight),
                "backup": r.priority != lowest,
            }
            for r in sorted(records, key=lambda r: (r.priority, -r.weight))
            for address in known.get(r.target.to_text(), [])
        ]

    def _left_out(self, unresolved: list[str]) -> None:
        # Said when the set changes, not every round.
        new = set(unresolved)
        if new - self._unresolved:
            logger.warning(
                "discovery dns %s: SRV targets without addresses, left out: %s",
                self.dns_name,
                ", ".join(sorted(new - self._unresolved)),
            )
        self._unresolved = new


def _additional(answer: Any) -> dict[str, list[str]]:
    """The addresses an SRV answer's additional section gives, by name."""
    known: dict[str, list[str]] = {}
    for rrset in answer.response.additional:
        if rrset.rdtype in (1, 28):  # A, AAAA
            known.setdefault(rrset.name.to_text(), []).extend(r.address for r in rrset)
    return known
