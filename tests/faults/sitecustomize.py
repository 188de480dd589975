"""Faults for the tests, in every Python process started with this folder on PYTHONPATH (the
probekit CLI, torchrun's ranks, and the chunk-writer process each of them starts):

KILL_AT=N  the process that writes chunks' features SIGKILLs the job (its parent, then
           itself) in the middle of its N-th chunk write: one array of the chunk written, its
           done flag not; under torchrun only where RANK is KILL_RANK (default 0).
FULL_AT=N  the N-th chunk write fails as on a full disk, after one array of the chunk.
0 or unset: never.
"""

import os

if os.environ.get("KILL_AT", "0") != "0" or os.environ.get("FULL_AT", "0") != "0":
    import errno
    import signal

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
            os.kill(os.getppid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{split}/{name}")
        real(self, split, chunk, chunk_rows, columns)

    FeatureStore.write_chunk = write_chunk
