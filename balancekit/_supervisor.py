"""``balancekit serve --workers N``: one process that binds, N that serve.

The supervisor binds the listening socket once and forks the workers, which
all accept from it. One shared accept queue (as NGINX without ``reuseport``,
and gunicorn) rather than a socket per worker with SO_REUSEPORT: when a
worker dies, the connections waiting in the queue are taken by the others,
where a socket of its own would have taken its queue down with it. Only the
connections the dead worker had accepted are lost.

The supervisor never serves and starts no thread and no event loop, so a
fork copies nothing half-done: each worker builds its own loop, connections
and health checks from the configuration the supervisor holds. It restarts
a worker that exits without being asked to, at once the first time and with
a doubling back-off while it keeps dying young, so a crash loop does not
spin. SIGTERM and SIGINT stop every worker gracefully (each drains as a
single ``serve`` does); SIGHUP reloads the supervisor's copy of the file
and, when it is valid, tells every worker to reload too.

Workers sit in a process group of their own, so a Ctrl-C at a terminal
reaches the supervisor only, which then stops them once (a second signal
would make uvicorn give up on requests in flight). Each worker holds the
read end of a pipe whose write end only the supervisor has: when the
supervisor dies, even by SIGKILL, the workers see the pipe close and stop.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

#: A worker that dies sooner than this after it started counts as crashing.
MIN_UPTIME = 5.0
#: The first back-off after a crash, doubling up to BACKOFF_MAX.
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
#: How long a graceful stop may take (a worker drains for up to 30 s) before
#: the workers still running are killed.
STOP_GRACE = 35.0

_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass
class _Slot:
    """One of the N places a worker runs in, and its history."""

    index: int
    pid: int = 0
    started: float = 0.0
    #: Deaths in a row, each within MIN_UPTIME of its start.
    crashes: int = 0
    #: When a dead worker is started again (monotonic), or 0 when not due.
    restart_at: float = 0.0


def describe_exit(status: int) -> str:
    """``os.waitpid``'s status in words: "exited with status 1", "killed by SIGKILL"."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def backoff(crashes: int) -> float:
    """Seconds to wait before starting a worker that died young ``crashes``
    times in a row: none the first time (a worker killed from outside comes
    back at once), then BACKOFF_FIRST, doubling up to BACKOFF_MAX."""
    if crashes <= 1:
        return 0.0
    return float(min(BACKOFF_FIRST * 2 ** (crashes - 2), BACKOFF_MAX))


class Supervisor:
    """Runs ``work`` in ``count`` forked workers until told to stop.

    ``work`` runs in the child and returns its exit status. ``reload`` runs
    in the supervisor on SIGHUP and returns whether the workers should be
    told (False when the new file is invalid: the workers keep theirs).
    ``say`` prints one line for the operator.
    """

    def __init__(
        self,
        count: int,
        work: Callable[[], int],
        *,
        reload: Callable[[], bool],
        say: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if count < 1:
            raise ValueError(f"count: must be at least 1, got {count!r}")
        self.count = count
        self.work = work
        self.reload = reload
        self.say = say
        self.clock = clock
        self.slots = [_Slot(index) for index in range(1, count + 1)]
        self.stopping = False
        self._lifeline_read = self._lifeline_write = -1
        self._wake: tuple[socket.socket, socket.socket] | None = None

    # --- the supervisor's side ----------------------------------------------------------

    def run(self) -> int:
        """Start the workers and look after them; 0 once all stopped gracefully."""
        wake_read, wake_write = self._wake = socket.socketpair()
        wake_read.setblocking(False)
        wake_write.setblocking(False)
        self._lifeline_read, self._lifeline_write = os.pipe()
        # With a handler of our own for each signal and the wakeup fd set,
        # every signal lands in wake_read as one byte (its number), and the
        # loop below handles it between selects rather than in a handler.
        previous = {s: signal.signal(s, _noted) for s in (*_FORWARDED, signal.SIGCHLD)}
        previous_fd = signal.set_wakeup_fd(wake_write.fileno())
        try:
            for slot in self.slots:
                self._start(slot)
            return self._watch(wake_read)
        finally:
            signal.set_wakeup_fd(previous_fd)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            wake_read.close()
            wake_write.close()
            os.close(self._lifeline_read)
            os.close(self._lifeline_write)

    def _watch(self, wake: socket.socket) -> int:
        stop_deadline = 0.0
        clean = True
        while True:
            now = self.clock()
            due = [slot.restart_at for slot in self.slots if slot.restart_at]
            if self.stopping:
                due.append(stop_deadline)
            timeout = max(0.0, min(due) - now) if due else None
            ready, _, _ = select.select([wake], [], [], timeout)
            signums = wake.recv(256) if ready else b""
            for signum in signums:
                if signum in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
                    self.stopping = True
                    stop_deadline = self.clock() + STOP_GRACE
                    self._tell(signal.SIGTERM)
                elif signum == signal.SIGHUP and not self.stopping and self.reload():
                    self._tell(signal.SIGHUP)
            clean = self._reap() and clean
            if self.stopping:
                if not any(slot.pid for slot in self.slots):
                    return 0 if clean else 1
                if self.clock() >= stop_deadline:
                    self.say("workers still running after the grace period: killed")
                    self._tell(signal.SIGKILL)
                    stop_deadline = self.clock() + 5.0
                    clean = False
                continue
            now = self.clock()
            for slot in self.slots:
                if slot.restart_at and now >= slot.restart_at:
                    slot.restart_at = 0.0
                    self._start(slot)

    def _reap(self) -> bool:
        """Collect every worker that exited; False when one failed during a stop."""
        clean = True
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return clean
            if pid == 0:
                return clean
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            slot.pid = 0
            if self.stopping:
                clean = clean and os.waitstatus_to_exitcode(status) == 0
                continue
            young = self.clock() - slot.started < MIN_UPTIME
            slot.crashes = slot.crashes + 1 if young else 0
            delay = backoff(slot.crashes)
            slot.restart_at = self.clock() + delay
            self.say(
                f"worker {slot.index} (pid {pid}) {describe_exit(status)}; "
                f"starting another in {delay:.1f} s"
            )

    def _tell(self, signum: int) -> None:
        for slot in self.slots:
            if slot.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signum)

    def _start(self, slot: _Slot) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        # The child is born with these signals blocked, and unblocks them
        # once its server's handlers are in place (ready_for_signals): a
        # SIGHUP or SIGTERM in between waits instead of killing it, and
        # none can reach the supervisor's handlers in the child first.
        signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
        pid = -1
        try:
            pid = os.fork()
            if pid == 0:
                self._be_worker()  # never returns
        finally:
            if pid != 0:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
        slot.pid = pid
        slot.started = self.clock()

    # --- the worker's side --------------------------------------------------------------

    def _be_worker(self) -> None:
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            os.setpgid(0, 0)
            os.close(self._lifeline_write)
            if self._wake is not None:
                for end in self._wake:
                    end.close()
            threading.Thread(
                target=_stop_when_closed,
                args=(self._lifeline_read,),
                name="balancekit-lifeline",
                daemon=True,
            ).start()
            code = self.work()
        except KeyboardInterrupt:
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def ready_for_signals() -> None:
    """In a worker, once its server handles SIGTERM, SIGINT and SIGHUP:
    deliver those that came while it started (a no-op anywhere else)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)


def _noted(signum: int, frame: object) -> None:
    """A handler that does nothing: the wakeup fd carries the signal."""


def _stop_when_closed(fd: int) -> None:
    # The write end is the supervisor's alone: EOF means it is gone.
    while True:
        try:
            if not os.read(fd, 1):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    os.kill(os.getpid(), signal.SIGTERM)


__all__ = ["Supervisor", "backoff", "describe_exit", "ready_for_signals"]
