"""The ``balancekit`` command: serve, check, plugins, demo."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import click

from ._balancer import Balancer
from ._exceptions import ConfigError, PluginError
from ._plugins import KIND_HOOKS, make_plugin_manager
from ._supervisor import ready_for_signals


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Rows as aligned, space-separated columns under a header line."""
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def status_table(balancer: Balancer) -> str:
    """Every pool's backends with their live state, as ``balancekit`` commands print them."""
    return pools_table(balancer.status()["pools"])


def pools_table(pools: dict[str, Any]) -> str:
    """status.json's ``pools`` object as a table, one row per backend."""
    rows = []
    for name, pool in pools.items():
        for b in pool["backends"]:
            latency = "-" if b["latency_ewma_ms"] is None else f"{b['latency_ewma_ms']:.1f}"
            rows.append(
                (
                    name,
                    pool["algorithm"],
                    b["url"],
                    b["state"],
                    b["weight"],
                    b["active_requests"],
                    b["requests_total"],
                    b["failures_total"],
                    latency,
                )
            )
    headers = (
        "pool",
        "algorithm",
        "backend",
        "state",
        "weight",
        "in flight",
        "requests",
        "failures",
        "latency ms",
    )
    return table(headers, rows)


def _load(config: Any) -> Balancer:
    try:
        return Balancer(config)
    except (ConfigError, PluginError) as exc:
        click.echo(f"balancekit: invalid configuration:\n{exc}", err=True)
        sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="balancekit")
def cli() -> None:
    """balancekit: a load balancer for Python web apps."""


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio turns Nagle off (TCP_NODELAY)
    # only on accepted sockets whose proto says TCP. Without it, a response
    # written as headers then body waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


class _Stop(Exception):
    """SIGTERM, turned into an exception like SIGINT's KeyboardInterrupt."""


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal
    # again for the handler that was there before it. Ours turns that into a
    # clean exit (status 0) instead of death by signal.
    def stop(signum: int, frame: object) -> None:
        raise _Stop

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def _server(app: Any, **options: Any) -> Any:
    import uvicorn

    # proxy_headers off: X-Forwarded-* are judged by trusted_proxies, not by uvicorn.
    options = {
        "http": "balancekit.uvicorn:HttpToolsProtocol",  # drops request trailers
        "lifespan": "on",
        "log_level": "warning",
        "access_log": False,
        "proxy_headers": False,
        **options,
    }
    return uvicorn.Server(uvicorn.Config(app, **options))


@cli.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--host", help="Address to listen on. [default: [serve] host, or 127.0.0.1]")
@click.option("--port", type=int, help="Port to listen on. [default: [serve] port, or 8000]")
@click.option(
    "--backend",
    "backends",
    multiple=True,
    metavar="URL",
    help="A backend; every path goes to one pool of these. Repeatable.",
)
@click.option(
    "--algorithm",
    default="round_robin",
    show_default=True,
    help="The algorithm for --backend pools.",
)
@click.option(
    "--server",
    "server_kind",
    type=click.Choice(["balancekit", "uvicorn"]),
    default="balancekit",
    show_default=True,
    help="balancekit's lean HTTP/1.1 server, or uvicorn's.",
)
@click.option(
    "--certfile",
    type=click.Path(exists=True, dir_okay=False),
    help="Serve HTTPS: the certificate chain (PEM). Needs --keyfile.",
)
@click.option(
    "--keyfile",
    type=click.Path(exists=True, dir_okay=False),
    help="The private key (PEM) of --certfile.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Worker processes sharing the port; above 1 needs a shared store."
    " [default: [serve] workers, or 1]",
)
@click.option(
    "--proxy-protocol",
    is_flag=True,
    help="Read a PROXY protocol header (v1 or v2) first on every connection:"
    " behind an L4 balancer, the client's address is the one it names.",
)
def serve(
    config: str | None,
    host: str | None,
    port: int | None,
    backends: tuple[str, ...],
    algorithm: str,
    server_kind: str,
    certfile: str | None,
    keyfile: str | None,
    workers: int | None,
    proxy_protocol: bool,
) -> None:
    """Run a standalone balancer for CONFIG, or for --backend URLs."""
    from .asgi import BalanceMiddleware, not_found

    if config and backends:
        raise click.UsageError("give a CONFIG file or --backend URLs, not both")
    if not config and not backends:
        raise click.UsageError("give a CONFIG file or at least one --backend URL")
    if bool(certfile) != bool(keyfile):
        raise click.UsageError("--certfile and --keyfile go together")
    source: Any = config or {
        "pools": {"default": {"backends": list(backends), "algorithm": algorithm}},
        "routes": [{"prefix": "/", "pool": "default"}],
    }
    balancer = _load(source)
    # The command line wins over [serve]; [serve]'s files are relative to
    # the configuration file, as its other paths would be.
    settings = balancer.config.serve
    if not certfile and settings.certfile and settings.keyfile:
        here = Path(config).parent if config else Path()
        certfile, keyfile = str(here / settings.certfile), str(here / settings.keyfile)
    proxy_protocol = proxy_protocol or settings.proxy_protocol
    if proxy_protocol and server_kind != "balancekit":
        # uvicorn reads no PROXY header: it would parse one as a request.
        raise click.UsageError("--proxy-protocol needs the balancekit server (not uvicorn)")
    asked = f"--workers {workers}" if workers else f"[serve] workers = {settings.workers}"
    workers = workers or settings.workers
    if workers > 1 and balancer.config.store.startswith("memory:"):
        raise click.UsageError(
            f"{asked} needs a shared store: with {balancer.config.store!r} each"
            " worker would keep its own health checks, sticky pins and runtime changes."
            ' Set store = "redis://HOST:6379/0" in the configuration, or run one worker.'
        )
    tls = _server_tls(certfile, keyfile) if certfile and keyfile else None
    sock = _bind(host or settings.host, settings.port if port is None else port)
    url = _url(sock).replace("http://", "https://", 1) if tls else _url(sock)
    click.echo(f"balancekit serving on {url} (Ctrl-C to stop)")
    for name, pool in balancer.pools.items():
        click.echo(f"  pool {name}: {len(pool.backends)} backends, {pool.algorithm.name}")
    if balancer.config.access_log:
        _print_access_log()

    def run(worker: str = "") -> None:
        """One process's serving, until SIGTERM or SIGINT."""
        app: Any = BalanceMiddleware(not_found, balancer=balancer)
        if balancer.config.tracing:
            from ._tracing import ServerSpan

            app = ServerSpan(app)  # no app here to open the request's span
        reload = _reloader(balancer, config, worker)
        if server_kind == "uvicorn":
            previous = signal.signal(signal.SIGHUP, lambda signum, frame: reload())
            files = {"ssl_certfile": certfile, "ssl_keyfile": keyfile} if tls else {}
            try:
                with _stopped_by_signals():
                    ready_for_signals()
                    _server(app, **files).run(sockets=[sock])
            finally:
                signal.signal(signal.SIGHUP, previous)
        else:
            _run_lean(app, sock, reload, tls, proxy_protocol)

    if workers == 1:
        run()
    else:
        _supervise(workers, run, balancer, config)
    click.echo("balancekit stopped")


def _supervise(
    workers: int, run: Callable[[str], None], balancer: Balancer, path: str | None
) -> None:
    """``--workers N``: fork N processes that serve the socket already bound,
    and look after them until SIGTERM or SIGINT (see balancekit/_supervisor.py).
    A worker started later, after a crash or a reload, forks from
    ``balancer`` as the supervisor last reloaded it."""
    from ._supervisor import Supervisor

    def work() -> int:
        if balancer.admin_endpoint is not None:
            # POST reload reaches one worker: the supervisor tells them all.
            supervisor_pid = os.getppid()
            balancer.admin_endpoint.after_reload = lambda: os.kill(supervisor_pid, signal.SIGHUP)
        run(f"worker {os.getpid()}: ")
        return 0

    def reload() -> bool:
        # Never started here: the supervisor's copy only checks the file and
        # keeps it for the workers it starts later.
        return path is not None and _reload_file(balancer, path, "supervisor: ")

    click.echo(f"  {workers} workers")
    supervisor = Supervisor(
        workers, work, reload=reload, say=lambda line: click.echo(line, err=True)
    )
    if supervisor.run() != 0:
        sys.exit(1)


def _reloader(balancer: Balancer, path: str | None, who: str = "") -> Callable[[], None]:
    """What SIGHUP does: read the configuration file again and apply it with
    ``Balancer.reload`` (unchanged pools keep their live state, requests in
    flight finish, the listening socket stays), in a thread of its own so
    that the signal never runs it in the middle of the loop's work."""

    def reload() -> None:
        if path is None:
            click.echo("SIGHUP: nothing to reload (serving --backend URLs, no file)", err=True)
            return
        threading.Thread(
            target=_reload_file, args=(balancer, path, who), name="balancekit-reload", daemon=True
        ).start()

    return reload


def _reload_file(balancer: Balancer, path: str, who: str = "") -> bool:
    """Apply the file at ``path`` to ``balancer``; a bad file leaves the
    running configuration and says why. True when it was applied."""
    try:
        balancer.reload(path)
    except (ConfigError, PluginError) as exc:
        click.echo(f"{who}reload of {path} refused, the running configuration stays:", err=True)
        click.echo(str(exc), err=True)
        return False
    click.echo(f"{who}configuration reloaded from {path}")
    return True


def _print_access_log() -> None:
    """The access log's lines (text or JSON) on standard output, one per
    request, as NGINX's access_log /dev/stdout: a standalone balancer has no
    app to configure logging for it."""
    access = logging.getLogger("balancekit.access")
    if access.handlers:  # configured by whoever embeds the command
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False


def _server_tls(certfile: str, keyfile: str) -> ssl.SSLContext:
    """TLS for clients: the standard library's server defaults, TLS 1.2 or
    newer, ALPN offering HTTP/1.1 (the only protocol served). A key that
    does not match its certificate fails here, at start-up."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise click.UsageError(f"--certfile/--keyfile: {exc}") from None
    return context


def _run_lean(
    app: Any,
    sock: socket.socket,
    reload: Callable[[], None],
    tls: ssl.SSLContext | None,
    proxy_protocol: bool,
) -> None:
    """Serve ``app`` on the lean server until SIGINT or SIGTERM, then drain;
    SIGHUP calls ``reload``."""
    from ._server import LeanServer

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload)
        ready_for_signals()  # under --workers: what came while starting
        server = LeanServer(app, tls, proxy_protocol=proxy_protocol)
        await server.start([sock])
        await stop.wait()
        await server.shutdown()

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())


class _AdminClient:
    """``balancekit ctl``'s side of the admin API: one request, JSON back,
    a problem's detail and exit status 1 on any error."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url if url.endswith("/") else url + "/"
        self.token = token

    def call(self, method: str, *path: str, body: dict[str, Any] | None = None) -> Any:
        from urllib.parse import quote

        import httpx

        url = self.url + "/".join(quote(part, safe="") for part in path)
        headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            response = httpx.request(method, url, json=body, headers=headers, timeout=10)
        except httpx.HTTPError as exc:
            raise click.ClickException(f"{url}: {exc}") from None
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if response.is_error:
            detail = answer.get("detail") if isinstance(answer, dict) else None
            click.echo(
                f"balancekit ctl: {response.status_code}: {detail or response.text}", err=True
            )
            sys.exit(1)
        return answer


@cli.group()
@click.option(
    "--url",
    envvar="BALANCEKIT_URL",
    default="http://127.0.0.1:8000/balancekit/api/",
    show_default=True,
    help="The admin API's URL ([admin] path included). Env: BALANCEKIT_URL.",
)
@click.option(
    "--token", envvar="BALANCEKIT_TOKEN", default="", help="[admin] token. Env: BALANCEKIT_TOKEN."
)
@click.pass_context
def ctl(context: click.Context, url: str, token: str) -> None:
    """Change a running balancer through its admin API ([admin] enabled)."""
    context.obj = _AdminClient(url, token)


def _backend_row(backend: dict[str, Any], pool: str) -> str:
    return pools_table({pool: {"algorithm": "-", "backends": [backend]}})


@ctl.command("status")
@click.pass_obj
def ctl_status(client: _AdminClient) -> None:
    """Every pool's backends with their live state."""
    click.echo(pools_table(client.call("GET", "pools")))


@ctl.command("add")
@click.argument("pool")
@click.argument("backend")
@click.option("--weight", type=int, default=1, show_default=True)
@click.option("--backup", is_flag=True, help="Only when no primary backend can take a request.")
@click.pass_obj
def ctl_add(client: _AdminClient, pool: str, backend: str, weight: int, backup: bool) -> None:
    """Add BACKEND (a URL) to POOL."""
    body = {"url": backend, "weight": weight, "backup": backup}
    click.echo(_backend_row(client.call("POST", "pools", pool, "backends", body=body), pool))


def _backend_action(action: str, summary: str) -> None:
    @ctl.command(action, help=summary)
    @click.argument("pool")
    @click.argument("backend")
    @click.pass_obj
    def command(client: _AdminClient, pool: str, backend: str) -> None:
        if action == "remove":
            client.call("DELETE", "pools", pool, "backends", backend)
            click.echo(f"{backend} leaves {pool} once its requests in flight finish")
            return
        answer = client.call("POST", "pools", pool, "backends", backend, action)
        click.echo(_backend_row(answer, pool))


_backend_action("remove", "Remove BACKEND from POOL (requests in flight finish).")
_backend_action("drain", "No new requests to BACKEND; those in flight finish.")
_backend_action("disable", "No traffic at all to BACKEND.")
_backend_action("enable", "Undo drain and disable.")


@ctl.command("weight")
@click.argument("pool")
@click.argument("backend")
@click.argument("weight", type=int)
@click.pass_obj
def ctl_weight(client: _AdminClient, pool: str, backend: str, weight: int) -> None:
    """Set BACKEND's weight in POOL."""
    answer = client.call(
        "PUT", "pools", pool, "backends", backend, "weight", body={"weight": weight}
    )
    click.echo(_backend_row(answer, pool))


@ctl.command("reload")
@click.pass_obj
def ctl_reload(client: _AdminClient) -> None:
    """Read the balancer's configuration file again and apply it."""
    client.call("POST", "reload")
    click.echo("configuration reloaded")


async def _check_round(balancer: Balancer) -> list[tuple[str, str, str, str]]:
    from .health.tcp import TCPHealthCheck

    rows = []
    for name, pool in balancer.pools.items():
        check_config = balancer.config.pools[name].health_check
        health = balancer._health.get(name)
        check: Any = health[0](**health[1]) if health else TCPHealthCheck(timeout=2.0)
        kind = check_config.type if health else "tcp"
        try:
            results = await asyncio.gather(*(check.check(b) for b in pool.backends))
        finally:
            await check.aclose()
        for backend, ok in zip(pool.backends, results, strict=True):
            rows.append((name, backend.url, kind, "ok" if ok else "FAILED"))
    return rows


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
def check(config: str) -> None:
    """Validate CONFIG and run one round of health checks."""
    balancer = _load(config)
    rows = asyncio.run(_check_round(balancer))
    click.echo(f"{config}: configuration is valid")
    if rows:
        click.echo(table(("pool", "backend", "check", "result"), rows))
    failed = sum(1 for row in rows if row[3] != "ok")
    if failed:
        click.echo(f"{failed} of {len(rows)} backends failed their check", err=True)
        sys.exit(1)


@cli.command()
def plugins() -> None:
    """List every algorithm, health check, persistence type, store and discovery type."""
    manager = make_plugin_manager()
    rows = []
    for kind in KIND_HOOKS:
        try:
            classes = manager.classes(kind)
        except PluginError as exc:
            click.echo(f"balancekit: {exc}", err=True)
            continue
        for name, (_, dist) in sorted(classes.items()):
            rows.append((kind, name, dist))
    click.echo(table(("kind", "name", "provided by"), rows))
    for name, error in manager.failed:
        click.echo(f"plugin {name!r} failed to load: {type(error).__name__}: {error}", err=True)


#: The simulator's built-in scenarios, listed without importing it.
_SCENARIO_NAMES = [
    "uniform",
    "slow-backend",
    "flaky-backend",
    "heterogeneous",
    "hot-keys",
    "bursty",
    "gray-failure",
]


@cli.command()
@click.option(
    "--scenario",
    default="slow-backend",
    show_default=True,
    type=click.Choice(_SCENARIO_NAMES),
    help="A built-in workload.",
)
@click.option(
    "--scenario-file",
    type=click.Path(dir_okay=False, exists=True),
    help="A TOML file describing your own fleet (see docs/choosing-an-algorithm.md).",
)
@click.option("--algorithms", help="Comma-separated names (default: every registered one).")
@click.option("--requests", default=100_000, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--load",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Arrival rate as a share of the fleet's capacity (default: the scenario's).",
)
@click.option("--seed", default=1, show_default=True, type=int)
@click.option(
    "--balancers",
    type=click.IntRange(min=1),
    help="Independent balancers sharing the backends, each seeing only its own"
    " traffic. [default: the scenario's, or 1]",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG plot here.")
def simulate(
    scenario: str,
    scenario_file: str | None,
    algorithms: str | None,
    requests: int,
    load: float | None,
    seed: int,
    balancers: int | None,
    as_json: bool,
    plot: str | None,
) -> None:
    """Simulate a workload against every algorithm, with no network: which one to choose?"""
    from . import simulate as sim

    try:
        model = sim.load_scenario(scenario_file) if scenario_file else sim.SCENARIOS[scenario]
    except ConfigError as exc:
        click.echo(f"balancekit: invalid scenario:\n{exc}", err=True)
        sys.exit(1)
    registered = {n: c for n, (c, _) in make_plugin_manager().classes("algorithm").items()}
    chosen = registered
    if algorithms:
        wanted = [a.strip() for a in algorithms.split(",") if a.strip()]
        unknown = [a for a in wanted if a not in registered]
        if unknown:
            known = ", ".join(sorted(registered))
            click.echo(
                f"balancekit: unknown algorithm {', '.join(unknown)} (known: {known})", err=True
            )
            sys.exit(1)
        chosen = {a: registered[a] for a in wanted}
    runnable, skipped = sim.buildable(model, chosen)
    for name, reason in skipped.items():
        click.echo(
            f"skipped {name}: {reason} (give its options in a scenario file's [algorithms.{name}])",
            err=True,
        )
    if not runnable:
        click.echo("balancekit: no algorithm to simulate", err=True)
        sys.exit(1)
    report = sim.run(model, runnable, requests=requests, load=load, seed=seed, balancers=balancers)
    if plot:
        try:
            sim.plot(report, plot)
        except ImportError:
            click.echo(
                "balancekit: --plot needs matplotlib: pip install 'balancekit[plot]'", err=True
            )
            sys.exit(1)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    results = report["algorithms"]
    order = sorted(results, key=lambda n: (results[n]["p99_ms"], results[n]["mean_ms"]))
    rows = [
        (
            name,
            f"{results[name]['p50_ms']:.1f}",
            f"{results[name]['p95_ms']:.1f}",
            f"{results[name]['p99_ms']:.1f}",
            f"{results[name]['mean_ms']:.1f}",
            f"{results[name]['error_rate']:.2%}",
            f"{results[name]['max_share_ratio']:.2f}",
        )
        for name in order
    ]
    several = f", {report['balancers']} balancers" if "balancers" in report else ""
    click.echo(f"{model.name}: {model.description}; {requests:,} requests, seed {seed}{several}")
    headers = ("algorithm", "p50 ms", "p95 ms", "p99 ms", "mean ms", "errors", "max share")
    click.echo(table(headers, rows))
    click.echo(sim.recommend(report))
    if plot:
        click.echo(f"plot written to {plot}")


@contextlib.contextmanager
def _sockets(count: int, host: str = "127.0.0.1") -> Iterator[list[socket.socket]]:
    socks = [_bind(host, 0) for _ in range(count)]
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


@cli.command()
@click.option("--port", default=8000, show_default=True, type=int, help="The balancer's port.")
def demo(port: int) -> None:
    """Three demo backends of different speed, a balancer and its status page."""
    from . import _demo

    with _sockets(3) as backend_socks:
        balancer_sock = _bind("127.0.0.1", port)
        urls = [_url(s).rstrip("/") for s in backend_socks]
        balancer = _load(_demo.config(urls))
        base = _url(balancer_sock)
        click.echo(f"balancer:  {base}")
        click.echo(f"dashboard: {base}balancekit/")
        for (name, delay), url in zip(_demo.BACKENDS, urls, strict=True):
            click.echo(f"  backend {name}: {url} (answers in about {delay * 1000:.0f} ms)")
        click.echo("Ctrl-C to stop")
        with _stopped_by_signals():
            asyncio.run(_demo.run(balancer, balancer_sock, backend_socks, _server))
        click.echo("demo stopped")


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="balancekit")
