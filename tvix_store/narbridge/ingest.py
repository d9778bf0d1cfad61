"""An uploaded NAR into the store while it streams in: `BodyPipe` (request body bytes from the
event loop to a worker thread, bounded) and `ingest` (decompress, `read_nar`, check the name).

`ingest` runs in a worker thread: the body is hashed as it arrives (the sha256 of the file as
sent, which is how Nix names a compressed upload: `FileHash`), decompressed as the suffix
says (xz, zstd, bzip2 or none; stdlib `lzma`/`bz2` and `zstandard`), and parsed by
`tvix_store.importer.nar.read_nar` straight into the store: blobs chunked as they come,
Directories put as complete subgraphs. Memory stays bounded: at most `PIPE_BYTES` of body
waiting, the decompressor's window, and what `read_nar` holds. At the end the name must be
the sha256 of the body or of the NAR inside (Nix names the NAR file by the first, tvix and snix
clients by the second, which for `.nar` is the same): anything else is a ValidationError and
nothing is indexed. NARs of 4 GiB and more are taken like any other (`nar_size` is uint64).

Not here: HTTP (`tvix_store.narbridge.app`), the index (`index`), PathInfos (none are made
from a NAR alone).
"""

from __future__ import annotations

import asyncio
import bz2
import hashlib
import lzma
import threading
from collections import deque
from dataclasses import dataclass
from typing import BinaryIO, cast

import zstandard

from tvix_store.core import nixbase32
from tvix_store.core.castore import Node
from tvix_store.core.errors import StoreError, ValidationError
from tvix_store.importer.nar import read_nar
from tvix_store.store import Store

#: request body bytes waiting for the worker at most (then the event loop stops reading)
PIPE_BYTES = 4 << 20
#: decompressed bytes asked of a decompressor at once
READ_SIZE = 1 << 20


class UploadAborted(StoreError):
    """The client stopped sending (stalled past the idle timeout, or disconnected)."""


class BodyPipe:
    """Bytes from the event loop (`feed`, `finish`) to one reader thread (`read`), at most
    `limit` bytes waiting. `close()` (the reader is done or failed) makes `feed` return False."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int = PIPE_BYTES) -> None:
        self._loop = loop
        self._limit = limit
        self._cond = threading.Condition()
        self._chunks: deque[bytes | memoryview] = deque()
        self._bytes = 0
        self._eof = False
        self._error: BaseException | None = None
        self._closed = False
        self._room = asyncio.Event()
        self._room.set()
        self._waiting = False  # the feeder waits for room (only then is it woken)

    # -- event loop side

    async def feed(self, data: bytes) -> bool:
        """Hand `data` to the reader, waiting while `limit` bytes are waiting; False once it closed."""
        while True:
            with self._cond:
                if self._closed:
                    return False
                if self._bytes < self._limit:
                    self._chunks.append(data)
                    self._bytes += len(data)
                    self._cond.notify()
                    return True
                self._room.clear()
                self._waiting = True
            await self._room.wait()

    def finish(self, error: BaseException | None = None) -> None:
        """The body ended (or failed with `error`, which the reader then raises)."""
        with self._cond:
            self._eof = True
            self._error = error
            self._cond.notify()

    # -- reader side

    def read(self, n: int = -1) -> bytes:
        with self._cond:
            while not self._chunks and not self._eof and not self._closed:
                self._cond.wait()
            if self._closed:
                raise UploadAborted("upload abandoned")
            if not self._chunks:
                if self._error is not None:
                    raise self._error
                return b""
            data = self._chunks.popleft()
            if 0 <= n < len(data):  # the rest stays as a view: no copy of it per read
                view = memoryview(data)
                data = view[:n]
                self._chunks.appendleft(view[n:])
            self._bytes -= len(data)
            if self._waiting and self._bytes < self._limit:
                self._waiting = False
                self._loop.call_soon_threadsafe(self._room.set)
            return bytes(data)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._chunks.clear()
            self._bytes = 0
            self._cond.notify_all()
        self._loop.call_soon_threadsafe(self._room.set)


class _Hashing:
    """The body as sent: sha256 (unless `hashing` is off: an uncompressed body is the NAR,
    which `read_nar` hashes anyway) and size of everything read."""

    def __init__(self, src: BodyPipe, hashing: bool = True) -> None:
        self._src = src
        self.sha = hashlib.sha256() if hashing else None
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n)
        if self.sha is not None:
            self.sha.update(data)
        self.size += len(data)
        return data

    def readable(self) -> bool:
        return True


class _Decompressed:
    """The NAR inside: the decompressor's output, errors as ValidationError."""

    def __init__(self, raw: _Hashing, compression: str) -> None:
        self.compression = compression
        self._reader: BinaryIO
        if compression == "none":
            self._reader = cast(BinaryIO, raw)
        elif compression == "xz":
            self._reader = cast(BinaryIO, lzma.LZMAFile(raw, format=lzma.FORMAT_XZ))  # type: ignore[arg-type]
        elif compression == "bzip2":
            self._reader = cast(BinaryIO, bz2.BZ2File(raw))  # type: ignore[arg-type]
        elif compression == "zstd":
            self._reader = cast(
                BinaryIO, zstandard.ZstdDecompressor().stream_reader(raw, read_size=READ_SIZE, read_across_frames=True)
            )
        else:  # pragma: no cover - the caller checks the suffix
            raise ValidationError(f"unsupported compression {compression!r}")
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self._reader.read(READ_SIZE if n is None or n < 0 else min(n, READ_SIZE))
        except (lzma.LZMAError, zstandard.ZstdError, EOFError) as e:
            raise ValidationError(f"the body is not valid {self.compression}: {e}") from None
        except OSError as e:  # bz2 and lzma report bad data and early ends as OSError too
            if isinstance(e, StoreError):
                raise
            raise ValidationError(f"the body is not valid {self.compression}: {e}") from None
        self.size += len(data)
        return data


@dataclass(frozen=True, slots=True)
class Ingested:
    """An uploaded NAR, in the store: root node, NAR size and sha256, and the sha256 of the file
    as sent when the upload was named by it (a compressed upload from Nix), else None."""

    node: Node
    nar_size: int
    nar_sha256: bytes
    file_sha256: bytes | None


def ingest(store: Store, pipe: BodyPipe, compression: str, name_sha256: bytes) -> Ingested:
    """Read the NAR of `pipe` into `store` (see the module docstring); ValidationError if it is
    malformed or its name is not its sha256. Always closes `pipe`."""
    try:
        raw = _Hashing(pipe, hashing=compression != "none")
        source = _Decompressed(raw, compression)
        result = read_nar(store, source)
        while raw.read(READ_SIZE):  # anything after the compressed stream counts for the file hash
            pass
    finally:
        pipe.close()
    file_sha = raw.sha.digest() if raw.sha is not None else result.nar_sha256
    if name_sha256 == result.nar_sha256:
        alias = None
    elif name_sha256 == file_sha:
        alias = file_sha
    else:
        raise ValidationError(
            f"sha256 mismatch: the upload is named {nixbase32.encode(name_sha256)}, but the body hashes to "
            f"{nixbase32.encode(file_sha)} and the NAR in it to {nixbase32.encode(result.nar_sha256)}"
        )
    return Ingested(result.node, result.nar_size, result.nar_sha256, alias)
