"""status.json under load, Prometheus metrics (one process and two gunicorn
workers), and the live dashboard in a real headless Chromium."""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ARTIFACTS, closed_port_url
from tests.helpers import balanced, flask_example_under_gunicorn
from tests.upstreams import NamedUpstream

DOCS = Path(__file__).parent.parent / "docs"
CONTRACT_FIELDS = {
    "url",
    "state",
    "weight",
    "active_requests",
    "requests_total",
    "failures_total",
    "latency_ewma_ms",
}


def samples(text: str, name: str) -> list[Any]:
    """Every sample of metric family ``name`` in a Prometheus text answer."""
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return list(family.samples)
    return []


def test_status_json_shape_and_counts_under_load(serve, upstreams) -> None:
    checked = {"type": "http", "path": "/", "interval": 0.2}
    server, _ = balanced(
        serve,
        [u.url for u in upstreams],
        status={"enabled": True},
        pool={"health_check": checked},
    )
    with ThreadPoolExecutor(6) as threads:
        codes = list(threads.map(lambda _: httpx.get(f"{server.url}/api/x").status_code, range(60)))
    assert codes == [200] * 60
    time.sleep(0.5)  # a health check round
    pool = httpx.get(f"{server.url}/balancekit/status.json").json()["pools"]["api"]
    assert {"algorithm", "panic", "active_requests", "retries_active", "backends"} <= set(pool)
    backends = pool["backends"]
    assert sum(b["requests_total"] for b in backends) == 60
    for backend in backends:
        assert set(backend) >= CONTRACT_FIELDS
        assert backend["state"] == "healthy" and backend["active_requests"] == 0
        assert backend["latency_p50_ms"] <= backend["latency_p99_ms"]
        assert backend["last_check"]["ok"] is True
        assert backend["state_since"] <= time.time()


def test_prometheus_counters_match_the_requests_sent(serve, upstreams) -> None:
    dead = closed_port_url()
    server, balancer = balanced(
        serve,
        [upstreams[0].url, upstreams[1].url, dead],
        strip_prefix=True,
        status={"enabled": True},
        pool={"outlier_detection": {"consecutive_failures": 1, "max_ejection_percent": 50}},
    )
    with httpx.Client(base_url=server.url) as client:
        answers = [client.get("/api/x").status_code for _ in range(12)]
        client.get("/api/status/503")
        text = client.get("/balancekit/metrics").text
    assert answers.count(200) == 12, "the refused GET was retried"
    requests = {
        (s.labels["backend"], s.labels["code"]): s.value
        for s in samples(text, "balancekit_requests")
        if s.name.endswith("_total")
    }
    by_backend = dict.fromkeys((upstreams[0].url, upstreams[1].url), 0.0)
    for (backend, code), value in requests.items():
        if code == "200":
            by_backend[backend] += value
    assert sum(by_backend.values()) == 12
    assert requests[(dead, "502")] == 1, "the refused try, counted with what it ended as"
    assert sum(v for (b, c), v in requests.items() if c == "503") == 1
    counts = [
        s for s in samples(text, "balancekit_request_duration_seconds") if s.name.endswith("_count")
    ]
    assert sum(s.value for s in counts) == 14
    retries = samples(text, "balancekit_retries")
    assert [s.value for s in retries if s.name.endswith("_total")] == [1.0]
    ejections = {
        s.labels["backend"]: s.value
        for s in samples(text, "balancekit_ejections")
        if s.name.endswith("_total")
    }
    assert ejections == {dead: 1.0}
    up = {s.labels["backend"]: s.value for s in samples(text, "balancekit_backend_up")}
    assert up[upstreams[0].url] == 1.0 and up[dead] == 0.0
    active = samples(text, "balancekit_active_requests")
    assert all(s.value == 0 for s in active)
    assert balancer.metrics is not None


def test_metrics_add_up_over_two_gunicorn_workers(upstreams, tmp_path: Path) -> None:
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    with flask_example_under_gunicorn(upstreams, tmp_path, metrics_dir) as url:
        pids: set[int] = set()
        sent = 0
        while len(pids) < 2 or sent < 30:  # new connections: both workers serve
            assert sent < 300, f"only workers {pids} answered"
            assert httpx.get(url + "/api/x").status_code == 200
            pids.add(httpx.get(url + "/workers").json()["pid"])
            sent += 1
        text = httpx.get(url + "/balancekit/metrics").text
    total = sum(s.value for s in samples(text, "balancekit_requests") if s.name.endswith("_total"))
    assert total == sent, "the metrics path adds up every worker's counts"


def test_the_dashboard_goes_live_in_chromium(serve, browser) -> None:
    a, b = NamedUpstream("a"), NamedUpstream("b")
    servers = [serve(a), serve(b)]
    checked = {"type": "http", "path": "/", "interval": 0.2, "fall": 1}
    server, _ = balanced(
        serve,
        [s.url for s in servers],
        status={"enabled": True, "token": "peek"},
        pool={"health_check": checked},
    )
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with httpx.Client(base_url=server.url) as client:
        for _ in range(40):
            client.get("/api/x")
    browser.get(f"{server.url}/balancekit/?token=peek")
    wait = WebDriverWait(browser, 10, poll_frequency=0.1)
    wait.until(lambda d: "updated" in d.find_element(By.ID, "meta").text)

    def states() -> list[str]:
        # Read in one script: the page replaces its rows on every update, so
        # elements found one call earlier may be gone (stale) by the next.
        return list(
            browser.execute_script(
                "return Array.from(document.querySelectorAll("
                "'#rows td[data-label=\"state\"]'), c => c.textContent.trim())"
            )
        )

    assert states() == ["healthy", "healthy"]
    stop = threading.Event()

    def traffic() -> None:  # for the sparklines and req/s; stops by itself
        deadline = time.monotonic() + 20
        with httpx.Client(base_url=server.url) as client:
            while not stop.is_set() and time.monotonic() < deadline:
                client.get("/api/x")
                time.sleep(0.02)

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        time.sleep(6)
        servers[1].stop()  # b goes away: the page shows it without a reload
        wait.until(lambda d: states() == ["healthy", "unhealthy"])
        time.sleep(2.5)  # one more update, with b out
    finally:
        stop.set()
        worker.join(timeout=10)
    browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))
    shutil.copy(ARTIFACTS / "dashboard.png", DOCS / "dashboard.png")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#rows svg polyline")) == 2
    browser.set_window_size(390, 844)  # a phone
    width = browser.execute_script("return document.documentElement.scrollWidth")
    assert width <= 390, "no sideways scrolling at phone width"
    browser.save_screenshot(str(ARTIFACTS / "dashboard-phone.png"))


def test_the_dashboard_reads_without_javascript(serve, upstreams) -> None:
    server, _ = balanced(serve, [upstreams[0].url], status={"enabled": True})
    page = httpx.get(f"{server.url}/balancekit/").text
    assert '<meta http-equiv="refresh" content="5">' in page  # inside <noscript>
    assert f'<td data-label="backend">{upstreams[0].url}</td>' in page
    assert '<td data-label="state">healthy</td>' in page
    assert '<td data-label="source">config</td>' in page
    assert "http://" not in page.split("<script>")[1], "nothing fetched from elsewhere"


def test_a_pool_removed_and_added_back_keeps_one_series(serve, upstreams) -> None:
    server, balancer = balanced(serve, [upstreams[0].url], status={"enabled": True})
    config = balancer.config.model_dump()
    with httpx.Client(base_url=server.url) as client:
        client.get("/api/x")
        balancer.reload({**config, "pools": {}, "routes": []})
        balancer.reload(config)
        client.get("/api/x")
        text = client.get("/balancekit/metrics").text
    ok = [
        s
        for s in samples(text, "balancekit_requests")
        if s.name.endswith("_total") and s.labels["code"] == "200"
    ]
    assert [s.value for s in ok] == [2.0], "one series, counting on"
