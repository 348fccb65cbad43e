"""The pool metrics of CONTRACT section 15: eligible backends, panic and the
queue (gauges read from the pools when ``metrics`` is scraped), and 503s for
want of a backend (a counter). Against real upstreams, in one process and
under two gunicorn workers; and the docs' Grafana dashboard names only
metrics that exist."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from balancekit import Balancer
from tests.conftest import ENGINES, closed_port_url
from tests.helpers import balanced, flask_example_under_gunicorn

DOCS = Path(__file__).parent.parent / "docs"
POOL_GAUGES = (
    "balancekit_pool_eligible_backends",
    "balancekit_pool_panic",
    "balancekit_queue_length",
)


def scrape(url: str) -> str:
    return httpx.get(f"{url}/balancekit/metrics", timeout=10).text


def by_pool(text: str, name: str) -> dict[str, float]:
    """``name``'s samples in a Prometheus text answer, by their ``pool`` label."""
    return {
        s.labels["pool"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def gauges(text: str, pool: str = "api") -> tuple[float, float, float]:
    """Eligible backends, panic and queue length of ``pool``."""
    values = tuple(by_pool(text, name).get(pool, -1.0) for name in POOL_GAUGES)
    return values[0], values[1], values[2]


def wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


# --- one process ------------------------------------------------------------------


def test_the_gauges_follow_disable_drain_and_enable(serve, upstreams) -> None:
    urls = [u.url for u in upstreams]
    server, balancer = balanced(serve, urls, status={"enabled": True})
    pool = balancer.pools["api"]
    assert gauges(scrape(server.url)) == (3, 0, 0)
    pool.disable(urls[0])
    assert gauges(scrape(server.url)) == (2, 0, 0)
    pool.drain(urls[1])
    assert gauges(scrape(server.url)) == (1, 0, 0)
    pool.enable(urls[0])
    pool.enable(urls[1])
    assert gauges(scrape(server.url)) == (3, 0, 0)
    for url in urls:
        pool.disable(url)
    assert httpx.get(f"{server.url}/api/x").status_code == 503
    assert gauges(scrape(server.url)) == (0, 0, 0), "disabled ones are out of service: no panic"


def test_an_ejection_puts_the_pool_in_panic_until_it_ends(serve, upstreams) -> None:
    dead = closed_port_url()
    outlier = {"consecutive_failures": 1, "base_ejection_time": 0.5, "max_ejection_percent": 50}
    server, balancer = balanced(
        serve,
        [upstreams[0].url, upstreams[1].url, dead],
        status={"enabled": True},
        pool={"outlier_detection": outlier, "panic_threshold": 70},
    )
    assert gauges(scrape(server.url)) == (3, 0, 0)
    with httpx.Client(base_url=server.url) as client:
        for _ in range(3):  # round robin: one of them tries the dead one
            assert client.get("/api/x").status_code == 200  # retried elsewhere
    assert balancer.pools["api"].find(dead).state.value == "ejected"  # type: ignore[union-attr]
    assert gauges(scrape(server.url)) == (2, 1, 0), "2 of 3 eligible is under 70%"
    time.sleep(0.7)
    # No request since: the scrape itself notices that the ejection is over.
    assert gauges(scrape(server.url)) == (3, 0, 0)


def in_background(url: str, results: list[int]) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.append(httpx.get(url, timeout=10).status_code))
    thread.start()
    return thread


def test_a_held_request_fills_the_queue(serve, upstreams) -> None:
    server, balancer = balanced(
        serve,
        [upstreams[0].url],
        strip_prefix=True,
        status={"enabled": True},
        pool={"max_connections": 1, "max_pending": 2, "queue_timeout": 5},
    )
    pool = balancer.pools["api"]
    results: list[int] = []
    holder = in_background(f"{server.url}/api/sleep?s=1", results)
    wait_for(lambda: pool.active_requests == 1)
    assert gauges(scrape(server.url)) == (1, 0, 0)
    waiting = [in_background(f"{server.url}/api/x", results) for _ in range(2)]
    wait_for(lambda: pool.queued == 2)
    assert gauges(scrape(server.url)) == (1, 0, 2)
    assert httpx.get(f"{server.url}/api/x").status_code == 503  # no place left in the queue
    for thread in [holder, *waiting]:
        thread.join()
    assert sorted(results) == [200, 200, 200]
    assert gauges(scrape(server.url)) == (1, 0, 0)


def two_pools(*, status: bool = True, **options: Any) -> Balancer:
    return Balancer(
        {
            "pools": {
                "api": {"backends": ["http://127.0.0.1:9001"]},
                "web": {"backends": ["http://127.0.0.1:9002"]},
            },
            "routes": [{"prefix": "/api/", "pool": "api"}, {"prefix": "/", "pool": "web"}],
            "status": {"enabled": status},
        },
        **options,
    )


def exposition(balancer: Balancer) -> str:
    assert balancer.metrics is not None
    return balancer.metrics.exposition()[0].decode()


def test_no_backend_counts_per_pool_on_a_prebuilt_child() -> None:
    balancer = two_pools()
    metrics = balancer.pools["api"].metrics
    assert metrics is not None and balancer.metrics is not None
    assert metrics.no_backends is balancer.metrics.no_backend.labels("api")
    assert by_pool(exposition(balancer), "balancekit_no_backend_total") == {"api": 0, "web": 0}
    metrics.no_backend()
    metrics.no_backend()
    assert by_pool(exposition(balancer), "balancekit_no_backend_total") == {"api": 2, "web": 0}


@pytest.mark.parametrize("engine", ENGINES)
def test_a_503_for_want_of_a_backend_is_counted(serve, upstreams, engine: str) -> None:
    server, balancer = balanced(
        serve, [u.url for u in upstreams], engine=engine, status={"enabled": True}
    )
    for upstream in upstreams:
        balancer.pools["api"].disable(upstream.url)
    assert httpx.get(f"{server.url}/api/x").status_code == 503
    assert by_pool(scrape(server.url), "balancekit_no_backend_total") == {"api": 1}


def test_a_pool_removed_by_a_reload_leaves_the_gauges() -> None:
    balancer = two_pools()
    config = balancer.config.model_dump()
    assert set(by_pool(exposition(balancer), "balancekit_queue_length")) == {"api", "web"}
    balancer.reload({**config, "pools": {"web": config["pools"]["web"]}, "routes": []})
    text = exposition(balancer)
    for name in POOL_GAUGES:
        assert set(by_pool(text, name)) == {"web"}
    balancer.reload(config)
    assert set(by_pool(exposition(balancer), "balancekit_queue_length")) == {"api", "web"}


def test_a_shared_registry_does_not_keep_a_balancer_alive() -> None:
    import gc

    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    balancer = two_pools(status=False, metrics_registry=registry)
    assert registry.get_sample_value("balancekit_pool_eligible_backends", {"pool": "api"}) == 1
    del balancer
    gc.collect()
    assert registry.get_sample_value("balancekit_pool_eligible_backends", {"pool": "api"}) is None


# --- two gunicorn workers ------------------------------------------------------------


@pytest.mark.slow
def test_the_gauges_under_two_gunicorn_workers(upstreams, tmp_path: Path) -> None:
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    with flask_example_under_gunicorn(upstreams, tmp_path, metrics_dir) as url:

        def writers() -> int:  # the workers that have written their pool gauges
            return len(list(metrics_dir.glob("gauge_livemin_*.db")))

        sent = 0
        while writers() < 2:  # new connections: both workers serve, and start
            assert sent < 300, "only one worker started its background work"
            assert httpx.get(url + "/api/x").status_code == 200
            sent += 1
        text = httpx.get(url + "/balancekit/metrics").text
        assert gauges(text) == (2, 0, 0)
        assert gauges(text, "search") == (1, 0, 0)
        assert by_pool(text, "balancekit_no_backend_total") == {"api": 0, "search": 0}
        for family in text_string_to_metric_families(text):
            if family.name in POOL_GAUGES:
                assert all("pid" not in s.labels for s in family.samples), "one value per pool"

        upstreams[1].stop()  # every worker's health checks see it go
        wait_for(lambda: gauges(httpx.get(url + "/balancekit/metrics").text) == (1, 0, 0))


# --- the docs ---------------------------------------------------------------------


def metric_names() -> set[str]:
    """Every sample name balancekit's metrics can expose, from a real scrape
    (families without samples yet still announce their name and type)."""
    balancer = two_pools()
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition(balancer)):
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_count", "_sum", "_created"),
        }.get(family.type, ("",))
        names.add(family.name)  # as the docs name a histogram
        names.update(family.name + suffix for suffix in suffixes)
        names.update(s.name for s in family.samples)
    return names


def expressions(node: Any) -> Iterator[str]:
    """Every PromQL string of a Grafana dashboard: targets' ``expr`` and
    template variables' ``query``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, str | dict):
                yield value if isinstance(value, str) else value.get("query", "")
            else:
                yield from expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from expressions(item)


def test_the_grafana_dashboard_names_only_balancekit_metrics_that_exist() -> None:
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    exprs = [e for e in expressions(dashboard) if e]
    assert len(exprs) >= 8
    known = metric_names()
    named: set[str] = set()
    for expr in exprs:
        # A selector is a name before { or [ (functions are followed by "(").
        for selector in re.findall(r"([A-Za-z_:][\w:]*)\s*[{\[]", expr):
            assert selector.startswith("balancekit_"), f"not balancekit's: {selector} in {expr}"
        named.update(re.findall(r"balancekit_\w+", expr))
    assert named, "the dashboard shows balancekit's metrics"
    assert named <= known, f"no such metrics: {sorted(named - known)}"
    assert set(POOL_GAUGES) | {"balancekit_no_backend_total"} <= named


def test_the_observability_docs_name_metrics_that_exist() -> None:
    named = set(re.findall(r"balancekit_\w+", (DOCS / "observability.md").read_text()))
    assert set(POOL_GAUGES) | {"balancekit_no_backend_total"} <= named
    assert named <= metric_names(), f"no such metrics: {sorted(named - metric_names())}"
