"""Settling an import's blobs into a store: ask before sending ("stat before put"), stream big
files while they are read, send small files in batches (`has_many`, then `put_many` of what is
missing: against a remote, each batch's calls are in flight together), several batches at
once from a thread pool.

`Uploader` is used by the walk (`tvix_store.importer.walk`) for big files, as it reaches them,
and by `import_path` for the small files after the walk. Every blob is uploaded only if
`has` says the store lacks it, and whatever the store answers is checked against the digest
computed from the file (a file that changed meanwhile is an error, never a wrong blob).
Not the walk, not the PathInfo.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass

from tvix_store.core.digest import B3Digest
from tvix_store.core.errors import StoreError
from tvix_store.store import Store

READ_SIZE = 1 << 20
#: Small blobs are settled by the pool in batches of up to this many files / bytes.
BATCH_FILES = 64
BATCH_BYTES = 4 << 20

#: Called with (phase, files, bytes) as the import goes; phase is "hashing" or "uploading"
#: during the walk (files and bytes of the tree so far), then SMALL_PHASE (small files uploaded
#: after the walk, counted apart).
Progress = Callable[[str, int, int], None]
SMALL_PHASE = "uploading small files"


def show(p: bytes) -> str:
    return p.decode("utf-8", "backslashreplace")


def open_nofollow(p: bytes, dir_fd: int | None = None) -> int:
    return os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)


@dataclass(slots=True)
class Pending:
    """A small file's blob to settle after the walk (first path seen with this content)."""

    digest: B3Digest
    path: bytes
    size: int
    data: bytes | None  # kept from the walk, or None: read again


class Uploader:
    """Blobs of one import into `store` (see the module docstring). Thread-safe counters."""

    def __init__(self, store: Store, progress: Progress | None, workers: int) -> None:
        self.store = store
        self.progress = progress
        self.workers = workers
        self.settled: set[B3Digest] = set()  # big blobs known present or uploaded by this import
        self.lock = threading.Lock()
        self.uploaded_files = 0
        self.uploaded_bytes = 0

    def present(self, digest: B3Digest) -> bool:
        return digest in self.settled or self.store.blobs.has(digest)

    def _count(self, size: int) -> None:
        with self.lock:
            self.uploaded_files += 1
            self.uploaded_bytes += size

    def stream(
        self,
        fd: int,
        p: bytes,
        digest: B3Digest | None,
        feed: Callable[[bytes], None],
        report: Callable[[int], None],
    ) -> tuple[int, B3Digest]:
        """Read the file from `fd`'s position, passing every piece to `feed` (the NAR hash) here
        and uploading it from a helper thread; returns the bytes read and the blob's digest.
        StoreError if the upload fails or the file no longer hashes to `digest` (when given)."""
        q: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
        result: list[B3Digest | BaseException] = []

        def upload() -> None:
            ended = False
            try:
                with self.store.blobs.open_write() as w:
                    while (chunk := q.get()) is not None:
                        w.write(chunk)
                    ended = True
                    result.append(w.close())
            except BaseException as e:  # reported below, in the importing thread
                result.append(e)
                while not ended and q.get() is not None:  # let the reader finish
                    pass

        t = threading.Thread(target=upload, name="import-upload", daemon=True)
        t.start()
        total = 0
        try:
            while chunk := os.read(fd, READ_SIZE):
                feed(chunk)
                total += len(chunk)
                q.put(chunk)
                report(total)
        finally:
            q.put(None)
            t.join()
        got = result[0] if result else StoreError("upload thread ended without a result")
        if isinstance(got, BaseException):
            raise got
        if digest is not None and got != digest:
            raise StoreError(f"{show(p)}: file changed while being imported")
        self.settled.add(got)
        self._count(total)
        return total, got

    def settle_small(self, pending: Iterable[Pending]) -> None:
        """Upload the small blobs the store lacks, in batches (from `workers` threads if > 0)."""
        batches: list[list[Pending]] = [[]]
        nbytes = 0
        for job in pending:
            if len(batches[-1]) >= BATCH_FILES or nbytes >= BATCH_BYTES:
                batches.append([])
                nbytes = 0
            batches[-1].append(job)
            nbytes += job.size
        if not batches[-1]:
            return
        if self.workers <= 0 or len(batches) == 1:
            for b in batches:
                self._settle(b)
            return
        with ThreadPoolExecutor(min(self.workers, len(batches)), thread_name_prefix="import") as pool:
            futures = [pool.submit(self._settle, b) for b in batches]
            try:
                while True:
                    done, not_done = wait(futures, timeout=0.1, return_when=FIRST_EXCEPTION)
                    for fut in done:
                        fut.result()  # raises the first failure
                    if not not_done:
                        break
                    self.report()
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise

    def _settle(self, batch: list[Pending]) -> None:
        """One batch: which blobs the store lacks (`has_many`: one round trip against a remote),
        then those uploaded together (`put_many`), each checked against its digest."""
        blobs = self.store.blobs
        present = blobs.has_many([job.digest for job in batch])
        missing = [job for job, have in zip(batch, present, strict=True) if not have]
        datas = []
        for job in missing:
            data = job.data
            if data is None:
                with open(open_nofollow(job.path), "rb", closefd=True) as f:
                    data = f.read(job.size + 1)
            datas.append(data)
        for job, got in zip(missing, blobs.put_many(datas), strict=True):
            if got != job.digest:
                raise StoreError(f"{show(job.path)}: file changed while being imported")
            self._count(job.size)
        self.report()

    def report(self) -> None:
        if self.progress is not None:
            with self.lock:
                self.progress(SMALL_PHASE, self.uploaded_files, self.uploaded_bytes)
