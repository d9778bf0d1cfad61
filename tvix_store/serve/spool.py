"""`DirectorySpool`: the Directories of one Put stream, held until the whole stream checked out.

A Directory Put is all or nothing, so the server holds what it received until the stream
ends. The spool holds each Directory's encoding (the bytes its digest is of), not the decoded
objects (several times larger): in memory up to `memory` bytes, beyond that in an unlinked
temp file. `max_count` Directories and `max_bytes` encoded bytes at most
(ResourceExhaustedError beyond, naming the limit and the daemon flag that sets it). Iterating
the spool decodes the Directories again, in order, as often as asked (the store checks then
stores: two passes).

Not here: checking the Directories (`GraphCheck`, `Admission.check_files`), storing them.
"""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Iterator
from types import TracebackType

from tvix_store.core.castore import Directory
from tvix_store.core.errors import ResourceExhaustedError
from tvix_store.protocol import wire

#: defaults of the daemon's --max-directory-put-count / --max-directory-put-bytes
DEFAULT_MAX_COUNT = 1_000_000
DEFAULT_MAX_BYTES = 1 << 30
#: encoded bytes held in memory before the spool moves to a temp file
SPOOL_MEMORY = 1 << 20

_LEN = struct.Struct("<I")


class DirectorySpool:
    """Encoded Directories of one stream, re-iterable (see the module docstring)."""

    def __init__(
        self, max_count: int = DEFAULT_MAX_COUNT, max_bytes: int = DEFAULT_MAX_BYTES, memory: int = SPOOL_MEMORY
    ) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.count = 0
        self.bytes = 0
        self._file = tempfile.SpooledTemporaryFile(max_size=memory, prefix="tvix-directory-put-")  # noqa: SIM115

    def add(self, d: Directory) -> None:
        raw = d.encoded
        if self.count + 1 > self.max_count:
            raise ResourceExhaustedError(
                f"Directory Put stream exceeds {self.max_count} directories (daemon --max-directory-put-count)"
            )
        if self.bytes + len(raw) > self.max_bytes:
            raise ResourceExhaustedError(
                f"Directory Put stream exceeds {self.max_bytes} bytes (daemon --max-directory-put-bytes)"
            )
        self._file.write(_LEN.pack(len(raw)))
        self._file.write(raw)
        self.count += 1
        self.bytes += len(raw)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Directory]:
        f = self._file
        f.seek(0)
        for _ in range(self.count):
            (n,) = _LEN.unpack(f.read(_LEN.size))
            yield wire.directory_from_bytes(f.read(n))
        f.seek(0, 2)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> DirectorySpool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
