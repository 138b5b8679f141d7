"""Exclusive writer locks on files: flock, waited for with a bound, the holder's pid inside.

Used by the Parquet store (one writer process per store directory, and per run) and by the
collector's spool (one collector per spool directory). flock is released by the kernel when its
process exits however it exits, so a kill -9 never leaves a stale lock behind; the pid written
into the file only names the holder in the error a second process gets.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time

log = logging.getLogger(__name__)


class Locked(Exception):
    """Another process holds the lock; the message names it and how long we waited."""


def lock_file(path: str, timeout_s: float, what: str) -> int:
    """flock `path` (created if missing) exclusively, waiting up to timeout_s; returns the
    open fd that holds it (os.close releases it). Locked after the wait, naming `what`."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout_s
    warned = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            if time.monotonic() >= deadline:
                os.close(fd)
                raise Locked(
                    f"{what} is held by another process (pid {holder}); waited "
                    f"{timeout_s:.0f} s for it to let go"
                ) from None
            if not warned:
                log.warning(
                    "%s is held by another process (pid %s): waiting up to %.0f s",
                    what,
                    holder,
                    timeout_s,
                )
                warned = True
            time.sleep(0.1)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
