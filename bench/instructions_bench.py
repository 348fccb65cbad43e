"""Instructions per proxied request, counted by callgrind: a steady yardstick.

On a shared 2-core VM, requests/s and CPU time move by 10-30 % between
identical runs (bench/README.md). Instructions executed do not: valgrind's
callgrind counts them exactly, whatever else the machine does. This script
runs ``balancekit serve`` (on its lean server, and with ``--server
uvicorn``), the lean Python proxy (bench/lean_proxy.py: the ceiling for
Python) and NGINX (one process, ``master_process off``) under callgrind
in front of the same three NGINX static backends, turns
instrumentation on only after a warm-up, sends the same sequential
keep-alive requests to each, and reports instructions per request (user
space: the kernel's share of the socket work is not counted) and the ratio.

    .venv/bin/python bench/instructions_bench.py              # 1,000 requests each
    .venv/bin/python bench/instructions_bench.py --requests 3000
    .venv/bin/python bench/instructions_bench.py --ladder     # what each feature of serve costs

``--ladder`` measures ``balancekit serve`` again with its features taken
away one at a time (the status page and metrics, then the request id,
then the health checks), so the difference between two rungs is what
that feature costs a request.

Needs valgrind and nginx (apt-get install valgrind nginx). Under valgrind,
Python runs ~50x slower: expect a minute or two.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy_bench as pb

REQUEST = b"GET /bench?q=1 HTTP/1.1\r\nHost: bench\r\n\r\n"


def send(port: int, count: int) -> None:
    """``count`` requests, one after another, 500 per keep-alive connection
    (NGINX closes a client connection after 1,000 by default)."""
    for start in range(0, count, 500):
        _send_on_one(port, min(500, count - start))


def _send_on_one(port: int, count: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        for _ in range(count):
            sock.sendall(REQUEST)
            data = b""
            while True:
                head, sep, body = data.partition(b"\r\n\r\n")
                if sep:
                    found = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
                    length = int(found.group(1)) if found else None
                    if length is not None and len(body) >= length:
                        break
                    if found is None and body.endswith(b"0\r\n\r\n"):
                        break
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError("the proxy closed the connection")
                data += chunk
            if not data.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"the proxy answered {data[:100]!r}")


def wait_until_answering(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            send(port, 1)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"nothing answers on port {port} after {timeout} s")


def total_instructions(out_dir: Path) -> int:
    total = 0
    for path in out_dir.glob("callgrind.out.*"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    return total


def measure(name: str, command: list[str], port: int, requests: int, work: Path) -> int:
    """Instructions per request of ``command`` (started under callgrind)."""
    out_dir = work / name.replace(" ", "-")
    out_dir.mkdir()
    valgrind = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", "--trace-children=no",
        f"--callgrind-out-file={out_dir}/callgrind.out.%p",
    ]  # fmt: skip
    process = subprocess.Popen(
        [*valgrind, *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until_answering(port, process, timeout=180)
        send(port, max(requests // 3, 100))  # warm up: pools, caches, specialisation
        control = ["callgrind_control"]
        subprocess.run([*control, "-i", "on", str(process.pid)], check=True, capture_output=True)
        send(port, requests)
        subprocess.run([*control, "-i", "off", str(process.pid)], check=True, capture_output=True)
        subprocess.run([*control, "-d", str(process.pid)], check=True, capture_output=True)
    finally:
        pb.stop([process])
    per_request = total_instructions(out_dir) / requests
    print(f"{name:18} {per_request:12,.0f} instructions per request", file=sys.stderr)
    return round(per_request)


#: (name, what comes out of the configuration) for --ladder: each rung also
#: lacks what the rungs above it lack.
LADDER = (
    ("- status, metrics", lambda text: re.sub(r"(?ms)^\[status\]\n.*?(?=^\[|\Z)", "", text)),
    ("- request id", lambda text: 'request_id = ""\n' + text),
    ("- health check", lambda text: re.sub(r"(?m)^health_check = .*\n", "", text)),
)


def ladder(config: Path, urls: list[str], requests: int, work: Path) -> list[tuple[str, int]]:
    """``balancekit serve`` with its features taken away one at a time."""
    text = config.read_text()
    rungs = []
    for name, take_away in LADDER:
        text = take_away(text)
        rung = work / f"ladder-{len(rungs)}.toml"
        rung.write_text(text)
        port = pb.free_port()
        command = [sys.executable, "-m", "balancekit", "serve", str(rung), "--port", str(port)]
        rungs.append((f"serve {name}", measure(f"serve {name}", command, port, requests, work)))
    return rungs


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="measured requests (1000)")
    parser.add_argument(
        "--ladder", action="store_true", help="also serve without status, request id, checks"
    )
    args = parser.parse_args()
    binary = pb.nginx_binary()
    if shutil.which("valgrind") is None or binary is None:
        sys.exit("needs valgrind and nginx: apt-get install valgrind nginx")
    work = Path(tempfile.mkdtemp(prefix="balancekit-instructions-", dir="/tmp"))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        ports = [pb.free_port() for _ in range(pb.N_BACKENDS)]
        processes.append(pb.start_nginx(binary, 0, ports, work / "backends", static=True))
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        config = work / "serve.toml"
        pb.write_serve_config(config, urls)
        serve_port = pb.free_port()
        serve = [sys.executable, "-m", "balancekit", "serve", str(config)]
        serve += ["--port", str(serve_port)]
        nginx_port = pb.free_port()
        prefix = work / "proxy"
        prefix.mkdir()
        conf = prefix / "nginx.conf"
        conf.write_text("master_process off;\n" + pb.nginx_config(nginx_port, ports, prefix))
        nginx = [binary, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf),
                 "-g", "daemon off;"]  # fmt: skip
        on_uvicorn_port = pb.free_port()
        on_uvicorn = [*serve[:-1], str(on_uvicorn_port), "--server", "uvicorn"]
        lean_port = pb.free_port()
        lean = [sys.executable, str(Path(__file__).resolve().parent / "lean_proxy.py")]
        lean += ["--port", str(lean_port), "--backends", ",".join(urls)]
        ours = measure("balancekit serve", serve, serve_port, args.requests, work)
        uvicorn = measure("serve on uvicorn", on_uvicorn, on_uvicorn_port, args.requests, work)
        ceiling = measure("lean Python proxy", lean, lean_port, args.requests, work)
        theirs = measure("nginx", nginx, nginx_port, args.requests, work)
        rungs = ladder(config, urls, args.requests, work) if args.ladder else []
    finally:
        pb.stop(processes)
        shutil.rmtree(work, ignore_errors=True)
    runs = (
        ("balancekit serve", ours),
        ("serve --server uvicorn", uvicorn),
        ("lean Python proxy", ceiling),
        *rungs,
    )
    for name, count in runs:
        print(
            f"{name}: {count:,} instructions per request = {count / theirs:.1f}x NGINX's"
            f" {theirs:,}, {count / ceiling:.2f}x the lean Python proxy's"
        )


if __name__ == "__main__":
    main()
