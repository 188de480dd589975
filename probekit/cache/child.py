"""What the store's helper processes (chunk writer, pixel reader) share: memory no path names,
dying with the parent, errors that cross the connection, and starting one."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import tempfile
from multiprocessing.connection import Connection, Pipe

__all__ = ["die_with_parent", "picklable", "shared_memory", "start_child"]


def shared_memory(size: int, name: str) -> int:
    """A file descriptor of `size` bytes of memory that no path names (nothing to clean up)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create(name)
    else:  # an unlinked temporary file, in memory where /dev/shm is
        fd, path = tempfile.mkstemp(
            prefix=f"{name}-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
        )
        os.unlink(path)
    os.ftruncate(fd, size)
    return fd


def start_child(module: str) -> tuple[subprocess.Popen[bytes], Connection]:
    """Start `python -c "from MODULE import main; main()"` with one end of a duplex connection
    (imported, not run as __main__: the exceptions it sends back must unpickle here)."""
    ours, theirs = Pipe(duplex=True)
    code = f"from {module} import main; main()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(theirs.fileno()), str(os.getpid())],
        pass_fds=(theirs.fileno(),),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    theirs.close()
    return proc, ours


def die_with_parent(parent: int) -> None:
    """In the child: be killed when the parent dies (Linux), ignore Ctrl-C (the parent ends it).
    Elsewhere the child polls its parent's pid."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the signal was set
        os._exit(1)


def picklable(e: BaseException) -> BaseException:
    """`e` if it crosses a connection intact, else a StoreError with its text."""
    from probekit.errors import StoreError

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return StoreError(f"{type(e).__name__}: {e}")
