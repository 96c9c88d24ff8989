"""The embedded Ray leaves SIGTERM to the driver, as Ray already leaves it SIGINT.

Ctrl+C sends SIGINT to the whole foreground process group, Ray's processes included; Ray
starts them with SIGINT blocked, so only the driver acts on it and the search ends cleanly.
SIGTERM is often sent the same way, to every process of a job at once: by Slurm (scancel, a
time limit), by systemd (stopping a unit kills its whole control group), by `timeout`, by
`kill -- -PGID`. Ray's processes end at once on it, and a driver whose raylet has gone is ended
by Ray's core worker within the second ("The connection to the plasma store is failed.
Terminate the process"): exit 1, no report, no `--resume` line, the running trials' rows not
written. Measured here: a search sent SIGTERM to its whole process group 30 s in ended 0.14 s
later with exit 1 and no trial rows.

So the embedded Ray's processes start with SIGTERM blocked too (a signal mask is inherited over
fork and exec: the raylet's agents and workers get it from the raylet), and the driver alone
acts on it, as on Ctrl+C. They cannot then be stopped with SIGTERM: Ray's shutdown of them
(SIGTERM, a second's wait, SIGKILL, one process type after another: 5.3 s instead of 1.1 here)
is replaced by a SIGKILL at once, of them and of every process under them (the raylet's agents
outlive a killed raylet by about a minute, waiting on the GCS: 180 MB between them here).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

# Where process trees can be read (/proc) and signal masks set per thread.
SUPPORTED = sys.platform.startswith("linux") and hasattr(signal, "pthread_sigmask")


@contextlib.contextmanager
def children_ignore_sigterm() -> Iterator[bool]:
    """Processes started inside start with SIGTERM blocked; yields whether it is so here.

    A SIGTERM that reaches this process meanwhile waits, and is acted on when this ends.
    """
    if not SUPPORTED:
        yield False
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield True
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


@contextlib.contextmanager
def left_ignored() -> Iterator[None]:
    """A SIGTERM this process was started ignoring is ignored again after the block.

    `ray.init` puts its own SIGTERM handler (an exit) over whatever was there, an inherited
    SIG_IGN included: a search started by a runner that ignores SIGTERM (as CI runners can)
    would then stop on it, where `fmnist-train` and `results final` leave it ignored.
    """
    ignored = signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    try:
        yield
    finally:
        if ignored and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _stat(pid: int) -> tuple[int, int, bool] | None:
    """(parent pid, start time in clock ticks, whether it has ended) of a process, or None if
    it is gone. An ended process (a zombie) stays until its parent, or init, collects it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after "pid (name)"
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[19]), fields[0] in (b"Z", b"X")


def _same(pid: int, started: int) -> bool:
    """Whether the process `pid` that started at `started` still runs."""
    stat = _stat(pid)
    return stat is not None and stat[1] == started and not stat[2]


def processes_under(roots: Iterable[int]) -> dict[int, int]:
    """Every process below `roots` (children, their children, ...): pid -> start time."""
    children: dict[int, list[int]] = {}
    started: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            children.setdefault(stat[0], []).append(int(entry))
            started[int(entry)] = stat[1]
    below: dict[int, int] = {}
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in below:
                below[child] = started[child]
                todo.append(child)
    return below


def kill_at_once(node: Any) -> None:
    """Make `node` (Ray's `_global_node`, whose processes ignore SIGTERM) stop them with SIGKILL.

    Every path by which Ray stops its processes goes through `node.kill_all_processes`:
    `ray.shutdown()`, its exit handler, its SIGTERM handler (a second SIGTERM). Each now kills
    them at once, and then whatever still runs under them that was there before: the raylet's
    workers and agents, which a raylet stopped by SIGTERM would have stopped itself.
    """
    ray_kill_all = getattr(node, "kill_all_processes", None)
    if ray_kill_all is None or not hasattr(node, "all_processes"):  # another Ray: its own way
        return

    def kill_all_processes(check_alive: bool = True, allow_graceful: bool = False,
                           **more: Any) -> None:
        roots = [info.process.pid for infos in node.all_processes.values() for info in infos]
        below = processes_under(roots)
        ray_kill_all(check_alive=check_alive, allow_graceful=False, **more)
        for pid, started in below.items():
            if _same(pid, started):  # not a pid reused since
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        # SIGKILL is delivered, not waited for: a killed process runs on for a moment. Return
        # when they have all ended, so that nothing of this Ray runs after it (5 s at most).
        deadline = time.monotonic() + 5
        while any(_same(pid, started) for pid, started in below.items()) and \
                time.monotonic() < deadline:
            time.sleep(0.01)

    node.kill_all_processes = kill_all_processes
