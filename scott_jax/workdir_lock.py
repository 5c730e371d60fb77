"""An exclusive lock on a run's workdir, so two runs never write into one directory.

An OS-level advisory lock (`fcntl.flock`) on WORKDIR/.lock: the kernel releases it when the
holder exits in any way, SIGKILL included, so a stale lock never blocks a restart. The file
holds the holder's PID and host for the message of a refused run. Readers (`probe.py`) take
no lock. Filesystems without flock support (some network mounts) fail loudly, naming the flag
that turns the lock off.
"""

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator

from scott_jax.errors import LockError

LOCK_FILE = ".lock"


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Holds the workdir's lock for the `with` block; LockError at once if another process
    holds it, naming that process's PID and host."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
            raise LockError(
                f"{workdir} is in use by another run ({holder}); wait for it to end, stop it, "
                "or use another --workdir"
            ) from None
        except OSError as e:
            raise LockError(
                f"cannot lock {path} ({e}); this filesystem may not support file locks: set "
                "config.lock_workdir=False if no other run can use this workdir"
            ) from e
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
