"""A fault-injecting TCP relay to put between a balancer and one backend.

``FaultRelay(port)`` listens on 127.0.0.1 and relays every connection to
the backend on ``port``; ``relay.mode`` can be changed while it runs and
applies to the bytes the backend sends back:

- ``"pass"``: relayed as they come;
- ``"latency"``: each part held ``delay`` seconds first;
- ``"trickle"``: one byte every ``delay`` seconds;
- ``"reset"``: the connection reset (RST) once ``after`` bytes went out;
- ``"close"``: closed cleanly once ``after`` bytes went out;
- ``"blackhole"``: the request is read and nothing ever answers (a backend
  whose host stopped answering: connections open, replies never come).

``received`` counts request bytes taken from the balancer; ``open`` is the
number of client connections held now.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading


class FaultRelay:
    def __init__(self, port: int) -> None:
        self.target = port
        self.mode = "pass"
        self.delay = 0.05
        self.after = 0
        self.open = 0
        self.received = 0
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("fault relay did not start")
        self.url = f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        self.loop.run_until_complete(self._main())
        self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()
            server.close()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.open += 1
        upstream_w: asyncio.StreamWriter | None = None
        try:
            upstream_r, upstream_w = await asyncio.open_connection("127.0.0.1", self.target)
            up = asyncio.ensure_future(self._requests(client_r, upstream_w))
            try:
                await self._responses(upstream_r, client_w)
            finally:
                up.cancel()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            for writer in (client_w, upstream_w):
                if writer is not None:
                    writer.close()

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            self.received += len(data)
            if self.mode == "blackhole":
                continue  # taken, never passed on
            writer.write(data)
            await writer.drain()
        writer.close()

    async def _responses(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sent = 0
        while data := await reader.read(65536):
            mode = self.mode
            if mode == "latency":
                await asyncio.sleep(self.delay)
            elif mode in ("reset", "close") and sent + len(data) > self.after:
                writer.write(data[: max(self.after - sent, 0)])
                await writer.drain()
                if mode == "reset":
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort() if mode == "reset" else writer.close()
                return
            elif mode == "trickle":
                for i in range(len(data)):
                    writer.write(data[i : i + 1])
                    await writer.drain()
                    await asyncio.sleep(self.delay)
                sent += len(data)
                continue
            sent += len(data)
            writer.write(data)
            await writer.drain()

    def close(self) -> None:
        if self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=5)
