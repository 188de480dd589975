"""What the store's helper processes (chunk writer, pixel reader) share: memory no path names,
dying with the parent, errors that cross the connection, and starting one."""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, Pipe
from typing import Any, NamedTuple, NoReturn, Protocol, TypeVar

__all__ = [
    "End",
    "Helper",
    "die_with_parent",
    "exit_code",
    "next_message",
    "picklable",
    "pooled",
    "run_child",
    "serve",
    "shared_memory",
    "start_child",
]


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


def start_child(module: str, *, bare: bool = False) -> tuple[subprocess.Popen[bytes], Connection]:
    """Start `python -c "from MODULE import main; main()"` with one end of a duplex connection
    (imported, not run as __main__: the exceptions it sends back must unpickle here).

    `bare`: the package's `__init__` files are not run in the child (they import most of
    probekit): only MODULE and what it imports, for a child that starts in a fraction of the
    time. Its messages must not hold objects of modules it lacks.
    """
    ours, theirs = Pipe(duplex=True)
    code = f"from {module} import main; main()"
    if bare:
        package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        stubs = {"probekit": package, "probekit.cache": os.path.join(package, "cache")}
        code = (
            "import sys, types\n"
            f"for name, path in {stubs!r}.items():\n"
            "    sys.modules[name] = types.ModuleType(name)\n"
            "    sys.modules[name].__path__ = [path]\n" + code
        )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(theirs.fileno()), str(os.getpid())],
        pass_fds=(theirs.fileno(),),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    theirs.close()
    return proc, ours


def exit_code(proc: subprocess.Popen[bytes]) -> int:
    """The exit code of a child whose end of the connection closed: it is exiting, or stuck on
    the way out (waited for 10 s, then killed: never an endless wait)."""
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def next_message(conn: Connection, parent: int) -> Any:
    """In the child: the parent's next message, or None once the parent is gone (polled where no
    parent-death signal exists) or its end of the connection closed."""
    while not conn.poll(0.5):
        if os.getppid() != parent:
            return None
    try:
        return conn.recv()
    except EOFError:
        return None


class End(NamedTuple):
    """The parent's last message to a helper: finish what was sent, then exit."""


def serve(conn: Connection, parent: int, handle: Callable[[Any], bool]) -> None:
    """The one loop of every helper process: the parent's messages to `handle`, in order,
    until `handle` returns False (after `End`, say) or the parent is gone."""
    while True:
        msg = next_message(conn, parent)
        if msg is None or not handle(msg):
            return


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


def run_child(serve: Callable[[Connection, int], None]) -> NoReturn:
    """The child's `main`: `serve(connection, parent pid)` (argv as `start_child` gives it), then
    exit at once: everything it was sent is done, and an interpreter's teardown (Zarr's event
    loop, thread pools) would only keep the parent waiting."""
    parent = int(sys.argv[2])
    die_with_parent(parent)
    try:
        serve(Connection(int(sys.argv[1])), parent)
    except BaseException:
        traceback.print_exc()  # a bug: the parent reports this process's end as one error
        os._exit(1)
    os._exit(0)


class Helper(Protocol):
    """A helper process's handle in the parent: `idle()` (alive, nothing pending), `release()`
    (drop what one call needed, e.g. page-locked buffers), `close()`."""

    def idle(self) -> bool: ...
    def release(self) -> None: ...
    def close(self) -> None: ...


H = TypeVar("H", bound=Helper)
# helper processes kept between calls, by kind, with what they were started under (the process,
# its environment: storage credentials, and working directory): a triage runs dozens of
# extractions, and starting a helper costs a fraction of a second each time
_IDLE: dict[type, tuple[tuple[int, str, str], Helper]] = {}
_IDLE_LOCK = threading.Lock()


def _context() -> tuple[int, str, str]:
    return os.getpid(), repr(sorted(os.environ.items())), os.getcwd()


@contextlib.contextmanager
def pooled(kind: Callable[[], H]) -> Iterator[H]:
    """A helper of `kind`: an idle one kept from an earlier call under the same environment, or
    a new one; kept again after a call that ended cleanly. Only the main thread keeps helpers (a
    helper dies with the thread that started it), and only for its own process."""
    keep = threading.current_thread() is threading.main_thread()
    helper: H | None = None
    now = _context()
    if keep:
        with _IDLE_LOCK:
            started, kept = _IDLE.pop(kind, (None, None))  # type: ignore[call-overload]
        if kept is not None and started[0] == now[0]:  # not a forked copy's
            if started == now and kept.idle():
                helper = kept  # type: ignore[assignment]
            else:
                kept.close()
    if helper is None:
        helper = kind()
    clean = False
    try:
        yield helper
        clean = True
    finally:
        if keep and clean and helper.idle():
            helper.release()
            with _IDLE_LOCK:
                if kind not in _IDLE:
                    _IDLE[kind], helper = (now, helper), None  # type: ignore[index]
        if helper is not None:
            helper.close()


@atexit.register
def _close_idle() -> None:
    with _IDLE_LOCK:
        kept = [h for (pid, _, _), h in _IDLE.values() if pid == os.getpid()]
        _IDLE.clear()
    for h in kept:
        h.close()
