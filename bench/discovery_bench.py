"""How fast DNS discovery follows a change, and what several workers ask.

Against a real dnsmasq on 127.0.0.1 (Debian's ``dnsmasq-base``; the test
suite's ``DNSServer``, TTL 1 s) and, for the shared case, a throwaway
redis-server:

1. change to traffic: one Balancer with a DNS-discovered pool; the A
   record is pointed at a new address ``--changes`` times, and each time
   the seconds until that address is a backend of the pool are measured
   (median and max). Without health checks a backend in the pool takes
   traffic from that moment; with checks add one check interval.
2. queries per round: four Balancers (as four workers would be) resolve
   the same name for ``--seconds`` seconds, once each on its own
   (``memory://``) and once sharing a Redis store, where one resolves
   under a lease and the others adopt its answer. dnsmasq's query log
   counts the A queries.

Every process is started by this script and stopped by PID.

    .venv/bin/python bench/discovery_bench.py [--changes 20] [--seconds 10]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from balancekit import Balancer  # noqa: E402
from tests.conftest import RedisServer  # noqa: E402
from tests.test_discovery import DNSServer, urls, wait_for  # noqa: E402

NAME = "bench.bk.test"


def config(store: str, resolver: str, interval: float) -> dict[str, Any]:
    discovery = {"type": "dns", "name": NAME, "port": 80, "resolver": resolver}
    return {
        "store": store,
        "pools": {"api": {"backends": [], "discovery": {**discovery, "interval": interval}}},
    }


def change_to_pool(dns: DNSServer, changes: int) -> list[float]:
    balancer = Balancer(config("memory://", dns.address, 30))  # the TTL (1 s) drives it
    balancer.start_background()
    try:
        dns.set_hosts({NAME: ["127.0.0.7"]})
        wait_for(lambda: "http://127.0.0.7:80" in urls(balancer))
        delays = []
        for i in range(changes):
            address = f"127.0.1.{i + 1}"
            dns.set_hosts({NAME: [address]})
            changed = time.monotonic()
            wait_for(lambda a=address: f"http://{a}:80" in urls(balancer), timeout=15)
            delays.append(time.monotonic() - changed)
        return delays
    finally:
        balancer.close()


def queries(dns: DNSServer, store: str, seconds: float) -> tuple[int, float]:
    workers = [Balancer(config(store, dns.address, 5)) for _ in range(4)]
    for worker in workers:
        worker.start_background()
    try:
        dns.set_hosts({NAME: ["127.0.0.8"]})
        wait_for(lambda: all("http://127.0.0.8:80" in urls(w) for w in workers), timeout=15)
        before, started = dns.queries(NAME), time.monotonic()
        time.sleep(seconds)
        return dns.queries(NAME) - before, time.monotonic() - started
    finally:
        for worker in workers:
            worker.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    dnsmasq, redis_server = shutil.which("dnsmasq"), shutil.which("redis-server")
    if dnsmasq is None or redis_server is None:
        sys.exit("needs dnsmasq (apt-get install dnsmasq-base) and redis-server")
    directory = Path(tempfile.mkdtemp(prefix="balancekit-dns-"))
    dns, redis = DNSServer(dnsmasq, directory), RedisServer(redis_server)
    dns.start()
    redis.start()
    try:
        delays = change_to_pool(dns, args.changes)
        print(
            f"DNS change to a backend in the pool, over {len(delays)} changes:"
            f" median {statistics.median(delays):.2f} s, max {max(delays):.2f} s"
        )
        for label, store in (("each on its own (memory://)", "memory://"), ("Redis", redis.url)):
            count, elapsed = queries(dns, store, args.seconds)
            print(
                f"4 workers, {label}: {count} A queries in {elapsed:.1f} s"
                f" ({count / elapsed:.2f}/s; the TTL of 1 s makes a round a second)"
            )
    finally:
        dns.stop()
        redis.stop()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
