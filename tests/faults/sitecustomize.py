"""Faults for the tests, in every Python process started with this folder on PYTHONPATH (the
probekit CLI, torchrun's ranks, and the chunk-writer process each of them starts). Each fault
fires at a point in the work, never at a moment, so a loaded machine changes nothing:

KILL_AT=N    the process that writes chunks' features SIGKILLs the job (its parent, then
             itself) in the middle of its N-th chunk write: one array of the chunk written, its
             done flag not; under torchrun only where RANK is KILL_RANK (default 0).
KILL_AFTER=N the same, right after its N-th chunk write is whole (done flag set).
KILL_POINT   the CLI process SIGKILLs itself (its children die with it) at a named point:
             `start` (before probekit is imported), `model` (the model just built), `store`
             (the feature store just created, no chunk written), `finish` (every chunk written,
             before the store is marked complete).
FULL_AT=N    the N-th chunk write fails as on a full disk, after one array of the chunk.
SIGINT_AFTER=N  right after its N-th chunk write is whole, the chunk-writing process sends
             SIGINT to its parent (the CLI): a Ctrl-C with at least N chunks kept, at a point.
KILL_LOG     a file each kill appends its point to first (`chunk:N`, `after:N`, or the name).
0 or unset: never.
"""

import os
import signal


def _die(point: str, parent: bool = False) -> None:
    log = os.environ.get("KILL_LOG")
    if log:
        with open(log, "a") as f:
            f.write(point + "\n")
    if parent:
        os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


_POINT = os.environ.get("KILL_POINT", "")
if _POINT == "start":
    _die("start")

if any(os.environ.get(k, "0") != "0" for k in ("KILL_AT", "KILL_AFTER", "FULL_AT", "SIGINT_AFTER")):
    import errno

    from probekit.cache.store import FeatureStore

    real, calls = FeatureStore.write_chunk, [0]

    def write_chunk(self, split, chunk, chunk_rows, columns, mark_done=True):  # type: ignore[no-untyped-def]
        if not mark_done:  # a part written ahead of a chunk (its masks): not a chunk write
            return real(self, split, chunk, chunk_rows, columns, mark_done)
        calls[0] += 1
        mine = os.environ.get("RANK", "0") == os.environ.get("KILL_RANK", "0")
        kill = mine and calls[0] == int(os.environ.get("KILL_AT", "0"))
        full = calls[0] == int(os.environ.get("FULL_AT", "0"))
        if kill or full:
            name = next(iter(columns))
            self._node(f"{split}/{name}")[chunk * chunk_rows] = columns[name][:1]  # half a chunk
        if kill:
            _die(f"chunk:{calls[0]}", parent=True)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{split}/{name}")
        real(self, split, chunk, chunk_rows, columns)
        if mine and calls[0] == int(os.environ.get("KILL_AFTER", "0")):
            _die(f"after:{calls[0]}", parent=True)
        if calls[0] == int(os.environ.get("SIGINT_AFTER", "0")):
            log = os.environ.get("KILL_LOG")
            if log:
                with open(log, "a") as f:
                    f.write(f"sigint:{calls[0]}\n")
            os.kill(os.getppid(), signal.SIGINT)

    FeatureStore.write_chunk = write_chunk

if _POINT in ("model", "store", "finish"):
    from probekit.cache.store import FeatureStore as _Store
    from probekit.extraction.plan import ExtractPlan

    if _POINT == "model":
        _build = ExtractPlan.build

        def build(self):  # type: ignore[no-untyped-def]
            out = _build(self)
            _die("model")
            return out

        ExtractPlan.build = build
    elif _POINT == "store":
        _create = _Store.create.__func__  # type: ignore[attr-defined]

        def create(cls, *args, **kwargs):  # type: ignore[no-untyped-def]
            out = _create(cls, *args, **kwargs)
            _die("store")
            return out

        _Store.create = classmethod(create)
    else:
        _update = _Store.update_meta

        def update_meta(self, **fields):  # type: ignore[no-untyped-def]
            if fields.get("status") == "complete":
                _die("finish")
            return _update(self, **fields)

        _Store.update_meta = update_meta
